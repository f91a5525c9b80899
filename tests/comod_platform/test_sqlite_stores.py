"""The runs folder's SQLite databases in WAL mode (comod_platform.sqlite_stores), on real SQLite files
through MLflow's and Optuna's own engines, each case in a fresh process (the switch is per process)."""
from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from contextlib import closing

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
print(json.dumps(sync))
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
    import os

    return {k: v for k, v in os.environ.items() if k not in ("COMOD_SQLITE_WAL", "MLFLOW_TRACKING_URI")}


def test_the_drivers_mlflow_store_and_study_in_the_runs_folder_are_in_wal_mode(tmp_path):
    inside, outside, synchronous = _probe(tmp_path)
    assert synchronous == {"s": 1, "elsewhere": 2}  # NORMAL in the runs folder; SQLite's FULL elsewhere
    for name in ("mlflow.db", "optuna.db"):
        mode, tables = _mode(inside / name)
        assert mode == "wal" and tables > 5, (name, mode, tables)  # switched, and MLflow's/Optuna's tables are there
        assert _mode(outside / name)[0] == "delete", name  # a database elsewhere keeps its owner's settings


def test_comod_sqlite_wal_0_leaves_the_runs_folder_as_it_is(tmp_path):
    inside, _, synchronous = _probe(tmp_path, COMOD_SQLITE_WAL="0")
    assert synchronous == {"s": 2, "elsewhere": 2}
    assert {_mode(inside / name)[0] for name in ("mlflow.db", "optuna.db")} == {"delete"}
