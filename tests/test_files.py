import os
import sys

import pytest

from signnet_jax.files import atomic_write, interrupted, stamp


def test_atomic_write_creates_the_folder_and_replaces_the_file(tmp_path):
    path = tmp_path / "a" / "b" / "out.json"
    atomic_write(path, b"one")
    atomic_write(path, b"two", fsync=True)
    assert path.read_bytes() == b"two"
    assert os.listdir(path.parent) == ["out.json"]


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "out.json"
    path.write_bytes(b"old")
    with pytest.raises(TypeError):
        atomic_write(path, "not bytes")  # type: ignore[arg-type]
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["out.json"]  # no temporary left behind


def test_interrupted_is_one_line_and_status_130(capsys, monkeypatch):
    assert interrupted("nothing written at out.mp4") == 130
    assert capsys.readouterr() == ("", "interrupted: nothing written at out.mp4\n")
    # in a terminal the line holds the echoed ^C (or a progress bar): a new line first
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    interrupted("x")
    assert capsys.readouterr().err == "\ninterrupted: x\n"


def test_stamp_tells_what_was_written_in_place(tmp_path):
    path = tmp_path / "out.mp4"
    assert stamp(path) is None and stamp(tmp_path / "no" / "such") is None
    path.write_bytes(b"old")
    before = stamp(path)
    assert stamp(path) == before
    atomic_write(path, b"new")  # renamed into place
    assert stamp(path) != before
