"""A local search's driver, and the Ray it starts, in a process session of their own: Slurm, ``timeout``,
``kill -- -PGID`` and Ray's job stop signal a whole group, which would kill a local Ray before the search
could stop cleanly (docs/architecture.md, "Stops, limits and refusals").
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from contextlib import suppress

FORWARDED = {signal.SIGINT: signal.SIGINT, signal.SIGTERM: signal.SIGTERM, signal.SIGHUP: signal.SIGTERM}
SAME_STOP_S = 0.2
"""A signal that follows the same one within this time is the same stop, passed on once: GNU ``timeout``
signals the command and then its whole group, and a second signal would end the search at once."""

parent_pid: int | None = None


def driver_pid() -> int:
    """The pid to name to a user who wants to stop this driver: the forwarding parent's when there is one."""
    return parent_pid or os.getpid()


def enter() -> None:
    """Fork before Ray, torch or MLflow load: the child goes on as the driver in a new session and dies with
    this process (``PR_SET_PDEATHSIG``), which passes SIGINT and SIGTERM (SIGHUP as SIGTERM) on and exits
    with the driver's status. Only on Linux (``prctl``) and with no thread yet (a fork copies only one)."""
    global parent_pid

    if not sys.platform.startswith("linux") or threading.active_count() > 1:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    parent = os.getpid()
    # blocked across the fork, so that a signal in between is handled (by the parent once its handlers are
    # in place; the child's are Python's usual ones)
    signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
    child = os.fork()
    if child == 0:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)
        os.setsid()
        ctypes.CDLL(None).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG: a SIGKILL of the parent ends it too
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(137)
        parent_pid = parent
        return
    last: dict[int, float] = {}  # this process: the forwarder

    def forward(signum, frame):
        sent = FORWARDED[signum]
        now = time.monotonic()
        if now - last.get(sent, -1e9) >= SAME_STOP_S:
            last[sent] = now
            with suppress(ProcessLookupError):
                os.kill(child, sent)

    for signum in FORWARDED:
        signal.signal(signum, forward)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)
    _, status = os.waitpid(child, 0)  # retried by Python after each forwarded signal
    code = os.waitstatus_to_exitcode(status)
    os._exit(128 - code if code < 0 else code)
