"""A cache of pretrained models, shared by runs that differ only after pretraining.

Pretraining is the costly, shared part of a search: trials that differ only
in fine-tuning settings (couplings' learning rate, fine-tuning length, the
groups opened) start from the same pretrained network. Entries are keyed by
a hash of every setting that determines pretraining, and guarded by a file
lock, so two runs never pretrain the same model: the second waits and reuses.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Callable

# The one import beyond torch, torchvision, numpy and yaml: a small pure-Python lock library that torch
# itself depends on, so it is there wherever the core runs; a hand-written fcntl lock is what it replaces.
from filelock import FileLock, Timeout

from comod.config import PRETRAIN_MODULATION, config_to_dict

DETERMINING = ("seed", "precision", "data", "model", "modulation", "pretrain")
"""Sections of the config that determine the pretrained weights. With a shared pretraining
(``pretrain.modulation_kind`` none or deterministic) only the pretraining mechanism's settings
(:data:`comod.config.PRETRAIN_MODULATION`) stand for ``modulation``: every kind fine-tunes from one file."""

PRETRAIN_CODE_VERSION = 3
"""Part of every key: raise it when a change to the code makes pretraining produce other weights from the
same settings (the mechanism, the data pipeline, the optimiser), so that old entries are not reused."""


def pretrain_key(cfg) -> str:
    raw = config_to_dict(cfg)
    relevant = {k: raw[k] for k in DETERMINING}
    kind = cfg.pretrain.modulation_kind
    if kind != "same":
        relevant["modulation"] = {"kind": kind, **{k: raw["modulation"][k] for k in PRETRAIN_MODULATION[kind]}}
    relevant["code_version"] = PRETRAIN_CODE_VERSION
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:20]


def entry_path(cache_dir: str | Path, cfg) -> Path:
    return Path(cache_dir) / f"pretrained-{pretrain_key(cfg)}.pt"


@contextlib.contextmanager
def file_lock(path: Path, on_wait: Callable[[str], None] | None = None, timeout: float | None = None,
              poll: float = 1.0):
    """An exclusive lock on ``path.lock`` across processes (:class:`filelock.FileLock`; released by the
    kernel if its holder dies). While another process holds it, ``on_wait`` gets, every ``poll`` s, a line
    naming what is waited for and who holds it (pid, host, since, from ``path.lock.json``); after
    ``timeout`` s (None: no limit) a :class:`TimeoutError` says the same."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock, holder = FileLock(f"{path}.lock"), Path(f"{path}.lock.json")
    started, wait = time.monotonic(), 0.0
    while True:
        try:
            lock.acquire(timeout=wait)
            break
        except Timeout:
            waited = time.monotonic() - started
            line = f"waiting {waited:.0f} s for {path.name}, being made by {_holder(holder)}"
            if timeout is not None and waited > timeout:
                raise TimeoutError(f"gave up after {timeout:.0f} s {line[len('waiting '):]}; if that process "
                                   f"is gone, delete {path}.lock") from None
            if on_wait:
                on_wait(line)
            wait = poll
    try:
        holder.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                      "since": time.strftime("%Y-%m-%d %H:%M:%S")}))
        yield
    finally:
        holder.unlink(missing_ok=True)
        lock.release()


def _holder(record: Path) -> str:
    try:
        who = json.loads(record.read_text() or "{}")
    except (OSError, ValueError):
        who = {}
    if not who:
        return "another process"
    return f"pid {who.get('pid')} on {who.get('host')} (since {who.get('since')})"


def set_aside(entry: Path) -> Path:
    """Move a damaged entry out of the way (kept for a look, never read again); returns its new path."""
    aside = entry.with_name(f"{entry.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
    os.replace(entry, aside)
    return aside
