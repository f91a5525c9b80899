"""Where a search keeps its state in the runs folder, and how it is found again.

``<runs>/searches/NAME/``: ``search.yaml`` (the search file as run),
``meta.json`` (study, storage and MLflow ids), ``optuna.db`` (the Optuna
study, embedded default), ``ray/`` (Ray Tune's experiment), ``trials/ID/``
(each trial's outputs, from which an interrupted trial resumes) and
``pretrain_cache/`` (pretrained models shared by trials).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from comod_platform.paths import runs_home


class SearchNotFound(LookupError):
    pass


@dataclass
class SearchMeta:
    name: str
    study_name: str
    optuna_storage: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    ray_storage: str
    created: float


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

    def trial_dir(self, trial_id: str) -> Path:
        return self.trials / trial_id

    def exists(self) -> bool:
        return self.meta_file.exists()

    def read_meta(self) -> SearchMeta:
        if not self.exists():
            known = known_searches()
            hint = f"; searches here: {', '.join(known)}" if known else "; none has been run here yet"
            raise SearchNotFound(f"no search named {self.name!r} in {self.root.parent}{hint}")
        return SearchMeta(**json.loads(self.meta_file.read_text()))

    def write_meta(self, meta: SearchMeta) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.meta_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(meta), indent=2))
        os.replace(tmp, self.meta_file)


def known_searches(home: Path | None = None) -> list[str]:
    folder = (home or runs_home()) / "searches"
    return sorted(p.parent.name for p in folder.glob("*/meta.json"))
