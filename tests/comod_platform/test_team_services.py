"""Searches against the team services, for real on 127.0.0.1: an ``mlflow
server`` on PostgreSQL with its artifacts proxied to S3 (moto's server),
the Optuna study in the same PostgreSQL server, and Ray Tune's storage on
S3. The services start once for the module and are always stopped.

Clients of the tracking server get no storage credentials: artifacts reach
the bucket through the server. Only Ray Tune's storage (``COMOD_STORAGE``)
needs them, as a cluster's nodes would.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

from comod_platform.conventions import TAG_PARENT, TAG_ROLE, TAG_SEARCH, TAG_STATE, TAG_TRIAL_ID
from servers import free_port
from team_services import (MotoServer, PostgresServer, postgres_missing, start_team_mlflow,
                           without_storage_env)

REPO = Path(__file__).resolve().parents[2]
TINY = yaml.safe_load((REPO / "search_spaces" / "tiny.yaml").read_text())
RAY_BUCKET = "comod-ray"


class Team:
    def __init__(self, postgres: PostgresServer, s3: MotoServer, mlflow):
        self.postgres, self.s3, self.mlflow = postgres, s3, mlflow


@pytest.fixture(scope="module")
def team(tmp_path_factory):
    reason = postgres_missing()
    if reason:
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("team")
    postgres, s3, mlflow = PostgresServer(("mlflow", "optuna")), MotoServer(root / "s3"), None
    try:
        postgres.start()
        s3.start()
        s3.create_bucket(RAY_BUCKET)
        mlflow = start_team_mlflow(root / "mlflow", postgres, s3)
        yield Team(postgres, s3, mlflow)
    finally:
        if mlflow is not None:
            mlflow.stop()
        s3.stop()
        postgres.stop()


def _client_env(home: Path, ray_tmp: str, team: Team, **extra) -> dict:
    """A search driver's environment: the team server and database, and no storage access of its own."""
    env = without_storage_env({k: v for k, v in os.environ.items()
                               if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "COMOD_OPTUNA_STORAGE")})
    env.update(COMOD_HOME=str(home), COMOD_DOWNLOAD="0", RAY_TMPDIR=ray_tmp, PYTHONUNBUFFERED="1",
               MLFLOW_TRACKING_URI=team.mlflow.uri, COMOD_OPTUNA_STORAGE=team.postgres.url("optuna"),
               # no credentials from files or instance metadata either
               AWS_SHARED_CREDENTIALS_FILE=str(home / "no-aws-credentials"),
               AWS_CONFIG_FILE=str(home / "no-aws-config"), AWS_EC2_METADATA_DISABLED="true")
    env.update(extra)
    return env


def _comod(args, env, timeout=600):
    return subprocess.run([sys.executable, "-m", "comod_platform.cli", *args], env=env, capture_output=True,
                          text=True, timeout=timeout, cwd=REPO)


def _write_search(tmp_path: Path, name: str, num_trials: int) -> Path:
    raw = json.loads(json.dumps(TINY))
    raw["search"].update(num_trials=num_trials, max_concurrent=2)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _summary(done: subprocess.CompletedProcess) -> dict:
    return json.loads(done.stdout[done.stdout.index("{"):])


def _runs(client: MlflowClient, search: str):
    exp = client.get_experiment_by_name(f"search/{search}")
    assert exp is not None, f"no MLflow experiment search/{search}"
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get(TAG_ROLE) == "search"]
    return exp, parents, [r for r in runs if r.data.tags.get(TAG_ROLE) == "trial"]


def _bucket_prefix(artifact_uri: str) -> str:
    """``mlflow-artifacts:/1/RUN/artifacts`` -> ``1/RUN/artifacts/``: where the server keeps them."""
    assert artifact_uri.startswith("mlflow-artifacts:"), f"artifacts not proxied by the server: {artifact_uri}"
    return artifact_uri.split(":", 1)[1].lstrip("/").rstrip("/") + "/"


