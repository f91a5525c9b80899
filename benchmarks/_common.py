"""What the benchmark scripts share: the load average (waited for, sampled), the processes of a private
Ray temp dir (killed), the machine, the versions and the checkout measured, a clean environment for the
commands they time, and their results written as JSON and Markdown.

The scripts run as ``python benchmarks/NAME.py`` from the repository root, where Python puts this folder
first on ``sys.path``; each also puts it there itself, for ``runpy.run_path`` and the tests.
"""
from __future__ import annotations

import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"

CALLER_SETTINGS = ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "COMOD_OPTUNA_STORAGE", "COMOD_STORAGE", "OMP_NUM_THREADS")
"""Settings of the caller's shell a timed command must not inherit: they would send it to other stores, to
another Ray, or fix its threads (Ray gives each trial worker its CPUs' worth)."""


class LoadSampler:
    """Samples the 1-minute load average every ``every`` seconds while running."""

    def __init__(self, every: float = 2.0):
        self.every, self.samples = every, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        while True:
            self.samples.append(os.getloadavg()[0])
            if self._stop.wait(self.every):
                return

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.samples.append(os.getloadavg()[0])

    def summary(self) -> dict:
        s = self.samples
        return {"min": round(min(s), 2), "mean": round(statistics.fmean(s), 2), "max": round(max(s), 2)}


def add_run_options(p, max_wait: float, timeout: float, what: str = "one side") -> None:
    """The options every measuring script takes: waiting for a quiet machine, a time limit, where results
    go (``--quick`` writes nothing unless ``--out`` is given), and keeping the temporary folders."""
    p.add_argument("--wait-load", type=float, default=2.5,
                   help="before measuring, wait until the 1-minute load average is below this (default 2.5)")
    p.add_argument("--max-wait", type=float, default=max_wait,
                   help=f"seconds to wait for the load at most (default {max_wait:g})")
    p.add_argument("--timeout", type=float, default=timeout,
                   help=f"seconds {what} may run at most (default {timeout:g})")
    p.add_argument("--out", type=Path, default=None,
                   help=f"results folder (default {RESULTS}; with --quick nothing is written unless --out is given)")
    p.add_argument("--keep", action="store_true", help="keep the temporary folders (printed) for inspection")


def wait_for_load(limit: float, max_wait: float) -> dict:
    """Wait (at most ``max_wait`` s) until the 1-minute load average is below ``limit``; what happened."""
    start = time.time()
    first = os.getloadavg()[0]
    while os.getloadavg()[0] >= limit and time.time() - start < max_wait:
        time.sleep(10)
    waited = time.time() - start
    now = os.getloadavg()[0]
    if waited > 1:
        print(f"waited {waited:.0f} s for the load: 1-min load average {first:.2f} -> {now:.2f} "
              f"({'below' if now < limit else 'still above'} {limit})", flush=True)
    return {"limit": limit, "waited_s": round(waited, 1), "load_at_start": round(now, 2), "reached": now < limit}


def kill_processes_mentioning(text: str) -> int:
    """Kill (by pid) every process other than this one whose command line or environment names ``text``
    (a private RAY_TMPDIR: Ray's daemons name it, its workers inherit it), or that holds a file under it
    (Ray's agents rewrite their command line); returns how many."""
    killed = 0
    me = os.getpid()
    needle = text.encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == me:
            continue
        try:
            blob = (proc / "cmdline").read_bytes() + b"\0" + (proc / "environ").read_bytes()
        except OSError:
            continue
        if needle not in blob:
            try:
                if not any(text in os.readlink(fd) for fd in (proc / "fd").iterdir()):
                    continue
            except OSError:
                continue
        try:
            os.kill(int(proc.name), signal.SIGKILL)
            killed += 1
        except OSError:
            pass
    return killed


def clean_env(**extra: str) -> dict:
    """This process's environment without :data:`CALLER_SETTINGS`, unbuffered, with ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in CALLER_SETTINGS}
    env.update(PYTHONUNBUFFERED="1", **extra)
    return env


def versions() -> dict:
    import mlflow
    import optuna
    import ray
    import torch

    return {"ray": ray.__version__, "mlflow": mlflow.__version__, "optuna": optuna.__version__,
            "torch": torch.__version__, "python": sys.version.split()[0]}


def machine() -> dict:
    return {"processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "platform": platform.platform()}


def code_version() -> dict:
    """The checkout measured: its commit, and files of the core and the platform changed since (git, read-only)."""
    def git(*cmd: str) -> str:
        try:
            return subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            return ""

    # porcelain lines are "XY path": the status columns may start with a space, so nothing is stripped first
    changed = [line[3:] for line in git("status", "--porcelain", "--", "comod", "platform").splitlines() if line]
    return {"commit": git("rev-parse", "--short", "HEAD").strip() or None, "changed_since": changed}


def results_folder(out: Path | None, quick: bool) -> Path | None:
    """Where results go: ``out`` if given, else :data:`RESULTS`; nowhere for a ``--quick`` smoke check
    without ``--out``."""
    if out is None and quick:
        return None
    return out or RESULTS


def write_results(folder: Path, stem: str, result: dict, markdown: str) -> None:
    """``folder/stem.json`` (``result``) and ``folder/stem.md`` (``markdown``)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (folder / f"{stem}.md").write_text(markdown)
    print(f"wrote {folder / stem}.json and .md")
