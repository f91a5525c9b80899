"""Where a search keeps its state in the runs folder, and how it is found again.

``<runs>/searches/NAME/``: ``search.yaml`` (the search file as run), ``meta.json`` (ids, versions, the
search file's hash; URLs redacted, see :mod:`credentials`), ``driver.lock`` and ``driver.json`` (the one
driver's lock, and who holds it), ``optuna.db`` (the embedded study), ``ray/`` (Ray Tune's experiment),
``trials/ID/`` (each trial's outputs) and ``pretrain_cache/`` (pretrained models shared by trials)."""
from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import time
from contextlib import suppress
from dataclasses import asdict, dataclass, field, fields
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from filelock import FileLock, Timeout

from comod_platform.credentials import redact, restore
from comod_platform.paths import runs_home


class SearchNotFound(LookupError):
    pass


class SearchBusy(RuntimeError):
    """Another driver holds the search; the message names it (pid, host, since when)."""


class BadName(ValueError):
    """A search name that cannot be a folder and an experiment name; the message says what is allowed."""


def check_name(name: str) -> str:
    """``name`` when it can name a folder, an MLflow experiment, an Optuna study and a Ray job; else BadName."""
    if not isinstance(name, str) or not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$", name) or ".." in name:
        raise BadName(f"--name {name!r}: a search's name is letters, digits, '.', '_' and '-' (at most 100, "
                      f"starting with a letter or digit, no '..'), e.g. --name tiny-lr-sweep")
    return name


def default_name(stem: str) -> str:
    """A new search's name: the search file's, the time and a random suffix (two in one second differ)."""
    stem = re.sub(r"\.{2,}", ".", re.sub(r"[^A-Za-z0-9._-]", "-", stem)).strip(".-_") or "search"
    return check_name(f"{stem[:70]}-{time.strftime('%Y%m%d-%H%M%S')}-{os.urandom(3).hex()}")


def versions() -> dict[str, str]:
    """The versions of what a search's stored state depends on (recorded at its start, checked on resume)."""
    found = dict.fromkeys(("comod", "ray", "optuna", "mlflow", "torch"), "unknown")
    for package in found:
        with suppress(PackageNotFoundError):
            found[package] = version(package)
    return found


@dataclass
class SearchMeta:
    name: str
    study_name: str
    optuna_storage: str  # redacted; read_meta restores the password from COMOD_OPTUNA_STORAGE
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    ray_storage: str
    created: float
    search_id: str | None = None  # also on its experiment and study: a resume checks both are this search's
    versions: dict[str, str] = field(default_factory=dict)
    search_sha256: str | None = None  # search_hash of the search file as run
    search_settings: dict | None = None  # parsed: a resume names the first setting an edit changed


class SearchPaths:
    def __init__(self, name: str, home: Path | None = None):
        self.name = name
        self.root = (home or runs_home()) / "searches" / name

    search_file = property(lambda self: self.root / "search.yaml")
    meta_file = property(lambda self: self.root / "meta.json")
    trials = property(lambda self: self.root / "trials")
    pretrain_cache = property(lambda self: self.root / "pretrain_cache")
    ray_storage = property(lambda self: self.root / "ray")
    optuna_db = property(lambda self: self.root / "optuna.db")
    lock_file = property(lambda self: self.root / "driver.lock")
    holder_file = property(lambda self: self.root / "driver.json")
    id_file = property(lambda self: self.root / "search.id")

    def trial_dir(self, trial_id: str) -> Path:
        return self.trials / trial_id

    def exists(self) -> bool:
        return self.meta_file.exists()

    def read_meta(self) -> SearchMeta:
        if not self.exists():
            known = known_searches()
            hint = f"; searches here: {', '.join(known)}" if known else "; none has been run here yet"
            raise SearchNotFound(f"no search named {self.name!r} in {self.root.parent}{hint}")
        try:
            raw = json.loads(self.meta_file.read_text())
            meta = SearchMeta(**{f.name: raw[f.name] for f in fields(SearchMeta) if f.name in raw})
        except (ValueError, TypeError) as err:
            raise SearchNotFound(f"the search {self.name!r} has an unreadable {self.meta_file} ({err}); restore "
                                 f"it from a backup, or run the search again under another --name") from None
        meta.optuna_storage = restore(meta.optuna_storage, os.environ.get("COMOD_OPTUNA_STORAGE"))
        meta.tracking_uri = restore(meta.tracking_uri, os.environ.get("MLFLOW_TRACKING_URI"))
        return meta

    def write_meta(self, meta: SearchMeta) -> None:
        """Write ``meta`` atomically, its URLs redacted: no password reaches the disk."""
        self.root.mkdir(parents=True, exist_ok=True)
        record = {**asdict(meta), "optuna_storage": redact(meta.optuna_storage),
                  "tracking_uri": redact(meta.tracking_uri)}
        tmp = self.meta_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=2, default=str))  # a YAML date in the settings: as text
        os.replace(tmp, self.meta_file)

    def search_id(self) -> str:
        """This folder's search id, made once (a start that failed half-way finds its experiment and study)."""
        if self.id_file.exists():
            return self.id_file.read_text().strip()
        made = os.urandom(8).hex()
        self.id_file.write_text(made)
        return made

    def check_not_busy(self) -> None:
        """Raise :class:`SearchBusy` when a live driver holds the search's lock (creates nothing)."""
        if not self.lock_file.exists():
            return
        try:
            with FileLock(self.lock_file, timeout=0):
                return  # free: no live driver holds it
        except Timeout:
            raise SearchBusy(DriverLock(self, "").busy_message()) from None

    def lock(self, command: str) -> "DriverLock":
        """Take the search's driver lock (:class:`DriverLock`), or raise :class:`SearchBusy`."""
        return DriverLock(self, command).acquire()


