"""Nothing lost when things fail, with real components: a trial's worker
killed mid-run, the MLflow server stopped and restarted mid-search, a loss
that diverges, and a node of a multi-node Ray cluster (``ray.cluster_utils``)
removed mid-search. Each asserts the counts of trials, runs and metrics."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

from comod_platform.conventions import (TAG_ERROR, TAG_GPUS, TAG_NODE, TAG_RETRIES, TAG_STATE, TAG_TRIAL_ID)
from searches import REPO, TINY, search_env, search_runs, search_study
from servers import MlflowServer, kill_processes_mentioning

LONGER = {**TINY["experiment"], "pretrain": {"epochs": 3, "steps_per_epoch": 8, "batch_size": 16},
          "finetune": {"epochs": 3, "steps_per_epoch": 8, "batch_size": 16}}
# fine-tuning long enough (a few seconds a trial) that a trial is seen running on a node before the search ends
SLOWER = {**LONGER, "finetune": {"epochs": 3, "steps_per_epoch": 40, "batch_size": 16}}


def _write_search(folder: Path, name: str, experiment: dict, space: dict, search: dict) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"experiment": experiment, "space": space, "search": search}, sort_keys=False))
    return path


def _start(args, env, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "comod_platform.cli", *args], env=env, cwd=REPO,
                            stdout=open(log.with_suffix(".out"), "w"), stderr=open(log.with_suffix(".err"), "w"),
                            start_new_session=True)


def _finish(proc: subprocess.Popen, log: Path, timeout: float = 900) -> dict:
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    err = log.with_suffix(".err").read_text()
    assert proc.returncode == 0, err[-3000:]
    out = log.with_suffix(".out").read_text()
    return json.JSONDecoder().raw_decode(out[out.index("{"):])[0]  # Ray may print warnings after it


def _wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the search ended before {what}")
        time.sleep(0.3)
    pytest.fail(f"timed out waiting for {what}")


def _trial_workers(ray_tmp: str) -> list[int]:
    """Pids of Ray Tune's trial actors (``ray::ImplicitFunc``) of the Ray under ``ray_tmp``."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            environ = (proc / "environ").read_bytes()
        except OSError:
            continue
        if cmdline.startswith(b"ray::ImplicitFunc") and f"RAY_TMPDIR={ray_tmp}".encode() in environ:
            pids.append(int(proc.name))
    return pids


def _epochs_in_ray_results(storage: Path, name: str) -> dict[str, list[int]]:
    """Each trial's reported epochs, in order, from Ray Tune's own result log (every report, raw; the last
    epoch's report is the final one)."""
    out = {}
    for result in (storage / name).glob("*/result.json"):
        rows = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
        if rows:
            out[rows[0]["trial_id"]] = [int(r["comod/epoch"]) for r in rows]
    return out


def test_crash_outage_and_divergence_lose_nothing(tmp_path, ray_tmp):
    """Killed trial workers restart from their last epoch; an MLflow server away for a while loses no
    metric; a diverging loss ends its trial as failed with the reason; the search completes."""
    server = MlflowServer(tmp_path / "mlflow").start()
    home, storage = tmp_path / "runs", tmp_path / "storage"
    space = {"modulation.kind": {"type": "categorical", "choices": ["deterministic", "stochastic"]},
             "pretrain.lr.backbone": {"type": "categorical", "choices": [1.0e-3, 1.0e30]}}
    path = _write_search(tmp_path, "ft", experiment=LONGER, space=space, search={
        **TINY["search"], "sampler": "grid", "num_trials": 4, "scheduler": {"type": "fifo"}, "max_retries": 2,
        "checkpoint_interval_s": 0})
    env = {**search_env(home, ray_tmp, server.uri), "COMOD_STORAGE": str(storage)}
    log = tmp_path / "search"
    proc = _start(["search", "run", str(path), "--name", "ft", "--json"], env, log)
    try:
        # a running trial has persisted a checkpoint of an epoch: its worker process dies (a crash, e.g. OOM)
        def running_with_checkpoint():
            for folder in storage.glob("ft/*/"):
                rows = (folder / "result.json").read_text(errors="replace").splitlines() \
                    if (folder / "result.json").exists() else []
                if list(folder.glob("checkpoint_*")) and rows and "comod/final" not in rows[-1]:
                    return json.loads(rows[-1])["pid"]
            return None

        pid = _wait_for(running_with_checkpoint, 300, "a running trial with a persisted checkpoint", proc)
        assert pid in _trial_workers(ray_tmp)
        os.kill(pid, signal.SIGKILL)
        # the tracking server goes away for a while, then comes back on the same address and store
        server.stop()
        time.sleep(8)
        server.start()
        summary = _finish(proc, log)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        server.stop()
    err = log.with_suffix(".err").read_text()
    assert "unreachable" in err and "reachable again" in err  # the writer buffered through the outage

    assert summary["trials"] == 4 and summary["failed"] == 2 and summary["completed"] == 2, summary
    server.start()
    try:
        client = MlflowClient(server.uri)
        parents, children = search_runs(client, "ft")
        assert len(parents) == 1 and parents[0].info.status == "FINISHED"
        assert len(children) == 4 and all(c.info.status != "RUNNING" for c in children)
        diverged = [c for c in children if c.data.params["pretrain.lr.backbone"] == "1e+30"]
        healthy = [c for c in children if c not in diverged]
        assert len(diverged) == 2 and len(healthy) == 2
        for child in diverged:
            assert child.info.status == "FAILED" and child.data.tags[TAG_STATE] == "failed"
            assert "diverged" in child.data.tags[TAG_ERROR]
        for child in healthy:
            assert child.info.status == "FINISHED" and child.data.tags[TAG_STATE] == "completed"
            # fine-tuning's validation also has its step 0 (the pretrained model), logged once like the epochs
            for key, points in (("pretrain/train_loss", 3), ("finetune/val/mean_f1", 3 + 1)):
                history = client.get_metric_history(child.info.run_id, key)
                assert len(history) == points and len({m.step for m in history}) == points, (key, history)
            artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
            assert {"config.yaml", "metrics.json", "plots"} <= artifacts
        restarted = [c for c in healthy if int(c.data.tags.get(TAG_RETRIES, 0)) >= 1]
        assert restarted, "no trial was restarted after its worker was killed"
    finally:
        server.stop()
    # Ray's raw log: a restarted trial went on from its checkpoint, never repeating an epoch. (Ray Tune copies
    # a restarted trial's result.json back from the storage, which may not hold the last line yet: that line
    # can be missing here, never in MLflow, whose every epoch is checked above.)
    epochs = _epochs_in_ray_results(storage, "ft")
    for child in restarted:
        reported = epochs[child.data.tags[TAG_TRIAL_ID]]
        assert reported == sorted(set(reported)) and reported[0] == 1 and reported[-1] == 6, reported
    study = search_study(home, "ft")
    states = [t.state for t in study.trials]
    assert len(states) == 4 and states.count(optuna.trial.TrialState.FAIL) == 2
    assert states.count(optuna.trial.TrialState.COMPLETE) == 2
    for trial in study.trials:
        if trial.state == optuna.trial.TrialState.FAIL:
            assert "diverged" in trial.user_attrs["comod.reason"]


