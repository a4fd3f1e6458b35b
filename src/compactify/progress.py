"""One progress bar per long step, readable both live and in a saved notebook or a log.

Live (a terminal, an interactive Jupyter session) :func:`progress` is ``tqdm.auto.tqdm``: a bar
redrawn in place. In a run whose output is *kept* (papermill in ``make reproduce``, nbval in
``make test``, CI logs) a redrawn bar is saved once per redraw (a ``\\r`` stream chunk each, or a
widget frozen at 0%), so there it becomes a plain text line written at most every
``interval`` seconds and once at the end, without a bar: ``sensitivity: 210/210 [03:01, 1.16it/s]``.

The style is chosen by ``COMPACTIFY_PROGRESS`` (``bar`` | ``log``; ``scripts/run_notebooks.py`` and
the Makefile's test target set ``log``); unset, it is ``bar`` where stderr is a terminal or an
IPython kernel runs, else ``log``. Third-party bars that would clutter a kept output (Hugging Face
``datasets`` while lm-eval builds a task, transformers' "Loading weights") are switched off by
:func:`quiet_third_party` in ``log`` style.
"""
from __future__ import annotations

import os
import sys
import time
from weakref import WeakSet

from tqdm.std import tqdm as _tqdm_std

STYLES = ("bar", "log")
BAR_FORMAT = "{desc}: {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
INTERVAL = 60.0  # seconds between lines in log style: a 20-minute step writes ~20 lines


def style() -> str:
    s = os.environ.get("COMPACTIFY_PROGRESS")
    if s is not None:
        if s not in STYLES:
            raise ValueError(f"COMPACTIFY_PROGRESS={s!r} is not a progress style: use one of {', '.join(STYLES)} "
                             "(or unset it: bar in a terminal or live notebook, log elsewhere)")
        return s
    interactive = sys.stderr.isatty() or "ipykernel" in sys.modules
    return "bar" if interactive else "log"


class _Lines:
    """A file for tqdm that keeps each redraw as one full line (tqdm redraws with ``\\r``)."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, s: str) -> None:
        s = s.replace("\r", "").strip()
        if s:
            self.stream.write(s + "\n")

    def flush(self) -> None:
        self.stream.flush()


class LogBar(_tqdm_std):
    """tqdm printing a line at most every ``mininterval`` seconds, none at the start, one at the end."""

    # No monitor thread: its forced refreshes printed a second line beside the next update's. tqdm keeps
    # the monitor and the bars it watches on the class, so this class gets its own, empty ones.
    monitor_interval = 0
    monitor = None
    _instances = WeakSet()

    def __init__(self, *args, interval: float = INTERVAL, **kwargs):
        kwargs.pop("file", None)
        kwargs.setdefault("bar_format", BAR_FORMAT)
        super().__init__(*args, file=_Lines(sys.stdout), mininterval=interval, delay=interval,
                         dynamic_ncols=False, **kwargs)

    def close(self) -> None:
        if not self.disable:
            self.delay = 0  # tqdm skips the final line of a bar it never drew; a log wants it
        super().close()


def progress(*args, **kwargs):
    """``tqdm(*args, **kwargs)`` in the style of this run (see the module docstring)."""
    if style() == "log":
        kwargs.pop("mininterval", None)
        kwargs.pop("maxinterval", None)
        return LogBar(*args, **kwargs)
    from tqdm.auto import tqdm

    return tqdm(*args, **kwargs)


def quiet_third_party() -> None:
    """Silence other libraries' progress bars in a kept run (log style); leave them live otherwise."""
    if style() != "log":
        return
    try:
        import datasets

        datasets.disable_progress_bars()
    except ImportError:
        pass
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass


class ThrottledLines:
    """Forward a subprocess's output (the healing ranks'), but progress-bar refreshes (carriage-return updates of
    one line) at most every ``every`` seconds: a notebook saves each refresh as a line of its own."""

    def __init__(self, stream, every: float = 60.0):
        self.stream, self.every, self.pending, self.last = stream, every, "", None   # None: the first refresh shows

    def write(self, piece: str) -> None:
        self.pending += piece
        *lines, self.pending = self.pending.split("\n")
        for line in lines:  # whole lines: the last state of each
            self.stream.write(line.rsplit("\r", 1)[-1] + "\n")
        # (a start of 0.0 hid the first refresh on a machine up for less than `every` seconds)
        if "\r" in self.pending and (self.last is None or time.monotonic() - self.last >= self.every):
            self.stream.write(self.pending.rsplit("\r", 1)[-1].strip() + "\n")
            self.last, self.pending = time.monotonic(), ""
        self.stream.flush()

    def flush(self) -> None:
        if self.pending.strip():
            self.stream.write(self.pending.rsplit("\r", 1)[-1] + "\n")
        self.pending = ""
        self.stream.flush()
