"""The writers of a search's driver: calls run in order on a thread of their own, and outages wait.

No Ray here: the search's callbacks (:mod:`tune_callbacks`), ``comod train``'s run and the parent
run's set-up all reach MLflow through :class:`Writer` or :func:`retry_call`; the Optuna study's
writes go to its database through a :class:`Writer` too (:mod:`study_storage`). What counts as a
passing failure (:func:`transient`: an unreachable server, a failing one, a locked, full or
vanished database, also when MLflow wraps it) is retried until it passes or the flush timeout is
spent; anything else is the call's own fault, retried a few times and then dropped with a warning
that names it. Nothing is dropped silently. Each writer counts its calls and the CPU its thread
spent in them (:func:`usage`), which a search's summary carries as ``writers``.
"""
from __future__ import annotations

import logging
import os
import queue
import sys
import threading
import time
import weakref

log = logging.getLogger(__name__)
_WRITERS: "weakref.WeakSet[Writer]" = weakref.WeakSet()
BACKGROUND_NICE = 19
"""The CPU priority of the driver's writer threads: the lowest. Ray starts its workers, the trials
among them, at nice 15 (its ``worker_niceness``), so a writer must be below that for the trials to come
first where they take every core; its writes wait for the gaps (none of them is on a trial's path).
Measured on 2 cores, 40 trials, three interleaved pairs: the trials' window 3-12% shorter, the idle
gap between trials 2-35 ms shorter, than with the MLflow writer at nice 10 and the study's at 0.

The MLflow writer goes one step further (``Writer(idle=True)``, Linux's ``SCHED_IDLE``): it comes
after every other thread, so its work (about 45-85 ms of CPU per trial here, most of it MLflow's
SQLAlchemy store) goes first to cores that would otherwise idle. It is not free: against trials at
nice 15 a SCHED_IDLE thread still has a twelfth of their weight, so a backlogged writer takes about
8% of a core from them. Nothing in the scheduling loop waits for it before the search's end. The study's writer
stays at nice 19: Ray Tune's experiment snapshot waits for it (:mod:`study_storage`), and a thread
the loop waits for must not wait for idle cores. Measured on 2 cores, 40 trials, three interleaved
pairs, both writers in SCHED_IDLE against both at nice 19: the trials' window 1.3-2.1% shorter, the
idle gap 10-16 ms shorter."""


def transient(err: Exception) -> bool:
    """Whether an MLflow call failed because the server could not be reached or was failing
    (worth retrying until it is back), rather than because the call itself was refused."""
    if isinstance(err, (ConnectionError, TimeoutError, OSError)):
        return True
    try:
        import requests

        if isinstance(err, requests.exceptions.RequestException):
            return True
    except ImportError:  # pragma: no cover
        pass
    if any(type(e).__name__ == "OperationalError" for e in _chain(err)):
        return True  # SQLAlchemy's or sqlite3's: a locked, unreachable or full database, maybe wrapped
    text = str(err)
    if any(sign in text for sign in TRANSIENT_DATABASE_SIGNS):  # MLflow's wrapping of the same, as text
        return True
    return "API request to" in text and any(
        sign in text for sign in ("failed with exception", "timeout", "failed with error code 5"))


TRANSIENT_DATABASE_SIGNS = ("OperationalError", "database is locked", "database table is locked", "disk I/O error",
                            "database or disk is full", "No space left on device", "could not connect to server",
                            "server closed the connection unexpectedly")
"""What MLflow's stores leave of a database error they wrap (an MlflowException with the driver's message):
a lock held past SQLite's busy timeout, a full disk, a database server that went away. Retried, not dropped."""


