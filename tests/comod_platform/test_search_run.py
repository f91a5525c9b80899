"""`comod search run|resume|status` end to end: a real local Ray, a real Optuna
study in SQLite, a real `mlflow server` on 127.0.0.1 started by the test."""
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

from comod.config import flatten, load_config
from comod_platform.conventions import TAG_KIND, TAG_PARENT, TAG_SEARCH, TAG_STATE, TAG_TRIAL_ID, param_value
from searches import REPO, TINY, search_env, search_runs, search_study
from servers import MlflowServer, kill_processes_mentioning

def _comod(args, env, timeout=900, **kwargs):
    return subprocess.run([sys.executable, "-m", "comod_platform.cli", *args], env=env, capture_output=True,
                          text=True, timeout=timeout, cwd=REPO, **kwargs)


def _write_search(tmp_path: Path, name: str, **changes) -> Path:
    raw = json.loads(json.dumps(TINY))
    for section, value in changes.items():
        if isinstance(value, dict) and isinstance(raw.get(section), dict):
            raw[section].update(value)
        else:
            raw[section] = value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_search_end_to_end_with_an_mlflow_server(tmp_path, ray_tmp):
    server = MlflowServer(tmp_path / "mlflow").start()
    try:
        home = tmp_path / "runs"
        # trials far shorter than the checkpoint interval persist their final checkpoint only
        path = _write_search(tmp_path, "e2e", search={**TINY["search"], "num_trials": 4,
                                                      "checkpoint_interval_s": 3600})
        done = _comod(["search", "run", str(path), "--name", "e2e", "--json"], search_env(home, ray_tmp, server.uri))
        assert done.returncode == 0, done.stderr[-3000:]
        # the command ends its local Ray, agents included, before its quick exit
        time.sleep(1)
        assert kill_processes_mentioning(ray_tmp) == 0
        summary = json.loads(done.stdout[done.stdout.index("{"):])
        assert summary["trials"] == 4 and summary["completed"] + summary["pruned"] == 4
        assert summary["completed"] >= 1  # a trial that runs to its end is never counted as stopped early
        assert "[search]" in done.stderr and "best val/mean_f1" in done.stderr

        client = MlflowClient(server.uri)
        parents, children = search_runs(client, "e2e")
        assert len(parents) == 1 and parents[0].info.status == "FINISHED"
        assert parents[0].data.params["search.metric"] == "val/mean_f1"
        assert len(children) == 4
        assert len({c.data.tags[TAG_TRIAL_ID] for c in children}) == 4
        states = {"completed": 0, "pruned": 0}
        for child in children:
            tags = child.data.tags
            assert tags[TAG_PARENT] == parents[0].info.run_id and tags[TAG_SEARCH] == "e2e"
            states[tags[TAG_STATE]] += 1
            trial_dir = home / "searches" / "e2e" / "trials" / tags[TAG_TRIAL_ID]
            cfg = load_config(trial_dir / "config.yaml")
            assert tags[TAG_KIND] == cfg.modulation.kind
            params = {k: param_value(v) for k, v in child.data.params.items()}
            assert params == flatten(cfg)
            history = client.get_metric_history(child.info.run_id, "pretrain/train_loss")
            assert [m.step for m in history] == sorted({m.step for m in history}) and len(history) == 2
            artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
            if tags[TAG_STATE] == "completed":
                assert child.info.status == "FINISHED"
                assert {"config.yaml", "metrics.json"} <= artifacts
                final = json.loads((trial_dir / "metrics.json").read_text())
                assert child.data.metrics["test/mean_f1"] == pytest.approx(final["test/mean_f1"])
                assert len(client.get_metric_history(child.info.run_id, "val/mean_f1")) == 1
            else:  # pruned: ended normally, by the scheduler's decision
                assert child.info.status == "FINISHED"
            ray_trials = [d for d in (home / "searches" / "e2e" / "ray" / "e2e").iterdir()
                          if f"_{tags[TAG_TRIAL_ID]}_" in d.name]
            assert len(ray_trials) == 1, ray_trials
            persisted = sorted(ray_trials[0].glob("checkpoint_*"))
            if tags[TAG_STATE] == "completed":
                assert len(persisted) == 1 and (persisted[0] / "metrics.json").exists(), persisted
            else:
                assert persisted == []
        study = search_study(home, "e2e")
        counted = {s: sum(t.state == s for t in study.trials) for s in optuna.trial.TrialState}
        assert len(study.trials) == 4
        assert counted[optuna.trial.TrialState.COMPLETE] == states["completed"]
        assert counted[optuna.trial.TrialState.PRUNED] == states["pruned"]
        for trial in study.trials:
            assert ("modulation.noise_scale" in trial.params) == (trial.params["modulation.kind"] == "stochastic")

        status = _comod(["search", "status", "e2e"], search_env(home, ray_tmp, server.uri))
        assert status.returncode == 0, status.stderr
        assert "4 trials of 4" in status.stdout and "modulation.kind" in status.stdout
        listed = _comod(["search", "list"], search_env(home, ray_tmp, server.uri))
        assert listed.returncode == 0 and listed.stdout.split() == ["e2e"]

        # export, then train the exported config as it is: the round trip users make
        env = search_env(home, ray_tmp, server.uri)
        best = _comod(["export", "best", "e2e", "--out", str(tmp_path / "best.yaml"), "--set",
                       "finetune.epochs=1"], env)
        assert best.returncode == 0, best.stderr
        exported = load_config(tmp_path / "best.yaml")
        assert exported.finetune.epochs == 1
        trained = _comod(["train", str(tmp_path / "best.yaml"), "--out", str(tmp_path / "final")], env)
        assert trained.returncode == 0, trained.stderr[-2000:]
        assert json.loads((tmp_path / "final" / "metrics.json").read_text())["test/mean_f1"] >= 0
        table = _comod(["export", "trials", "e2e", "--out", str(tmp_path / "trials.parquet")], env)
        assert table.returncode == 0, table.stderr
        import pyarrow.parquet as pq

        rows = pq.read_table(tmp_path / "trials.parquet")
        assert rows.num_rows == 4 and str(rows.schema.field("finetune.lr.controller").type) == "double"
        report = _comod(["compare", "e2e"], env)
        assert report.returncode == 0, report.stderr
        assert "stochastic" in report.stdout or "deterministic" in report.stdout
        artifacts = {a.path for a in client.list_artifacts(parents[0].info.run_id, "compare")}
        assert any(p.endswith("compare.md") for p in artifacts)
    finally:
        server.stop()