class DriverLock:
    """The one driver of a search: a :class:`filelock.FileLock` on ``driver.lock``, released by the kernel
    when the driver's process ends, however it ends; ``driver.json`` says who holds it, for a second driver."""

    ENDING_S = 30.0  # the wait for a driver whose command (see own_session) is gone from this host: it is ending

    def __init__(self, paths: SearchPaths, command: str):
        self.paths, self.command, self.held = paths, command, None

    def acquire(self) -> "DriverLock":
        from comod_platform.own_session import driver_pid

        self.paths.root.mkdir(parents=True, exist_ok=True)
        lock = FileLock(self.paths.lock_file)
        try:  # free: taken at once; held by a driver whose command is gone: waited for while it ends
            lock.acquire(timeout=self.ENDING_S if self._holder_gone() else 0)
        except Timeout:
            raise SearchBusy(self.busy_message()) from None
        self.held = lock
        self.paths.holder_file.write_text(json.dumps({
            "pid": driver_pid(), "host": socket.gethostname(), "command": self.command,
            "since": time.strftime("%Y-%m-%d %H:%M:%S")}))
        return self

    def _holder(self) -> dict:
        try:
            return json.loads(self.paths.holder_file.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def _holder_gone(self) -> bool:
        holder = self._holder()
        try:
            os.kill(int(holder["pid"]), 0)
        except ProcessLookupError:
            return holder.get("host") == socket.gethostname()
        except (OSError, ValueError, KeyError, TypeError):
            pass
        return False

    def busy_message(self) -> str:
        holder = self._holder()
        who = (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} "
               f"({holder.get('command', 'a driver')}, since {holder.get('since', '?')})")
        return (f"search {self.paths.name!r} is being driven by {who}; two drivers of one search would "
                f"overwrite each other's trials: wait for it to end, or stop it (Ctrl-C in its terminal, or "
                f"kill -INT {holder.get('pid', 'PID')} on {holder.get('host', 'its host')}), then "
                f"`comod search resume {self.paths.name}`")

    def release(self) -> None:
        if self.held is not None:
            self.paths.holder_file.unlink(missing_ok=True)
            self.held.release()
            self.held = None

    def __enter__(self) -> "DriverLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def search_hash(settings: dict) -> str:
    """A stable hash of a search file's parsed settings (key order and formatting do not count)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def first_difference(old: dict, new: dict, prefix: str = "") -> str | None:
    """The first dotted path at which two parsed search files differ, with both values; None when equal."""
    for key in sorted(set(old) | set(new), key=str):
        a, b, path = old.get(key, "<absent>"), new.get(key, "<absent>"), f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            if found := first_difference(a, b, path + "."):
                return found
        elif a != b:
            return f"{path}: {a!r} when the search started, {b!r} now"
    return None


def known_searches() -> list[str]:
    return sorted(p.parent.name for p in (runs_home() / "searches").glob("*/meta.json"))
