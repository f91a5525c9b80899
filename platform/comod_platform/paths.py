"""Where the embedded default keeps everything: one local runs folder.

``$COMOD_HOME`` if set, else ``./comod-runs``. It holds the MLflow SQLite
store (``mlflow.db``) and artifact folder (``artifacts/``), and training
outputs (``train/NAME-TIME/``).
"""
from __future__ import annotations

import os
import time
from pathlib import Path


def runs_home() -> Path:
    return Path(os.environ.get("COMOD_HOME", "comod-runs")).resolve()


def default_train_dir(name: str) -> Path:
    return runs_home() / "train" / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
