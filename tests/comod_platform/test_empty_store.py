"""A new runs folder's MLflow store is a copy of an empty store made once per MLflow version."""
from __future__ import annotations

import shutil
import sqlite3

import pytest
from mlflow.tracking import MlflowClient

from comod_platform import empty_store
from comod_platform.tracking import tracking_uri


@pytest.fixture
def cache(tmp_path, monkeypatch):
    path = tmp_path / "cache"
    monkeypatch.setenv("COMOD_CACHE", str(path))
    return path


def _runs(tmp_path, monkeypatch, name: str):
    home = tmp_path / name
    monkeypatch.setenv("COMOD_HOME", str(home))
    return home


def test_a_new_runs_folder_gets_a_copy_that_mlflow_uses_as_its_own(tmp_path, cache, monkeypatch):
    first = _runs(tmp_path, monkeypatch, "first")
    uri = tracking_uri()
    template = empty_store.template_path()
    assert template.parent == cache and template.exists()
    assert (first / "mlflow.db").exists()  # before MLflow opened it
    assert empty_store._revision(first / "mlflow.db") == empty_store._latest_revision()
    made = template.stat().st_mtime_ns

    second = _runs(tmp_path, monkeypatch, "second")
    uri = tracking_uri()
    assert template.stat().st_mtime_ns == made  # copied, not made again
    client = MlflowClient(tracking_uri=uri)
    default = client.get_experiment("0")
    assert default.name == "Default" and default.artifact_location == (second / "artifacts").as_uri() + "/0"
    experiment = client.create_experiment("x", artifact_location=(second / "artifacts").as_uri())
    run = client.create_run(experiment)
    client.log_metric(run.info.run_id, "m", 0.5, step=1)
    assert client.get_run(run.info.run_id).data.metrics == {"m": 0.5}
    # the first folder's store is its own file: nothing of the second's is in it
    assert [e.name for e in MlflowClient(f"sqlite:///{first / 'mlflow.db'}").search_experiments()] == ["Default"]
    assert not list(second.glob(".mlflow.db.*"))  # no temporary copy left


def test_an_existing_store_is_never_touched(tmp_path, cache, monkeypatch):
    home = _runs(tmp_path, monkeypatch, "runs")
    client = MlflowClient(tracking_uri=tracking_uri())
    client.create_experiment("kept")
    before = (home / "mlflow.db").read_bytes()
    assert empty_store.seed(home / "mlflow.db", (home / "artifacts").as_uri()) is False
    assert (home / "mlflow.db").read_bytes() == before


def test_a_damaged_template_is_made_again(tmp_path, cache, monkeypatch):
    cache.mkdir()
    empty_store.template_path().write_bytes(b"not a database")
    home = _runs(tmp_path, monkeypatch, "runs")
    client = MlflowClient(tracking_uri=tracking_uri())
    assert empty_store._revision(empty_store.template_path()) == empty_store._latest_revision()
    assert client.get_experiment("0").artifact_location == (home / "artifacts").as_uri() + "/0"


def test_a_template_of_another_schema_is_dropped_and_mlflow_makes_the_store(tmp_path, cache, monkeypatch):
    _runs(tmp_path, monkeypatch, "warm")
    tracking_uri()  # makes the template
    with sqlite3.connect(empty_store.template_path()) as conn:
        conn.execute("UPDATE alembic_version SET version_num = 'an-older-revision'")
    home = _runs(tmp_path, monkeypatch, "runs")
    uri = tracking_uri()
    assert not (home / "mlflow.db").exists() and not empty_store.template_path().exists()
    MlflowClient(tracking_uri=uri).create_experiment("made by MLflow")
    assert empty_store._revision(home / "mlflow.db") == empty_store._latest_revision()


def test_an_unusable_cache_leaves_the_store_to_mlflow(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("COMOD_CACHE", str(blocker / "cache"))  # under a file: cannot be made
    home = _runs(tmp_path, monkeypatch, "runs")
    uri = tracking_uri()
    assert not (home / "mlflow.db").exists()
    MlflowClient(tracking_uri=uri).create_experiment("made by MLflow")
    assert (home / "mlflow.db").exists()


def test_a_store_made_by_another_process_meanwhile_is_kept(tmp_path, cache, monkeypatch):
    home = _runs(tmp_path, monkeypatch, "runs")
    home.mkdir()
    db = home / "mlflow.db"
    copy = shutil.copyfile

    def copy_then_lose_the_race(src, dst, **kw):
        result = copy(src, dst, **kw)
        if str(dst).endswith(".tmp"):
            db.write_bytes(b"the other process's store")
        return result

    monkeypatch.setattr(empty_store.shutil, "copyfile", copy_then_lose_the_race)
    assert empty_store.seed(db, (home / "artifacts").as_uri()) is False
    assert db.read_bytes() == b"the other process's store"
    assert not list(home.glob(".mlflow.db.*"))


def test_the_first_store_is_made_without_mlflow_s_info_lines(tmp_path):
    """`make quickstart` on a fresh machine: MLflow makes the first store of its version and logs each step
    ("Creating initial MLflow database tables") at INFO; none of that reaches the terminal (a fresh
    interpreter, as the command is one: MLflow sets its logger's level at its import)."""
    import subprocess
    import sys

    env = {"COMOD_CACHE": str(tmp_path / "cache"), "COMOD_HOME": str(tmp_path / "runs"), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", "from comod_platform.tracking import open_store; open_store()"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert empty_store.template_path().name in {p.name for p in (tmp_path / "cache").iterdir()}  # MLflow made it
    assert "INFO" not in done.stderr + done.stdout and "Creating initial" not in done.stderr, done.stderr[-2000:]
