"""A cache of pretrained models, shared by runs that differ only after pretraining.

Pretraining is the costly, shared part of a search: trials that differ only
in fine-tuning settings (couplings' learning rate, fine-tuning length, the
groups opened) start from the same pretrained network. Entries are keyed by
a hash of every setting that determines pretraining, and guarded by a file
lock, so two runs never pretrain the same model: the second waits and reuses.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
from pathlib import Path

from comod.config import config_to_dict

DETERMINING = ("seed", "precision", "data", "model", "modulation", "pretrain")
"""Sections of the config that determine the pretrained weights."""


def pretrain_key(cfg) -> str:
    raw = config_to_dict(cfg)
    relevant = {k: raw[k] for k in DETERMINING}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:20]


def entry_path(cache_dir: str | Path, cfg) -> Path:
    return Path(cache_dir) / f"pretrained-{pretrain_key(cfg)}.pt"


@contextlib.contextmanager
def file_lock(path: Path):
    """An exclusive advisory lock on ``path.lock`` (works across processes on one
    file system, including NFS with lockd)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(path.suffix + ".lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
