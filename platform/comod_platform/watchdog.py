"""A trial's ``search.trial_timeout_s`` and ``search.stall_timeout_s``: past one, :class:`TrialTimeout` is
raised in the trial's thread, which reports it as its recorded end (not retried); a trial stuck in native
code is ended with its worker process ``grace_s`` later, and Ray records it as failed."""
from __future__ import annotations

import ctypes
import os
import sys
import threading
import time


class TrialTimeout(Exception):
    """Raised in a trial that passed one of its time limits; the message is the reason."""


class Watchdog:
    def __init__(self, trial_timeout_s: float | None, stall_timeout_s: float | None, grace_s: float = 60.0,
                 poll_s: float = 1.0):
        self.total, self.stall, self.grace, self.poll = trial_timeout_s, stall_timeout_s, grace_s, poll_s
        self.started = self.last = time.monotonic()
        self.reason: str | None = None
        self._done = threading.Event()

    @property
    def active(self) -> bool:
        return self.total is not None or self.stall is not None

    def alive(self, *_) -> None:
        """Progress: a step, a report, a line from a wait."""
        self.last = time.monotonic()

    def __enter__(self) -> "Watchdog":
        if self.active:  # watching the thread that runs the trial
            threading.Thread(target=self._watch, args=(threading.get_ident(),), name="comod-watchdog",
                             daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()

    def _overdue(self) -> str | None:
        now = time.monotonic()
        if self.total is not None and now - self.started > self.total:
            return f"timed out: the trial ran {now - self.started:.0f} s, over search.trial_timeout_s ({self.total:g})"
        if self.stall is not None and now - self.last > self.stall:
            return (f"stalled: no progress (no step, no report) for {now - self.last:.0f} s, over "
                    f"search.stall_timeout_s ({self.stall:g})")
        return None

    def _watch(self, target: int) -> None:
        while (reason := self._overdue()) is None:
            if self._done.wait(self.poll):
                return
        self.reason = reason
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(target), ctypes.py_object(TrialTimeout))
        if self._done.wait(self.grace):
            return
        print(f"comod: trial {reason}; it did not stop within {self.grace:g} s (stuck in native code): "
              f"ending its worker", file=sys.stderr, flush=True)
        os._exit(1)
