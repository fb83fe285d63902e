"""A note when a strategy stops making progress, so a run that hangs never hangs silently.

A device function or a strategy's server code that never returns (an endless loop, a
lock) used to leave a run waiting with no message, and with ``--no-progress`` nothing
on the screen moved. ``StallWatch`` is a daemon thread beside the strategy: when no
round has finished for ``experiment.stall_note_s`` seconds it logs one line saying how
long, which round, and what is running (the device functions the hosts run, or the
strategy's own code on the driver), then again after twice as long, and so on. It only
reports: a long round that is legitimately slow goes on.
"""
from __future__ import annotations

import threading
import time
from typing import Callable


class StallWatch:
    """Watches one strategy's rounds (a context manager); ``progress(round)`` after each.

    Args:
        name: the strategy, for the line.
        after: seconds without a finished round before the first note (0: never).
        log: where the line goes.
        busy: what is running now, or None when no host call is in flight (the driver:
            the strategy's server code, aggregation, scoring bookkeeping).
        resume_hint: the command that continues the run after Ctrl-C (or None).
    """

    def __init__(self, name: str, after: float, log: Callable[[str], None], busy: Callable[[], str | None],
                 resume_hint: str | None = None) -> None:
        self.name, self.after, self.log, self.busy, self.resume_hint = name, after, log, busy, resume_hint
        self.round = 0
        self._last = time.monotonic()
        self._next = after
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def progress(self, round: int) -> None:
        """Round ``round`` has finished."""
        self.round, self._last, self._next = round, time.monotonic(), self.after

    def __enter__(self) -> StallWatch:
        if self.after > 0:
            self._thread = threading.Thread(target=self._watch, name=f"fleetsim-stall-{self.name}", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _watch(self) -> None:
        while not self._stop.wait(min(max(self.after / 4, 0.05), 30.0)):
            idle = time.monotonic() - self._last
            if idle < self._next:
                continue
            what = self.busy()
            where = f"the hosts are running {what}" if what else "the driver is running the strategy's own code"
            then = f"; Ctrl-C stops the run and {self.resume_hint} continues it" if self.resume_hint else ""
            self.log(f"fleetsim: note: {self.name}: no round has finished for {_duration(idle)} (round "
                     f"{self.round + 1} under way; {where}); a loop that never ends looks like this{then}")
            self._next *= 2


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"
