"""Progress on stderr: tqdm's bar in a terminal, whole lines in a log file."""

import io
import os
import sys

import pytest
from tqdm import tqdm

from signnet_jax import progress


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(progress.time, "monotonic", c)
    monkeypatch.delenv("TQDM_MININTERVAL", raising=False)
    return c


def test_log_lines_come_every_interval_and_at_the_end(clock):
    out = io.StringIO()
    with progress.LogProgress(4, "H&HT", "video", out) as bar:
        clock.now += 10
        bar.update(1)  # 10 s after the start: within the 30 s interval, no line
        assert out.getvalue() == ""
        clock.now += 21
        bar.update(1)
        bar.write("error on a.mp4: broken")
        clock.now += 5
        bar.update(1)  # 5 s after the last line
        clock.now += 3600
        bar.n += 1  # as the builder counts its last video: the close draws it
    assert out.getvalue().splitlines() == [
        "H&HT: 2/4 videos (50%), 15.5 s/video, 00:31 so far, about 00:31 left",
        "error on a.mp4: broken",
        "H&HT: 4/4 videos (100%), 909.0 s/video, 1:00:36 so far",
    ]
    bar.close()  # once
    assert out.getvalue().count("\n") == 3 and "\r" not in out.getvalue()


def test_the_interval_follows_tqdm_mininterval_and_disable_writes_nothing(clock, monkeypatch):
    monkeypatch.setenv("TQDM_MININTERVAL", "0")
    out = io.StringIO()
    with progress.LogProgress(2, "H&HT", "video", out) as bar:
        bar.update(1)  # no time has passed: 0 videos/s is not shown
        clock.now += 2
        bar.update(1)
    assert out.getvalue().splitlines() == [
        "H&HT: 1/2 videos (50%)",
        "H&HT: 2/2 videos (100%), 1.00 videos/s, 00:02 so far",
    ]
    quiet = io.StringIO()
    with progress.LogProgress(2, "H&HT", "video", quiet, disable=True) as bar:
        bar.update(2)
    assert quiet.getvalue() == ""


def test_a_terminal_gets_the_bar_a_file_or_pipe_lines(tmp_path, monkeypatch):
    with open(tmp_path / "build.log", "w") as log:  # > build.log 2>&1
        assert not progress.is_terminal(log)
        monkeypatch.setattr(sys, "stderr", log)
        assert isinstance(progress.progress_bar(3, "H&HT", "video"), progress.LogProgress)
    read, write = os.pipe()  # | tee build.log, docker logs
    with os.fdopen(read) as r, os.fdopen(write, "w") as w:
        assert not progress.is_terminal(w) and not progress.is_terminal(r)
        monkeypatch.setattr(sys, "stderr", w)
        assert isinstance(progress.progress_bar(3, "H&HT", "video"), progress.LogProgress)
    captured = io.StringIO()  # no file descriptor, as pytest's capture
    assert not progress.is_terminal(captured)
    closed = io.StringIO()
    closed.close()
    assert not progress.is_terminal(closed)
    main, other = os.openpty()  # a terminal, or Colab's ! commands
    with os.fdopen(main, "w"), os.fdopen(other, "w") as terminal:
        assert progress.is_terminal(terminal)
        monkeypatch.setattr(sys, "stderr", terminal)
        bar = progress.progress_bar(3, "H&HT", "video")
        assert isinstance(bar, tqdm) and bar.total == 3 and bar.unit == "video"
        bar.close()
