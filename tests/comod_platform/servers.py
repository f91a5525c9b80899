"""Real services for the platform tests, always stopped afterwards: an
``mlflow server`` on 127.0.0.1, and cleanup of a Ray instance by its temp dir."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    def __init__(self, root: Path):
        self.root = root
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 90.0) -> "MlflowServer":
        self.root.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
               "--backend-store-uri", f"sqlite:///{self.root / 'server.db'}",
               "--artifacts-destination", str(self.root / "artifacts"), "--workers", "1"]
        self.proc = subprocess.Popen(cmd, stdout=open(self.root / "server.log", "w"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(self.root / 'server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2):
                    return self
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError("mlflow server did not answer /health in time")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)


def processes_mentioning(text: str) -> list[int]:
    """The pids of the processes (other than this one) whose command line mentions ``text`` (a Ray temp
    dir, a port), or that have a file open under it."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text not in cmdline:
            # Ray's agents rewrite their command line; they still hold files under the temp dir
            try:
                if not any(text in os.readlink(fd) for fd in (proc / "fd").iterdir()):
                    continue
            except OSError:
                continue
        found.append(int(proc.name))
    return found


def kill_processes_mentioning(text: str) -> int:
    """Kill every process :func:`processes_mentioning` ``text``; returns how many."""
    killed = 0
    for pid in processes_mentioning(text):
        try:
            os.kill(pid, signal.SIGKILL)
            killed += 1
        except OSError:
            pass
    return killed


def stop_group(proc, first: int = signal.SIGTERM, timeout: float = 20.0) -> None:
    """Stop a process started with ``start_new_session``: ``first`` to its group, then SIGKILL to what is
    left of it (a server's workers)."""
    if proc is None:
        return
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, first)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if proc.poll() is None:
        proc.wait(10)
