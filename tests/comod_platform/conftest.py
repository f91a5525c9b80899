"""Fixtures of the platform tests: an empty MLflow store made once per
session, a runs folder holding a copy of it, one torch thread, a private Ray
temp dir, and finished searches (real `comod search run`s) for tests that
read them.

The machine running the tests is small and shared, so every training run
here uses one torch thread (two threads fighting for two busy cores make a
tiny run ten times slower, not faster).
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
import yaml


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
    _remove_ray_tmps([path])


def _run_search(tmp: Path, empty_store: Path, raw: dict, name: str, args: tuple, ray_tmps: list[str]) -> dict:
    """``comod search run FILE --name NAME ARGS`` of the search file ``raw`` in a runs folder of its own
    under ``tmp`` (a copy of the empty store); Ray under a new private temp dir (appended to ``ray_tmps``),
    whose processes are killed once the command has ended."""
    from searches import run_comod, search_env
    from servers import kill_processes_mentioning

    home = tmp / "runs"
    home.mkdir()
    shutil.copy(empty_store, home / "mlflow.db")
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    ray_tmp = tempfile.mkdtemp(prefix="rs", dir="/tmp")  # short: Ray's socket paths are length-limited
    ray_tmps.append(ray_tmp)
    env = search_env(home, ray_tmp)
    try:
        done = run_comod(["search", "run", path, "--name", name, *args], env)
    finally:
        kill_processes_mentioning(ray_tmp)
    assert done.returncode == 0, done.stderr[-3000:]
    return {"name": name, "home": home, "env": env, "done": done, "tmp": tmp}


def _remove_ray_tmps(ray_tmps: list[str]) -> None:
    from servers import kill_processes_mentioning

    for path in ray_tmps:
        kill_processes_mentioning(path)  # a later command on the search may have started Ray there again
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def finished_search(tmp_path_factory, empty_store):
    """Runs a module's own search to its end: ``finished_search(raw, name, *args)`` runs ``comod search
    run`` (the console script: a real local Ray, Optuna and MLflow on SQLite) on the search file ``raw``
    and returns its ``name``, ``home`` (its runs folder), ``env`` (for further commands on it), ``done``
    (the finished command) and ``tmp`` (a folder beside the runs folder). Every Ray process under its
    temp dir is killed when the command ends and again after the module's tests."""
    ray_tmps: list[str] = []

    def run(raw: dict, name: str, *args: str) -> dict:
        return _run_search(tmp_path_factory.mktemp(name), empty_store, raw, name, args, ray_tmps)

    yield run
    _remove_ray_tmps(ray_tmps)


@pytest.fixture(scope="session")
def tiny_search(tmp_path_factory, empty_store) -> dict:
    """search_spaces/tiny.yaml as it is (4 trials), run once per session by ``comod search run --json``
    under the name ``tiny``, as :func:`finished_search` runs one; for tests that only read it (they must
    not change its runs folder: copy it first)."""
    from searches import TINY

    ray_tmps: list[str] = []
    yield _run_search(tmp_path_factory.mktemp("tiny-search"), empty_store, TINY, "tiny", ("--json",), ray_tmps)
    _remove_ray_tmps(ray_tmps)
