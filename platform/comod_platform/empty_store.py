"""A new runs folder's embedded MLflow store starts as a copy of an empty one.

MLflow makes a new SQLite store by creating its first tables and then running
every schema migration since MLflow 1 (about 1.4 s of CPU here, on the path
of a first search's start-up and of every ``comod train`` into a new runs
folder). The result is the same file each time, for one MLflow version: the
latest schema, no runs and MLflow's "Default" experiment. So the first store
made with an MLflow version is made by MLflow itself in a scratch folder and
kept under the cache folder (:func:`comod_platform.paths.cache_home`) as
``mlflow-VERSION.db``; every new embedded store after it is a copy (a few ms),
whose Default experiment is pointed at the new runs folder's artifacts.

Nothing here can damage a store: a store that exists is never touched; the
copy is linked into place only when complete and only if no other process
made the store meanwhile; and whenever anything fails (an unwritable cache,
a template that does not read as an MLflow store of this version), MLflow
makes the store as it always does.
"""
from __future__ import annotations

import logging
import os
import secrets
import shutil
import sqlite3
import tempfile
from pathlib import Path

from comod_platform.paths import cache_home

log = logging.getLogger(__name__)


def template_path() -> Path:
    import mlflow

    return cache_home() / f"mlflow-{mlflow.__version__}.db"


def _make_template(path: Path) -> None:
    """MLflow's own new store, made in a scratch folder, then moved into the cache in one step."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".template-") as scratch:
        db = Path(scratch) / "mlflow.db"
        store = SqlAlchemyStore(f"sqlite:///{db}", (Path(scratch) / "artifacts").as_uri())
        store.engine.dispose()
        os.replace(db, path)


def _revision(db: Path) -> str | None:
    """The schema revision recorded in an MLflow SQLite store (None if it does not read as one)."""
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            rows = conn.execute("SELECT version_num FROM alembic_version").fetchall()
            conn.execute("SELECT experiment_id FROM experiments WHERE experiment_id = 0").fetchone()
    except sqlite3.Error:
        return None
    return rows[0][0] if len(rows) == 1 else None


def _latest_revision() -> str:
    from mlflow.store.db.utils import _get_latest_schema_revision

    return _get_latest_schema_revision()


def seed(db: Path, artifact_root: str) -> bool:
    """Make the embedded store ``db`` as a copy of the empty store, unless it exists; True if copied.

    ``artifact_root`` (a file URI) is the runs folder's artifact folder: the Default experiment's
    artifacts go to ``artifact_root/0``, as in a store MLflow made there."""
    if db.exists():
        return False
    try:
        template = template_path()
        if _revision(template) is None:
            _make_template(template)
        if _revision(template) != _latest_revision():
            template.unlink(missing_ok=True)  # another MLflow's, or damaged: made again next time
            return False
        db.parent.mkdir(parents=True, exist_ok=True)
        tmp = db.with_name(f".{db.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")  # made with the umask's mode
        try:
            shutil.copyfile(template, tmp)
            with sqlite3.connect(tmp) as conn:
                conn.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0",
                             (f"{artifact_root.rstrip('/')}/0",))
            os.link(tmp, db)  # fails if another process made the store meanwhile: that one is kept
        except FileExistsError:
            return False
        finally:
            Path(tmp).unlink(missing_ok=True)
        return True
    except Exception as err:  # noqa: BLE001 - MLflow makes the store itself, as without a template
        log.debug("the embedded store %s is made by MLflow (no copy of an empty store: %s)", db, err)
        return False
