"""own_session: the command forks, the driver goes on in a session of its own, the parent passes signals on.

Checked on a stand-in driver (a few lines of Python that call ``own_session.enter()`` as ``comod search
run`` does, then count the SIGTERMs they get) in seconds; test_interrupts.py checks a real search with
its local Ray under SIGTERM to the group.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

DRIVER = r"""
import os, signal, sys, time
from comod_platform import own_session

own_session.enter()
out = sys.argv[1]
got = []

def on_term(signum, frame):
    got.append(signum)

signal.signal(signal.SIGTERM, on_term)
with open(out, "w") as f:
    f.write(f"{os.getpid()} {os.getsid(0)} {own_session.driver_pid()}\n")
deadline = time.monotonic() + 60
while not got and time.monotonic() < deadline:
    time.sleep(0.05)
time.sleep(1)  # a second signal, were it passed on, arrives meanwhile
with open(out, "a") as f:
    f.write(f"{len(got)}\n")
sys.exit(143)
"""


def _start(tmp_path: Path, *wrapper: str) -> tuple[subprocess.Popen, Path]:
    out = tmp_path / "driver.txt"
    proc = subprocess.Popen([*wrapper, sys.executable, "-c", DRIVER, str(out)], start_new_session=True)
    deadline = time.monotonic() + 60
    while not (out.exists() and out.read_text().endswith("\n")):
        assert time.monotonic() < deadline and proc.poll() is None, "the driver did not start"
        time.sleep(0.05)
    return proc, out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] != "Z"


def test_the_driver_runs_in_a_session_of_its_own_and_a_group_signal_reaches_it_once(tmp_path):
    proc, out = _start(tmp_path)
    try:
        driver, session, shown = map(int, out.read_text().split())
        assert driver != proc.pid and session == driver != os.getsid(proc.pid)  # out of the caller's session
        assert shown == proc.pid  # the pid a user is told to signal: the one they started
        # what GNU timeout does: SIGTERM to the command, then to its whole group (here 50 ms later, so that
        # each is handled on its own rather than merged by the kernel or Python)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(30) == 143  # the driver's status
        assert out.read_text().split("\n")[1] == "1"  # one stop, not a second signal that ends it at once
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_a_sigkill_of_the_command_ends_the_driver_too(tmp_path):
    proc, out = _start(tmp_path)
    driver = int(out.read_text().split()[0])
    try:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        deadline = time.monotonic() + 10
        while _alive(driver) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(driver)
    finally:
        if _alive(driver):
            os.kill(driver, signal.SIGKILL)


def test_under_gnu_timeout_the_limit_is_one_clean_stop(tmp_path):
    proc, out = _start(tmp_path, "timeout", "--preserve-status", "3")
    try:
        assert proc.wait(30) == 143
        assert out.read_text().split("\n")[1] == "1"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