def test_a_trial_that_raises_is_recorded_failed_and_the_search_goes_on(tmp_path, ray_tmp):
    home = tmp_path / "runs"
    space = {"finetune.tasks": {"type": "categorical", "choices": [["pattern_0"], ["no_such_task"]]}}
    path = _write_search(tmp_path, "fails", space=space,
                         search={**TINY["search"], "num_trials": 6, "scheduler": {"type": "fifo"}})
    done = _comod(["search", "run", str(path), "--name", "fails", "--json"], search_env(home, ray_tmp))
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout[done.stdout.index("{"):])
    assert summary["failed"] >= 1 and summary["completed"] >= 1
    assert summary["failed"] + summary["completed"] == 6
    _, children = search_runs(MlflowClient(f"sqlite:///{home / 'mlflow.db'}"), "fails")
    failed = [c for c in children if c.data.tags[TAG_STATE] == "failed"]
    assert len(failed) == summary["failed"] and len(children) == 6
    for child in failed:
        assert child.info.status == "FAILED"
        assert "no_such_task" in child.data.tags["comod.error"]
    study = search_study(home, "fails")
    assert sum(t.state == optuna.trial.TrialState.FAIL for t in study.trials) == summary["failed"]


def test_killed_driver_resumes_to_completion_without_duplicates(tmp_path, ray_tmp):
    home = tmp_path / "runs"
    # each kind pretrains its own network: trials end apart, and the kill lands between two of them
    experiment = {**TINY["experiment"], "pretrain": {"epochs": 2, "steps_per_epoch": 12, "batch_size": 16,
                                                     "modulation_kind": "same"}}
    path = _write_search(tmp_path, "killed", experiment=experiment,
                         search={**TINY["search"], "num_trials": 4, "scheduler": {"type": "fifo"}})
    env = search_env(home, ray_tmp)
    log = open(tmp_path / "driver.log", "w")
    driver = subprocess.Popen([sys.executable, "-m", "comod_platform.cli", "search", "run", str(path), "--name",
                               "killed"], env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    trials = home / "searches" / "killed" / "trials"
    deadline = time.time() + 600
    try:
        while time.time() < deadline and not list(trials.glob("*/metrics.json")):
            assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
            time.sleep(0.5)
        assert list(trials.glob("*/metrics.json")), "no trial finished in time"
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)  # the driver and everything in its session
        driver.wait(30)
        kill_processes_mentioning(ray_tmp)  # the local Ray instance went down with its machine
    finished_before = len(list(trials.glob("*/metrics.json")))
    assert finished_before < 4

    done = _comod(["search", "resume", "killed", "--json"], env)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout[done.stdout.index("{"):])
    assert summary["trials"] == 4 and summary["completed"] == 4

    _, children = search_runs(MlflowClient(f"sqlite:///{home / 'mlflow.db'}"), "killed")
    ids = [c.data.tags[TAG_TRIAL_ID] for c in children]
    assert len(ids) == 4 == len(set(ids)), ids  # re-attached, not duplicated
    for child in children:
        assert child.info.status == "FINISHED", [(c.data.tags, c.info.status) for c in children]
        client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "pretrain/train_loss")]
        assert len(steps) == len(set(steps)) == 2, steps
    # trials the killed driver started after Ray's last snapshot were sampled anew: their runs were dropped
    from mlflow.entities import ViewType

    exp = client.get_experiment_by_name("search/killed")
    dropped = client.search_runs([exp.experiment_id], run_view_type=ViewType.DELETED_ONLY)
    assert all(r.data.tags.get(TAG_STATE) == "lost" and r.info.status != "RUNNING" for r in dropped), dropped
    assert not {r.data.tags.get(TAG_TRIAL_ID) for r in dropped} & set(ids)
    study = search_study(home, "killed")
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 4
    lost = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
    assert len(lost) >= len(dropped)
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]


