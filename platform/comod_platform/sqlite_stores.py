"""The runs folder's SQLite databases in write-ahead-log mode, for the search driver.

The driver writes the embedded MLflow store and its study a commit at a time while ``comod ui`` and
``comod search status`` read them. In WAL mode readers and the writer do not wait for each other, and
with ``synchronous=NORMAL`` a process killed mid-search loses no committed write (a power cut can lose
the last few, never the file). Only databases inside the runs folder are switched; ``COMOD_SQLITE_WAL=0``
leaves them as they are (a runs folder on a network file system, where WAL cannot work). Until SQLite's
checkpoint (at the latest when the last connection closes), ``NAME-wal`` beside a database is part of it.
"""
from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from comod_platform.paths import runs_home

ENV = "COMOD_SQLITE_WAL"
"""``0`` (or ``false``, ``no``, ``off``) keeps SQLite's default journal in the runs folder."""
_installed = False


def enabled() -> bool:
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def install() -> None:
    """From now on in this process, every new SQLite connection of SQLAlchemy's (MLflow's, Optuna's) to a
    database inside the runs folder is switched to WAL with ``synchronous=NORMAL`` (unless switched off)."""
    global _installed
    if _installed or not enabled():
        return
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    event.listen(Engine, "connect", _on_connect)
    _installed = True


def _on_connect(connection, _record) -> None:
    if not isinstance(connection, sqlite3.Connection):
        return
    try:
        path = next((row[2] for row in connection.execute("PRAGMA database_list") if row[1] == "main"), "")
        if not path or not Path(path).resolve().is_relative_to(runs_home()):
            return  # in memory, or someone else's database
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=NORMAL")
    except sqlite3.Error:
        pass  # a database that cannot switch now (read-only, or another process holds it): as it is