def test_a_node_lost_mid_search(tmp_path, ray_tmp, monkeypatch):
    """Three nodes (a head without GPUs, two workers with one logical GPU each), trials of half a
    GPU; a worker node is removed while it runs trials: they restart on the other node from their
    last checkpoint, and every trial is accounted for."""
    from ray.cluster_utils import Cluster

    # the cluster's address file goes to the private temp dir too, not to a /tmp/ray that may not exist
    monkeypatch.setenv("RAY_TMPDIR", ray_tmp)
    (Path(ray_tmp) / "ray").mkdir(exist_ok=True)

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0, "temp_dir": ray_tmp,
                                                            "include_dashboard": False})
    try:
        workers = [cluster.add_node(num_cpus=2, num_gpus=1) for _ in range(2)]
        cluster.wait_for_nodes()
        home, storage = tmp_path / "runs", tmp_path / "storage"
        path = _write_search(tmp_path, "nodes", experiment=SLOWER, space=TINY["space"], search={
            **TINY["search"], "num_trials": 6, "scheduler": {"type": "fifo"}, "max_concurrent": 4,
            "resources": {"cpu": 1, "gpu": 0.5}, "max_retries": 3, "checkpoint_interval_s": 0})
        env = search_env(home, ray_tmp)
        log = tmp_path / "search"
        proc = _start(["search", "run", str(path), "--name", "nodes", "--address", cluster.address,
                       "--storage", str(storage), "--json"], env, log)
        doomed = workers[1].node_id
        store = f"sqlite:///{home / 'mlflow.db'}"

        def running_on_doomed():
            try:
                _, children = search_runs(MlflowClient(store), "nodes")
            except Exception:  # noqa: BLE001 - the experiment is not there yet
                return []
            return [c for c in children if c.data.tags.get(TAG_NODE) == doomed and c.info.status == "RUNNING"]

        try:
            victims = _wait_for(running_on_doomed, 300, "a trial on the second worker node", proc)
            _wait_for(lambda: list(storage.glob("nodes/*/checkpoint_*")), 120, "a persisted checkpoint", proc)
            cluster.remove_node(workers[1])
            summary = _finish(proc, log)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        assert summary["trials"] == 6 and summary["completed"] == 6 and summary["failed"] == 0, summary
        _, children = search_runs(MlflowClient(store), "nodes")
        assert len(children) == 6 and all(c.info.status == "FINISHED" for c in children)
        nodes = {c.data.tags[TAG_NODE] for c in children}
        assert workers[0].node_id in nodes and cluster.head_node.node_id not in nodes  # only GPU nodes
        assert all(c.data.tags[TAG_GPUS] in ("0", "1") for c in children)  # a fraction gets one GPU id
        moved = {c.data.tags[TAG_TRIAL_ID]: c for c in children if int(c.data.tags.get(TAG_RETRIES, 0)) >= 1}
        assert {v.data.tags[TAG_TRIAL_ID] for v in victims} <= set(moved)
        for child in moved.values():
            assert child.data.tags[TAG_NODE] == workers[0].node_id  # finished on the surviving node
        study = search_study(home, "nodes")
        assert len(study.trials) == 6
        assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    finally:
        cluster.shutdown()
        kill_processes_mentioning(ray_tmp)
