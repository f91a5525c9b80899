"""Node-local storage is refused on a multi-node Ray cluster, for real.

A two-node cluster on 127.0.0.1 started with ``ray start``: the head in this
machine's mount namespace, and a worker node started in a private one
(``unshare -m``) with a tmpfs mounted over the ``local`` storage folder. The
worker node sees an empty folder of its own at that path, as a node with its
own disk would; the ``shared`` folder beside it is the same on both nodes.

``comod search run --storage local`` must stop with one message before anything
of the search exists, and ``python -m comod_platform.storage check`` must pass
``shared`` and refuse ``local``. Needs root (``mount``) and ``unshare``.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from servers import free_port, kill_processes_mentioning

REPO = Path(__file__).resolve().parents[2]
RAY = Path(sys.executable).with_name("ray")


def _can_unshare() -> str | None:
    """Why a private mount namespace cannot be made here, or None."""
    if os.geteuid() != 0:
        return "mounting a tmpfs in a private mount namespace needs root"
    if not shutil.which("unshare"):
        return "no unshare command"
    try:
        done = subprocess.run(["unshare", "-m", "true"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"unshare -m failed: {err}"
    return None if done.returncode == 0 else f"unshare -m failed: {done.stderr.strip()}"


pytestmark = pytest.mark.skipif(bool(_can_unshare()), reason=_can_unshare() or "")


def _env(home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "COMOD_STORAGE",
                                                            "COMOD_OPTUNA_STORAGE", "RAY_JOB_CONFIG_JSON_ENV_VAR")}
    # a head would turn token authentication on by itself where ~/.ray/auth_token exists; the worker would not
    env.update(COMOD_HOME=str(home), COMOD_DOWNLOAD="0", RAY_AUTH_MODE="disabled", PYTHONUNBUFFERED="1")
    return env


def _ray_start(args: list[str], env: dict, log: Path, prefix: tuple[str, ...] = ()) -> int:
    """One ``ray start`` in a session of its own (every daemon it leaves is in that process group); its pgid."""
    with open(log, "w") as out:
        proc = subprocess.Popen([*prefix, str(RAY), "start", *args], env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=REPO)
        try:
            rc = proc.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"ray start {' '.join(args[:2])} hung: {log.read_text()[-3000:]}")
    assert rc == 0, f"ray start {' '.join(args[:2])} failed: {log.read_text()[-3000:]}"
    return proc.pid


def _processes() -> dict[int, tuple[str, str, int]]:
    """pid -> (command line, mount namespace, process group) of every process readable here."""
    out = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            out[int(proc.name)] = (cmdline, os.readlink(proc / "ns" / "mnt"), os.getpgid(int(proc.name)))
        except OSError:
            continue
    return out


def _raylets(ray_tmp: str) -> dict[int, str]:
    """pid -> mount namespace of each raylet of the cluster under ``ray_tmp``."""
    return {pid: ns for pid, (cmd, ns, _) in _processes().items()
            if cmd.split(" ")[0].endswith("/raylet") and ray_tmp in cmd}


def _stop(ray_tmp: str, groups: list[int], namespace: str | None) -> None:
    """Kill the cluster: its processes by temp dir, by process group (Ray's agents rename themselves
    ``ray::...`` and no longer mention the temp dir) and by the private mount namespace; wait until none is
    left, so the namespace and its tmpfs are gone."""
    def mine(pgid: int, ns: str) -> bool:
        return pgid in groups or (namespace is not None and ns == namespace)

    deadline = time.time() + 20
    while True:
        kill_processes_mentioning(ray_tmp)
        left = [pid for pid, (_, ns, pgid) in _processes().items() if mine(pgid, ns) and pid != os.getpid()]
        if not left or time.time() > deadline:
            break
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.3)
    assert not left, f"processes of the test cluster still alive: {left}"


def _storage_check(folder: Path, address: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "comod_platform.storage", "check", str(folder), "--address", address],
                          env=env, capture_output=True, text=True, timeout=180, cwd=REPO)


def test_node_local_storage_is_refused_on_a_multi_node_cluster(tmp_path, home, ray_tmp):
    local, shared = tmp_path / "local", tmp_path / "shared"
    local.mkdir()
    shared.mkdir()
    env = _env(home)
    port = free_port()
    address = f"127.0.0.1:{port}"
    common = ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--num-gpus", "0", "--temp-dir", ray_tmp,
              "--object-store-memory", str(128 * 1024 * 1024), "--min-worker-port", "0", "--max-worker-port", "0",
              "--disable-usage-stats"]
    groups: list[int] = []
    namespace = None
    try:
        groups.append(_ray_start(["--head", "--port", str(port), "--include-dashboard", "false",
                                  "--dashboard-agent-listen-port", str(free_port()), *common], env,
                                 tmp_path / "head.log"))
        # the worker node in a private mount namespace, a tmpfs over `local` in it; its daemons stay in it
        groups.append(_ray_start(["--address", address, "--dashboard-agent-listen-port", str(free_port()), *common],
                                 env, tmp_path / "worker.log",
                                 prefix=("unshare", "-m", "sh", "-c", 'mount -t tmpfs none "$0" && exec "$@"',
                                         str(local))))

        ours = os.readlink("/proc/self/ns/mnt")
        raylets = _raylets(ray_tmp)
        apart = {pid: ns for pid, ns in raylets.items() if ns != ours}
        assert len(raylets) == 2 and len(apart) == 1, f"expected a raylet here and one in its own namespace: {raylets}"
        (worker_raylet, namespace), = apart.items()
        mounts = [line.split(" - ")[1].split()[0] for line in
                  Path(f"/proc/{worker_raylet}/mountinfo").read_text().splitlines()
                  if line.split()[4] == str(local)]
        assert mounts == ["tmpfs"], f"the worker node's raylet does not see a tmpfs at {local}: {mounts}"
        assert not os.path.ismount(local)  # ... and this namespace does not

        # a folder both nodes see passes (the worker may still be registering: the first run may count one node)
        for _ in range(10):
            ok = _storage_check(shared, address, env)
            if ok.returncode != 0 or "by all 1 node(s)" not in ok.stdout:
                break
            time.sleep(1)
        assert ok.returncode == 0, ok.stderr[-3000:]
        assert f"storage {shared}: shared by all 2 node(s)" in ok.stdout, ok.stdout + ok.stderr[-3000:]

        # the node-local folder is refused by the check ...
        bad = _storage_check(local, address, env)
        assert bad.returncode == 2, bad.stdout + bad.stderr[-3000:]
        assert f"error: storage {local} is not shared by the cluster's 2 nodes: 1 cannot read" in bad.stderr, \
            bad.stderr[-3000:]
        assert "FileNotFoundError" in bad.stderr and "Traceback" not in bad.stderr, bad.stderr[-3000:]

        # ... and by a search, before anything of it is made
        search = yaml.safe_load((REPO / "search_spaces" / "tiny.yaml").read_text())
        search["search"]["num_trials"] = 2
        search_file = tmp_path / "refused.yaml"
        search_file.write_text(yaml.safe_dump(search, sort_keys=False))
        run = subprocess.run([sys.executable, "-m", "comod_platform.cli", "search", "run", str(search_file),
                              "--name", "refused", "--address", address, "--storage", str(local)],
                             env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
        assert run.returncode == 1, run.stdout + run.stderr[-3000:]  # a SearchError: EXIT_FAILED
        assert "Traceback" not in run.stderr, run.stderr[-3000:]
        errors = [line for line in run.stderr.splitlines() if line.startswith("comod: error:")]
        assert len(errors) == 1, run.stderr[-3000:]
        message = errors[0]
        assert f"storage {local} is not shared by the cluster's 2 nodes" in message, message
        assert "--storage" in message and "COMOD_STORAGE" in message and "s3://" in message, message
        assert "{" not in run.stdout, run.stdout  # no summary

        assert not (home / "searches" / "refused").exists()
        assert MlflowClient(f"sqlite:///{home / 'mlflow.db'}").get_experiment_by_name("search/refused") is None
        assert not list(local.glob(".comod-probe-*")) and not list(shared.glob(".comod-probe-*"))
    finally:
        _stop(ray_tmp, groups, namespace)
    # the namespace is gone with its processes, and its tmpfs with it
    assert not any(ns == namespace for _, ns, _ in _processes().values())
