"""Writes to a store (MLflow) that outlast its outages.

:class:`Writer` runs calls in order on a thread of its own, so the scheduling loop never waits on a
store; :func:`retry_call` and :class:`RetryingClient` retry writes made in place. A passing failure
(:func:`transient`) is retried until it passes; anything else a few times, then dropped with a warning.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import os
import queue
import sys
import threading
import time
import weakref
from collections import Counter

log = logging.getLogger(__name__)
_WRITERS: "weakref.WeakSet[Writer]" = weakref.WeakSet()
FLUSH_TIMEOUT_ENV = "COMOD_MLFLOW_FLUSH_TIMEOUT"  # s the end of a search waits for a store away (default 900)
TRANSIENT_DATABASE_SIGNS = ("OperationalError", "database is locked", "database table is locked", "disk I/O error",
                            "database or disk is full", "No space left on device", "could not connect to server",
                            "server closed the connection unexpectedly")
"""What MLflow leaves of a database error it wraps (a lock held too long, a full disk, a server gone)."""


def transient(err: Exception) -> bool:
    """Whether a call failed because the store was away or failing (not because it refused the call)."""
    import requests  # MLflow's HTTP client

    if isinstance(err, (ConnectionError, TimeoutError, OSError, requests.exceptions.RequestException)):
        return True
    text, seen = str(err), set()
    while err is not None and id(err) not in seen:  # err, and what it was raised from or during
        if type(err).__name__ == "OperationalError":
            return True  # SQLAlchemy's or sqlite3's: a locked, unreachable or full database, maybe wrapped
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    if any(sign in text for sign in TRANSIENT_DATABASE_SIGNS):  # MLflow's wrapping of the same, as text
        return True
    return "API request to" in text and any(
        sign in text for sign in ("failed with exception", "timeout", "failed with error code 5"))


class Writer:
    """A thread that runs calls to a store in order. While the store is away the head call is retried with a
    growing pause (at most ``max_pause`` s); a refused call is tried ``retries`` times, then dropped.
    ``idle`` puts the thread in Linux's ``SCHED_IDLE`` class (below every nice level: it runs where a core
    would idle)."""

    def __init__(self, retries: int = 5, max_pause: float = 15.0, describe: str = "MLflow",
                 name: str = "comod-mlflow-writer", idle: bool = False):
        self.queue: queue.Queue = queue.Queue()
        self.idle = idle
        self.retries, self.max_pause, self.describe = retries, max_pause, describe
        self.outage_since: float | None = None
        self.dropped, self.calls, self.cpu_s = 0, 0, 0.0  # calls dropped, made, and the CPU time spent in them
        self.thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self.thread.start()
        _WRITERS.add(self)

    def submit(self, fn, *args, **kwargs) -> None:
        self.queue.put((fn, args, kwargs))

    def _loop(self) -> None:
        # this thread only (a Linux thread is its own task); not Linux, or not allowed: as it is
        with contextlib.suppress(AttributeError, OSError):
            if self.idle:
                os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        while True:
            # arguments let go before task_done: after a flush this thread holds nothing of the caller's
            # (a Ray trial freed here while Ray shuts down ends the process)
            call = self.queue.get()
            started = time.thread_time()
            self._call(*call)
            del call
            self.cpu_s += time.thread_time() - started
            self.calls += 1
            self.queue.task_done()

    def _call(self, fn, args, kwargs) -> None:
        refused = 0
        for failures in itertools.count(1):
            try:
                fn(*args, **kwargs)
                if self.outage_since is not None:
                    log.warning("%s reachable again after %.0f s; %d buffered writes follow", self.describe,
                                time.time() - self.outage_since, self.queue.qsize())
                    self.outage_since = None
                return
            except Exception as err:  # noqa: BLE001 - tracking must never kill the search
                if not transient(err):
                    refused += 1
                    if refused >= self.retries:
                        self.dropped += 1
                        log.warning("%s: call %s refused %d times, dropped: %s", self.describe,
                                    getattr(fn, "__name__", fn), refused, err)
                        return
                elif self.outage_since is None:
                    self.outage_since = time.time()
                    log.warning("%s unreachable (%s); buffering writes and retrying", self.describe,
                                str(err).splitlines()[0][:200] if str(err) else type(err).__name__)
                time.sleep(min(0.5 * 2 ** min(failures, 6), self.max_pause))

    def pending(self) -> int:
        return self.queue.unfinished_tasks

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every write went out (True), or ``timeout`` s passed (False)."""
        deadline = None if timeout is None else time.time() + timeout
        announced = 0.0
        while self.pending():
            if deadline is not None and time.time() > deadline:
                return False
            if self.outage_since is not None and time.time() - announced > 30:
                more = "" if deadline is None else f" (up to {deadline - time.time():.0f} s more)"
                print(f"[search] waiting for {self.describe}: {self.pending()} writes buffered{more}",
                      file=sys.stderr, flush=True)
                announced = time.time()
            time.sleep(0.1)
        return True


def usage(since: dict[str, dict] | None = None) -> dict[str, dict]:
    """What this process's writers cost, by thread name: ``{name: {"calls": n, "cpu_s": s}}``; with
    ``since`` (an earlier ``usage()``), only what came after it."""
    total: dict[str, Counter] = {}
    for writer in list(_WRITERS):  # each name's count starts at minus its count ``since``
        earlier = (since or {}).get(writer.thread.name, {})
        entry = total.setdefault(writer.thread.name, Counter({k: -v for k, v in earlier.items()}))
        entry.update(calls=writer.calls, cpu_s=writer.cpu_s)
    return {name: {"calls": e["calls"], "cpu_s": round(e["cpu_s"], 3)} for name, e in total.items() if e["calls"] > 0}


def retry_call(fn, *args, timeout: float | None = None, **kwargs):
    """``fn(*args, **kwargs)``, retried while the store is unreachable (up to the flush timeout)."""
    deadline = time.time() + (timeout if timeout is not None else float(os.environ.get(FLUSH_TIMEOUT_ENV, 900)))
    pause = 0.5
    while True:
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001
            if not transient(err) or time.time() + pause > deadline:
                raise
            time.sleep(pause)
            pause = min(pause * 2, 15.0)


class RetryingClient:
    """An MLflow client whose every call is :func:`retry_call`'s."""

    def __init__(self, client, timeout: float | None = None):
        self._client, self._timeout = client, timeout

    def __getattr__(self, name: str):
        attribute = getattr(self._client, name)
        return functools.partial(retry_call, attribute, timeout=self._timeout) if callable(attribute) else attribute
