"""What the tests that run real searches share: the repository, the tiny search file, the environment of
a `comod` subprocess, and a search's MLflow runs and Optuna study read back."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
TINY = yaml.safe_load((REPO / "search_spaces" / "tiny.yaml").read_text())
"""search_spaces/tiny.yaml as data: a seconds-long search on synthetic data."""
COMOD = Path(sys.executable).parent / "comod"
"""The console script, as a user runs it."""

SCRUBBED = ("RAY_ADDRESS", "RAY_AUTH_MODE", "COMOD_VERBOSE", "COMOD_OPTUNA_STORAGE", "COMOD_STORAGE")
"""Settings of the caller's shell that would send a test's search elsewhere (with every ``MLFLOW_*``)."""


def search_env(home: Path, ray_tmp: str | None = None, tracking_uri: str | None = None, **extra: str) -> dict:
    """The environment of a `comod` subprocess on the runs folder ``home``: the embedded stores unless
    ``tracking_uri`` is given, no downloads, Ray's files under ``ray_tmp`` when given, then ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_") and k not in SCRUBBED}
    env.update(COMOD_HOME=str(home), COMOD_DOWNLOAD="0", PYTHONUNBUFFERED="1")
    if ray_tmp:
        env["RAY_TMPDIR"] = ray_tmp
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    env.update(extra)
    return env


def run_comod(args: list, env: dict, timeout: float = 900) -> subprocess.CompletedProcess:
    """``comod ARGS`` through the console script, from the repository root."""
    return subprocess.run([str(COMOD), *map(str, args)], env=env, capture_output=True, text=True, timeout=timeout,
                          cwd=REPO)


def search_runs(client, search: str) -> tuple[list, list]:
    """(parent runs, child runs) of search ``search``'s MLflow experiment."""
    from comod_platform.conventions import TAG_ROLE

    exp = client.get_experiment_by_name(f"search/{search}")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get(TAG_ROLE) == "search"]
    return parents, [r for r in runs if r.data.tags.get(TAG_ROLE) == "trial"]


def search_study(home: Path, search: str):
    """The Optuna study of search ``search`` in the runs folder ``home``."""
    import optuna

    meta = json.loads((home / "searches" / search / "meta.json").read_text())
    return optuna.load_study(study_name=meta["study_name"], storage=meta["optuna_storage"])
