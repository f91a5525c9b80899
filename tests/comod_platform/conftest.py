"""Fixtures of the platform tests: an empty MLflow store made once per
session, a runs folder holding a copy of it, and one torch thread.

The machine running the tests is small and shared, so every training run
here uses one torch thread (two threads fighting for two busy cores make a
tiny run ten times slower, not faster).
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory) -> Path:
    """An MLflow SQLite file with its tables made (MLflow's migrations take
    seconds); tests copy it instead of migrating their own."""
    path = tmp_path_factory.mktemp("store") / "mlflow.db"
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def home(tmp_path, empty_store, monkeypatch) -> Path:
    """A runs folder holding a copy of the empty store; also $COMOD_HOME of
    this process (for tests that call the command in-process)."""
    path = tmp_path / "runs"
    path.mkdir()
    shutil.copy(empty_store, path / "mlflow.db")
    monkeypatch.setenv("COMOD_HOME", str(path))
    monkeypatch.setenv("COMOD_DOWNLOAD", "0")
    return path


@pytest.fixture
def one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def ray_tmp():
    """A private Ray temp dir (short: Ray's socket paths are length-limited);
    every Ray process started under it is killed afterwards."""
    path = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    yield path
    from servers import kill_processes_mentioning

    kill_processes_mentioning(path)
    shutil.rmtree(path, ignore_errors=True)
