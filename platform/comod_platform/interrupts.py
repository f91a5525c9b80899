"""Ctrl-C and SIGTERM in a search's driver: the first ends Ray Tune's loop as its own SIGUSR1 does, a second
ends the process at once (docs/architecture.md, "Stops, limits and refusals"). Ray Tune's SIGINT handler is
off (``TUNE_DISABLE_SIGINT_HANDLER``) so that both signals take this path; installed after ``ray.init``,
these Python handlers keep Ray's native fatal-signal handler out of it."""
from __future__ import annotations

import os
import signal
import sys
import threading
from contextlib import contextmanager

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}
_requested: list[int] = []
unfinished: set[str] = set()
"""The Ray trial ids an interrupted search left unfinished (its MLflow callback fills it at the end)."""


def requested() -> int | None:
    """The signal that asked the running search to stop, or None."""
    return _requested[0] if _requested else None


@contextmanager
def stop_on_signal(name: str):
    """While active (a ``with`` block in the main thread), SIGINT and SIGTERM stop search ``name`` cleanly
    once and at once the second time."""

    def handle(signum: int, frame) -> None:
        if _requested:
            print(f"comod: second {signal.Signals(signum).name}: ending at once. Trials, their MLflow runs and "
                  f"Optuna trials may be left RUNNING; `comod search resume {name}` repairs and continues "
                  f"them", file=sys.stderr, flush=True)
            os._exit(EXIT_CODES.get(signum, 128 + signum))
        _requested.append(signum)
        ray_stop = signal.getsignal(signal.SIGUSR1)  # Ray Tune's graceful stop, installed by its loop
        if not callable(ray_stop):
            raise KeyboardInterrupt  # before Ray Tune's loop started: nothing runs yet to stop cleanly
        print(f"comod: {signal.Signals(signum).name}: stopping the search's trials and saving its state (again "
              f"to end at once)", file=sys.stderr, flush=True)
        ray_stop(signal.SIGUSR1, frame)

    previous = {}
    if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
        _requested.clear()
        unfinished.clear()
        previous = {signum: signal.signal(signum, handle) for signum in EXIT_CODES}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
