"""Progress with an ETA for every long phase, readable on a terminal and in a log file.

``progress(...)`` takes tqdm's common arguments (an iterable, ``total``, ``desc``, ``initial``, ``unit``) and
returns an object with tqdm's ``update`` / ``set_postfix`` / ``close`` / iteration:

- stderr is a terminal: a tqdm bar (redrawn in place).
- otherwise (a redirect, a Ray or batch-scheduler log): no carriage returns, one plain line
  ``desc: k/n (p%) elapsed 0:01:02, ETA 0:03:10`` at most every ``PROGRESS_INTERVAL`` seconds (default 30)
  or, with ``PROGRESS_PERCENT`` set, also each time another that many percent are done, and one line at
  the end (``done in``; left out for a phase that took under ``QUIET_BELOW`` = 5 s and printed nothing else).

``PROGRESS_MODE`` forces a mode (``bar`` or ``lines``; default ``auto``). Off rank 0 nothing is printed.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any, Iterable, Iterator, Optional, TextIO

MODE_ENV, INTERVAL_ENV, PERCENT_ENV = "PROGRESS_MODE", "PROGRESS_INTERVAL", "PROGRESS_PERCENT"
DEFAULT_INTERVAL = 30.0
QUIET_BELOW = 5.0  # seconds: a phase this short that printed no line prints no final line either


def _env_number(name: str, default: float, stream: TextIO) -> float:
    """A non-negative number from the environment; a bad value is reported once per use and ignored (a typo in
    a logging knob must not stop a run that already started)."""
    raw = os.environ.get(name)
    if raw in (None, ""):
        return default
    try:
        value = float(raw)
        if value >= 0:
            return value
    except ValueError:
        pass
    print(f"warning: {name}={raw!r} is not a number >= 0; using {default:g}", file=stream)
    return default


def scaled(n: float) -> str:
    """A count with an SI prefix, as tqdm's ``unit_scale`` writes it: 950, 1.23k, 6.04G."""
    for prefix in ("", "k", "M", "G", "T"):
        if abs(n) < 999.5 or prefix == "T":
            return f"{n:g}" if not prefix else f"{n:.3g}{prefix}"
        n /= 1000.0
    return f"{n:g}"


def clock(seconds: float) -> str:
    """H:MM:SS."""
    s = int(max(0.0, seconds) + 0.5)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class LineProgress:
    """tqdm's interface, printing bounded plain lines (for streams that are not terminals)."""

    def __init__(self, iterable: Optional[Iterable] = None, total: Optional[float] = None, desc: str = "",
                 initial: float = 0, unit: str = "it", disable: bool = False, file: Optional[TextIO] = None,
                 interval: Optional[float] = None, percent: Optional[float] = None, unit_scale: bool = False,
                 **_tqdm_only: Any):
        self.file = file if file is not None else sys.stderr
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.iterable, self.total, self.desc, self.unit, self.disable = iterable, total, desc, unit, disable
        self._num = scaled if unit_scale else (lambda n: f"{n:g}")
        self.n = self._start_n = initial
        self.interval = _env_number(INTERVAL_ENV, DEFAULT_INTERVAL, self.file) if interval is None else interval
        self.percent = _env_number(PERCENT_ENV, 0.0, self.file) if percent is None else percent
        self.start = self._last = time.monotonic()
        self._last_step = self._percent_step(initial)
        self._postfix = ""
        self._closed = False
        self._printed = False

    def _percent_step(self, n: float) -> int:
        return int(100 * n / self.total // self.percent) if self.percent and self.total else 0

    def line(self, final: bool = False) -> str:
        elapsed = time.monotonic() - self.start
        done = self.n - self._start_n
        num = self._num
        count = f"{num(self.n)}/{num(self.total)} ({100 * self.n / self.total:.0f}%)" if self.total else num(self.n)
        if final:
            timing = f"done in {clock(elapsed)}"
        elif self.total and done > 0:
            timing = f"elapsed {clock(elapsed)}, ETA {clock(elapsed / done * (self.total - self.n))}"
        elif done > 0:
            timing = f"elapsed {clock(elapsed)}, {num(done / max(elapsed, 1e-9))} {self.unit}/s"
        else:
            timing = f"elapsed {clock(elapsed)}, ETA ?"
        return f"{self.desc + ': ' if self.desc else ''}{count} {self.unit} {timing}{self._postfix}"

    def _emit(self, final: bool = False) -> None:
        self._last = time.monotonic()
        self._printed = True
        print(self.line(final), file=self.file, flush=True)

    def update(self, n: float = 1) -> None:
        self.n += n
        if self.disable or self._closed:
            return
        now, step = time.monotonic(), self._percent_step(self.n)
        if now - self._last >= self.interval or step > self._last_step:
            self._last_step = step
            self._emit()

    def set_postfix(self, **values: Any) -> None:
        self._postfix = "".join(f", {k}={v}" for k, v in values.items())

    def close(self) -> None:
        if not self._closed and not self.disable and (self._printed or time.monotonic() - self.start >= QUIET_BELOW):
            self._emit(final=True)
        self._closed = True

    def __iter__(self) -> Iterator:
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __len__(self) -> int:
        return int(self.total or 0)

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def is_terminal(file: Optional[TextIO] = None) -> bool:
    """Whether progress on ``file`` (default stderr) is drawn as a bar: ``PROGRESS_MODE`` or, on auto, a TTY."""
    mode = os.environ.get(MODE_ENV, "auto").strip().lower()
    if mode in ("bar", "lines"):
        return mode == "bar"
    stream = file if file is not None else sys.stderr
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or file-less stream
        return False


def progress(iterable: Optional[Iterable] = None, *, desc: str = "", total: Optional[float] = None, rank: int = 0,
             disable: bool = False, file: Optional[TextIO] = None, **kwargs: Any):
    """A tqdm bar on a terminal, a ``LineProgress`` otherwise; silent off rank 0 or with ``disable``."""
    disable = disable or rank != 0
    if is_terminal(file):
        from tqdm import tqdm

        return tqdm(iterable, desc=desc, total=total, disable=disable, dynamic_ncols=True, file=file, **kwargs)
    return LineProgress(iterable, total=total, desc=desc, disable=disable, file=file, **kwargs)