def _chain(err: BaseException):
    """``err`` and the exceptions it was raised from or during (``__cause__``, ``__context__``)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


class Writer:
    """A background thread that runs calls to a store (MLflow, the Optuna study's database) in order.

    While the store is unreachable, writes wait in the queue (in
    order) and the head one is retried with a growing pause (at most
    ``max_pause`` s), so nothing is dropped. A call the server refuses is
    tried ``retries`` times, then dropped with a warning."""

    def __init__(self, retries: int = 5, max_pause: float = 15.0, describe: str = "MLflow",
                 name: str = "comod-mlflow-writer", nice: int = 0, idle: bool = False):
        self.queue: queue.Queue = queue.Queue()
        self.nice, self.idle = nice, idle
        self.retries, self.max_pause, self.describe = retries, max_pause, describe
        self.outage_since: float | None = None
        self.dropped = 0
        self.calls, self.cpu_s = 0, 0.0  # calls made, and the CPU time this thread spent in them
        self.thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self.thread.start()
        _WRITERS.add(self)

    def submit(self, fn, *args, **kwargs) -> None:
        self.queue.put((fn, args, kwargs))

    def _loop(self) -> None:
        if self.nice:
            try:  # this thread only (a Linux thread is its own task): the trials' processes come first
                # (the kernel keeps the value within 19)
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), os.getpriority(os.PRIO_PROCESS, 0)
                               + self.nice)
            except (AttributeError, OSError):  # not Linux, or not allowed: the writes run as they are
                pass
        if self.idle:
            try:  # this thread only: it runs when a core would otherwise idle (Linux's SCHED_IDLE)
                os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            except (AttributeError, OSError):  # not Linux: the nice value above is what it gets
                pass
        while True:
            # the call's arguments are let go before task_done: once a flush returns, this thread holds
            # nothing of the caller's (a Ray trial freed here while Ray shuts down ends the process)
            call = self.queue.get()
            started = time.thread_time()
            self._call(*call)
            del call
            self.cpu_s += time.thread_time() - started
            self.calls += 1
            self.queue.task_done()

    def _call(self, fn, args, kwargs) -> None:
        """``fn(*args, **kwargs)``: retried while the store is unreachable, dropped after ``retries``
        refusals."""
        refused = waits = 0
        while True:
            try:
                fn(*args, **kwargs)
                if self.outage_since is not None:
                    log.warning("%s reachable again after %.0f s; %d buffered writes follow", self.describe,
                                time.time() - self.outage_since, self.queue.qsize())
                    self.outage_since = None
                break
            except Exception as err:  # noqa: BLE001 - tracking must never kill the search
                if transient(err):
                    if self.outage_since is None:
                        self.outage_since = time.time()
                        log.warning("%s unreachable (%s); buffering writes and retrying", self.describe,
                                    str(err).splitlines()[0][:200])
                    waits += 1
                else:
                    refused += 1
                    if refused >= self.retries:
                        self.dropped += 1
                        log.warning("%s: call %s refused %d times, dropped: %s", self.describe, fn.__name__, refused, err)
                        break
                time.sleep(min(0.5 * 2 ** min(waits + refused, 6), self.max_pause))

    def pending(self) -> int:
        return self.queue.unfinished_tasks

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every write went out (True), or ``timeout`` s passed (False)."""
        if timeout is None:
            self.queue.join()
            return True
        deadline = time.time() + timeout
        announced = 0.0
        while self.pending():
            if time.time() > deadline:
                return False
            if self.outage_since is not None and time.time() - announced > 30:
                print(f"[search] waiting for {self.describe}: {self.pending()} writes buffered "
                      f"(up to {deadline - time.time():.0f} s more)", file=sys.stderr, flush=True)
                announced = time.time()
            time.sleep(0.1)
        return True


def usage(since: dict[str, dict] | None = None) -> dict[str, dict]:
    """What this process's writers have cost, by thread name: ``{name: {"calls": n, "cpu_s": s}}`` (the
    CPU time their threads spent in calls, retries and pauses' wake-ups included); with ``since`` (an
    earlier ``usage()``), only what came after it. A search's summary carries it: on a machine whose cores
    the trials keep busy, this is CPU the trials wait for."""
    total: dict[str, dict] = {}
    for writer in list(_WRITERS):
        entry = total.setdefault(writer.thread.name, {"calls": 0, "cpu_s": 0.0})
        entry["calls"] += writer.calls
        entry["cpu_s"] += writer.cpu_s
    before = since or {}
    out = {}
    for name, entry in total.items():
        earlier = before.get(name, {"calls": 0, "cpu_s": 0.0})
        if entry["calls"] > earlier["calls"]:
            out[name] = {"calls": entry["calls"] - earlier["calls"],
                         "cpu_s": round(entry["cpu_s"] - earlier["cpu_s"], 3)}
    return out


def retry_call(fn, *args, timeout: float | None = None, **kwargs):
    """``fn(*args, **kwargs)``, retried while the tracking server is unreachable (up to the flush timeout)."""
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


FLUSH_TIMEOUT_ENV = "COMOD_MLFLOW_FLUSH_TIMEOUT"
"""Seconds the end of a search waits for an unreachable tracking server (default 900)."""


class RetryingClient:
    """An MLflow client whose every call is :func:`retry_call`'s: a passing failure (:func:`transient`) is
    waited out up to the flush timeout, anything else raises at once. For the writes that are made where
    they are needed (``comod train``'s run, a search's parent run), not queued."""

    def __init__(self, client, timeout: float | None = None):
        self._client, self._timeout = client, timeout

    def __getattr__(self, name: str):
        attribute = getattr(self._client, name)
        if not callable(attribute):
            return attribute

        def call(*args, **kwargs):
            return retry_call(attribute, *args, timeout=self._timeout, **kwargs)

        call.__name__ = name
        return call
