import os

import pytest

from signnet_jax.files import atomic_write


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
