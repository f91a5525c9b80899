"""The runs folder's SQLite databases in WAL mode (comod_platform.sqlite_stores), on real SQLite files
through MLflow's and Optuna's own engines, each case in a fresh process (the switch is per process)."""
from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from contextlib import closing

from mlflow.tracking import MlflowClient

from searches import REPO

PROBE = """
import json, sys
from pathlib import Path
import optuna
from mlflow.tracking import MlflowClient
from comod_platform import runner
runner._service_defaults()  # the driver's defaults, the switch among them
inside, outside = Path(sys.argv[1]), Path(sys.argv[2])
for folder in (inside, outside):
    folder.mkdir(parents=True, exist_ok=True)
    MlflowClient(f"sqlite:///{folder / 'mlflow.db'}").create_experiment("e")
    optuna.create_study(study_name="s", storage=f"sqlite:///{folder / 'optuna.db'}").optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
import sqlalchemy
sync = {}
for folder in (inside, outside):  # per connection: read through a new SQLAlchemy engine, as MLflow's and Optuna's are
    with sqlalchemy.create_engine(f"sqlite:///{folder / 'mlflow.db'}").connect() as connection:
        sync[folder.name] = connection.exec_driver_sql("PRAGMA synchronous").scalar()
print(json.dumps({"synchronous": sync}))
"""


def _mode(path) -> tuple[str, int]:
    with closing(sqlite3.connect(path)) as connection:
        return connection.execute("PRAGMA journal_mode").fetchone()[0], len(connection.execute(
            "SELECT name FROM sqlite_master").fetchall())


def _probe(tmp_path, **env):
    home = tmp_path / "runs"
    inside, outside = home / "searches" / "s", tmp_path / "elsewhere"
    done = subprocess.run([sys.executable, "-c", PROBE, str(inside), str(outside)], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**_env(), "COMOD_HOME": str(home), **env})
    assert done.returncode == 0, done.stderr[-3000:]
    return inside, outside, json.loads(done.stdout.strip().splitlines()[-1])


def _env() -> dict:
    return {k: v for k, v in os.environ.items() if k not in ("COMOD_SQLITE_WAL", "MLFLOW_TRACKING_URI")}


def test_the_drivers_mlflow_store_and_study_in_the_runs_folder_are_in_wal_mode(tmp_path):
    inside, outside, seen = _probe(tmp_path)
    assert seen["synchronous"] == {"s": 1, "elsewhere": 2}  # NORMAL in the runs folder; SQLite's FULL elsewhere
    copy = tmp_path / "copy.db"  # the writer gone, the store's file alone holds its writes
    shutil.copy(inside / "mlflow.db", copy)
    assert sorted(e.name for e in MlflowClient(f"sqlite:///{copy}").search_experiments()) == ["Default", "e"]
    for name in ("mlflow.db", "optuna.db"):
        mode, tables = _mode(inside / name)
        assert mode == "wal" and tables > 5, (name, mode, tables)  # switched, and MLflow's/Optuna's tables are there
        assert _mode(outside / name)[0] == "delete", name  # a database elsewhere keeps its owner's settings


def test_comod_sqlite_wal_0_leaves_the_runs_folder_as_it_is(tmp_path):
    inside, _, seen = _probe(tmp_path, COMOD_SQLITE_WAL="0")
    assert seen["synchronous"] == {"s": 2, "elsewhere": 2}
    assert {_mode(inside / name)[0] for name in ("mlflow.db", "optuna.db")} == {"delete"}


def test_after_a_search_its_stores_files_alone_hold_every_write(tiny_search, tmp_path):
    """A finished search's databases are in WAL mode, and its logs are folded into the files (SQLite does
    it as the driver's last connection closes): mlflow.db and optuna.db copied alone hold all its runs and
    trials."""
    import optuna

    from searches import search_runs

    home = tiny_search["home"]
    study_db = home / "searches" / tiny_search["name"] / "optuna.db"
    assert _mode(home / "mlflow.db")[0] == "wal" and _mode(study_db)[0] == "wal"
    shutil.copy(home / "mlflow.db", tmp_path / "mlflow.db")
    shutil.copy(study_db, tmp_path / "optuna.db")
    parents, children = search_runs(MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}"), tiny_search["name"])
    assert len(parents) == 1 and len(children) == 4  # tiny.yaml: 4 trials
    study = optuna.load_study(study_name=tiny_search["name"], storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert len(study.trials) == 4 and all(t.state.is_finished() for t in study.trials)