def test_search_on_postgres_with_proxied_s3_artifacts(team, tmp_path, ray_tmp):
    name, n = "team-pg", 3
    home = tmp_path / "runs"
    done = _comod(["search", "run", str(_write_search(tmp_path, name, n)), "--name", name, "--json"],
                  _client_env(home, ray_tmp, team))
    assert done.returncode == 0, done.stderr[-3000:]
    summary = _summary(done)
    assert summary["trials"] == n and summary["completed"] + summary["pruned"] == n and summary["completed"] >= 1

    # MLflow: one parent, one finished child per trial, with params and per-epoch history
    client = MlflowClient(team.mlflow.uri)
    exp, parents, children = _runs(client, name)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == n and len({c.data.tags[TAG_TRIAL_ID] for c in children}) == n
    states = {"completed": 0, "pruned": 0}
    keys = set(team.s3.keys(team.mlflow.bucket))
    for child in children:
        tags = child.data.tags
        assert tags[TAG_PARENT] == parents[0].info.run_id and tags[TAG_SEARCH] == name
        states[tags[TAG_STATE]] += 1
        assert child.info.status == "FINISHED"  # completed or pruned: both ended normally
        assert child.data.params["modulation.kind"] in ("none", "deterministic", "stochastic")
        assert "finetune.lr.controller" in child.data.params
        history = client.get_metric_history(child.info.run_id, "pretrain/train_loss")
        assert sorted(m.step for m in history) == [m.step for m in history] and len(history) == 2
        if tags[TAG_STATE] == "completed":
            listed = {a.path for a in client.list_artifacts(child.info.run_id)}
            assert {"config.yaml", "metrics.json"} <= listed
            prefix = _bucket_prefix(child.info.artifact_uri)
            assert {prefix + "config.yaml", prefix + "metrics.json"} <= keys, (prefix, sorted(keys)[:20])
    assert states["completed"] == summary["completed"] and states["pruned"] == summary["pruned"]

    # the tracking tables really are PostgreSQL's
    rows = team.postgres.query("mlflow", "SELECT status, count(*) FROM runs WHERE experiment_id = %s "
                                         "GROUP BY status", (int(exp.experiment_id),))
    assert sum(count for _, count in rows) == n + 1
    assert dict(rows).get("FINISHED", 0) == summary["completed"] + 1
    tagged = team.postgres.query("mlflow", "SELECT value, count(*) FROM tags WHERE key = %s AND run_uuid IN "
                                           "(SELECT run_uuid FROM runs WHERE experiment_id = %s) GROUP BY value",
                                 (TAG_STATE, int(exp.experiment_id)))
    assert {k: v for k, v in tagged} == {k: v for k, v in states.items() if v}

    # Optuna: the study named after the search, in PostgreSQL, its states matching MLflow's
    meta = json.loads((home / "searches" / name / "meta.json").read_text())
    assert meta["optuna_storage"] == team.postgres.url("optuna")
    assert (name,) in team.postgres.query("optuna", "SELECT study_name FROM studies")
    study = optuna.load_study(study_name=name, storage=team.postgres.url("optuna"))
    assert len(study.trials) == n
    counted = {s: sum(t.state == s for t in study.trials) for s in optuna.trial.TrialState}
    assert counted[optuna.trial.TrialState.COMPLETE] == states["completed"]
    assert counted[optuna.trial.TrialState.PRUNED] == states["pruned"]
    assert not list((home / "searches" / name).glob("optuna.db*"))


def test_ray_tune_storage_on_s3(team, tmp_path, ray_tmp):
    name, n = "team-s3", 2
    home = tmp_path / "runs"
    storage = {**team.s3.env(), "COMOD_STORAGE": f"s3://{RAY_BUCKET}/searches"}
    env = _client_env(home, ray_tmp, team, **storage)
    done = _comod(["search", "run", str(_write_search(tmp_path, name, n)), "--name", name, "--json"], env)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = _summary(done)
    assert summary["trials"] == n and summary["completed"] >= 1

    keys = team.s3.keys(RAY_BUCKET, f"searches/{name}/")
    top = {k.split("/", 2)[2] for k in keys if k.count("/") == 2}
    assert any(k.startswith("experiment_state-") and k.endswith(".json") for k in top), sorted(top)
    assert "tuner.pkl" in top, sorted(top)
    trial_dirs = {k.split("/")[2] for k in keys if k.count("/") >= 3}
    with_results = {d for d in trial_dirs if f"searches/{name}/{d}/result.json" in keys
                    and f"searches/{name}/{d}/params.json" in keys}
    assert len(with_results) == n, sorted(keys)
    with_checkpoints = {d for d in with_results if any(k.startswith(f"searches/{name}/{d}/checkpoint_")
                                                       for k in keys)}
    assert with_checkpoints, f"no trial checkpoint in s3://{RAY_BUCKET}/searches/{name}/: {sorted(keys)}"
    assert not (home / "searches" / name / "ray").exists(), "Ray Tune's experiment went to the local folder"

    status = _comod(["search", "status", name], env)
    assert status.returncode == 0, status.stderr[-2000:]
    assert f"{n} trials of {n}" in status.stdout and "modulation.kind" in status.stdout


def test_unreachable_optuna_database_fails_cleanly(team, tmp_path, ray_tmp):
    name = "team-nodb"
    home = tmp_path / "runs"
    dead = f"postgresql+psycopg2://postgres@127.0.0.1:{free_port()}/optuna"
    done = _comod(["search", "run", str(_write_search(tmp_path, name, 2)), "--name", name],
                  _client_env(home, ray_tmp, team, COMOD_OPTUNA_STORAGE=dead), timeout=300)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("comod: error:")]
    assert len(errors) == 1, done.stderr[-3000:]
    assert "COMOD_OPTUNA_STORAGE" in errors[0] and "127.0.0.1" in errors[0], errors[0]
    # nothing half-made: no search folder, no MLflow runs
    assert not (home / "searches" / name).exists()
    exp = MlflowClient(team.mlflow.uri).get_experiment_by_name(f"search/{name}")
    assert exp is None or not MlflowClient(team.mlflow.uri).search_runs([exp.experiment_id])