def test_bad_search_inputs(tmp_path, ray_tmp):
    env = search_env(tmp_path / "runs", ray_tmp)
    missing = _comod(["search", "run", "no_such_search"], env)
    assert missing.returncode == 2 and "no such search file" in missing.stderr and "tiny" in missing.stderr

    malformed = tmp_path / "malformed.yaml"
    malformed.write_text("experiment: {name: [tiny\n")
    bad_yaml = _comod(["search", "run", str(malformed)], env)
    assert bad_yaml.returncode == 2 and "malformed YAML" in bad_yaml.stderr and "Traceback" not in bad_yaml.stderr

    # a search folder of that name exists already: refused, and nothing of it touched
    taken = tmp_path / "runs" / "searches" / "taken"
    taken.mkdir(parents=True)
    (taken / "meta.json").write_text("{}")
    again = _comod(["search", "run", str(_write_search(tmp_path, "again")), "--name", "taken"], env)
    assert again.returncode == 1 and "exists already" in again.stderr and "comod search resume taken" in again.stderr
    assert sorted(p.name for p in taken.iterdir()) == ["meta.json"] and (taken / "meta.json").read_text() == "{}"
    # these three were refused before Ray started: no Ray session under the private temp dir
    assert not list(Path(ray_tmp).rglob("session_*")), list(Path(ray_tmp).rglob("session_*"))

    # a file that reads but does not check is refused with its dotted path (checked while Ray starts)
    broken = _write_search(tmp_path, "broken", space={"modulation.noise_scale": {"type": "float", "low": 2,
                                                                                 "high": 1}})
    done = _comod(["search", "run", str(broken)], env)
    assert done.returncode == 2 and "space.modulation.noise_scale" in done.stderr and "low <= high" in done.stderr
    assert "Traceback" not in done.stderr
    assert sorted(p.name for p in (tmp_path / "runs" / "searches").iterdir()) == ["taken"]  # nothing started

    # a dataset that is not there (loaded while Ray starts): one message naming it, nothing started
    (tmp_path / "no-data").mkdir()
    nodata = _write_search(tmp_path, "nodata", experiment={**TINY["experiment"], "data": {
        **TINY["experiment"]["data"], "dataset": "fashion_mnist", "root": str(tmp_path / "no-data")}})
    gone = _comod(["search", "run", str(nodata)], env)
    assert gone.returncode == 1 and "Fashion-MNIST not found" in gone.stderr and "Traceback" not in gone.stderr
    assert gone.stderr.startswith("comod: error: "), gone.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "runs" / "searches").iterdir()) == ["taken"]

    unknown = _comod(["search", "resume", "nobody"], env)
    assert unknown.returncode == 1 and "no search named 'nobody'" in unknown.stderr
    assert "Traceback" not in unknown.stderr
