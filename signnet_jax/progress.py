"""Progress of long work on stderr: a tqdm bar in a terminal, whole lines in a log.

A bar redraws itself with carriage returns, which a terminal shows as one changing line (so
does a Colab cell: its ``!`` commands run in a pseudo-terminal), but a log keeps as one ever
longer line: a file (``> build.log 2>&1``), a pipe (``| tee``, Docker's and Kubernetes'
logs). When stderr is not a terminal, `progress_bar` writes a line now and then.
"""

from __future__ import annotations

import os
import sys
import time
from typing import IO, Any

# Seconds between two lines in a log; TQDM_MININTERVAL, tqdm's own setting, overrides it.
LOG_INTERVAL = 30.0


def is_terminal(stream: IO[str]) -> bool:
    """Whether ``stream`` is a terminal (a pseudo-terminal too), where a bar can redraw."""
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no such method, or closed
        return False


def _interval() -> float:
    try:
        return max(0.0, float(os.environ["TQDM_MININTERVAL"]))
    except (KeyError, ValueError):
        return LOG_INTERVAL


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class LogProgress:
    """tqdm's interface as `progress_bar`'s callers use it (``n``, ``total``, ``update``,
    ``write``, ``close``, a context manager), writing whole lines::

        H&HT: 120/2000 videos (6%), 1.82 videos/s, 01:06 so far, about 17:14 left
        H&HT: 4/40 videos (10%), 2.5 s/video, 00:10 so far, about 01:30 left

    one at most every `LOG_INTERVAL` seconds, and a last one on close.
    """

    def __init__(self, total: int, desc: str, unit: str, file: IO[str], disable: bool = False):
        self.total, self.n = total, 0
        self.desc, self.unit, self.file, self.disable = desc, unit, file, disable
        self._interval = _interval()
        self._start = self._last = time.monotonic()
        self._shown = 0  # n of the last line
        self._closed = False

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _line(self) -> str:
        elapsed = time.monotonic() - self._start
        units = f"{self.unit}s"
        text = f"{self.desc}: {self.n}/{self.total} {units}"
        if self.total:
            text += f" ({self.n / self.total:.0%})"
        if self.n and elapsed > 0:
            rate = self.n / elapsed
            speed = f"{rate:.2f} {units}/s" if rate >= 1 else f"{1 / rate:.1f} s/{self.unit}"
            text += f", {speed}, {_duration(elapsed)} so far"
            if self.n < self.total:
                text += f", about {_duration((self.total - self.n) / rate)} left"
        return text

    def _show(self) -> None:
        print(self._line(), file=self.file, flush=True)
        self._shown, self._last = self.n, time.monotonic()

    def update(self, n: int = 1) -> None:
        self.n += n
        if not self.disable and time.monotonic() - self._last >= self._interval:
            self._show()

    def write(self, text: str, file: IO[str] | None = None) -> None:
        print(text, file=file or self.file, flush=True)

    def close(self) -> None:
        if not self._closed and not self.disable and self.n != self._shown:
            self._show()
        self._closed = True


def progress_bar(
    total: int, desc: str, unit: str, disable: bool = False, leave: bool = True
) -> Any:
    """A progress bar on stderr: tqdm's in a terminal, else a `LogProgress`.

    Args:
      total: how many units the work has.
      desc: what is done (the line's first word).
      unit: the unit's name, singular.
      disable: show nothing.
      leave: keep tqdm's bar on the screen when closed (a log keeps its lines anyway).
    """
    if not is_terminal(sys.stderr):
        return LogProgress(total, desc, unit, sys.stderr, disable)
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, desc=desc, disable=disable, leave=leave, dynamic_ncols=True)
