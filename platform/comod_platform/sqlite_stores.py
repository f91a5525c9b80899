"""The runs folder's SQLite databases in write-ahead-log mode, for the search driver.

While the driver writes the embedded MLflow store and the study, ``comod ui`` and ``comod search status``
read them without waiting; with ``synchronous=NORMAL`` a killed process loses no committed write. Only
databases inside the runs folder are switched; ``COMOD_SQLITE_WAL=0`` (or ``false``, ``no``, ``off``) leaves
them as they are (a network file system, where WAL cannot work). Until SQLite's checkpoint, ``NAME-wal``
beside a database is part of it.
"""
from __future__ import annotations

import os
import sqlite3
from contextlib import suppress
from pathlib import Path

from comod_platform.paths import runs_home


def install() -> None:
    """Switch every new SQLAlchemy (MLflow, Optuna) SQLite connection of this process to a database inside
    the runs folder to WAL with ``synchronous=NORMAL`` (unless switched off)."""
    if os.environ.get("COMOD_SQLITE_WAL", "1").strip().lower() in ("0", "false", "no", "off"):
        return
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    if not event.contains(Engine, "connect", _on_connect):
        event.listen(Engine, "connect", _on_connect)


def _on_connect(connection, _record) -> None:
    if not isinstance(connection, sqlite3.Connection):
        return  # a database server's connection
    with suppress(sqlite3.Error):  # a database that cannot switch now (read-only, or held by another process)
        path = next((row[2] for row in connection.execute("PRAGMA database_list") if row[1] == "main"), "")
        if not path or not Path(path).resolve().is_relative_to(runs_home()):
            return  # in memory, or someone else's database
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=NORMAL")
