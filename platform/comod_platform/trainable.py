"""One search trial on a Ray worker: the experiment, reported to Ray Tune.

Every epoch is reported with its validation metrics under the search's
names (``pretrain/val/mean_f1`` also as ``val/mean_f1``, so a scheduler sees
one curve across both phases) and the trial's own epoch count, which the
scheduler uses as its clock (Ray's iteration count restarts when a trial is
restored; the epoch count does not). The last report carries the final
metrics and the final flag. The trial's outputs live in the search's
``trials/ID`` folder: a trial restarted after an interruption resumes from
its own checkpoint there, so Ray needs no checkpoint of its own. Plots are
drawn here, on the trial's reserved CPU, not in the driver.

The dataset arrives through the Ray object store as numpy arrays (zero-copy
on a node), loaded once by the driver, when the trial's data settings are
the base experiment's; other data settings are loaded by the trial itself.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import torch

from comod.config import config_to_dict
from comod.data.taskdata import Split, TaskData
from comod.train import Callbacks, run_experiment
from comod_platform.conventions import EPOCH, FINAL_FLAG, STEP
from comod_platform.search_state import SearchPaths


def data_key(cfg) -> str:
    return hashlib.sha256(json.dumps(config_to_dict(cfg.data), sort_keys=True).encode()).hexdigest()[:16]


def pack(data: TaskData) -> dict:
    """TaskData as plain numpy arrays, which the object store shares without copies."""
    splits = {name: {"images": getattr(data, name).images.numpy(), "labels": getattr(data, name).labels.numpy()}
              for name in ("train", "val", "test")}
    return {"name": data.name, "tasks": data.tasks, "splits": splits, "mean": data.mean, "std": data.std,
            "info": data.info}


def unpack(packed: dict) -> TaskData:
    with warnings.catch_warnings():  # object-store arrays are read-only; training never writes to them
        warnings.simplefilter("ignore", UserWarning)
        splits = {name: Split(torch.from_numpy(s["images"]), torch.from_numpy(s["labels"]))
                  for name, s in packed["splits"].items()}
    return TaskData(packed["name"], list(packed["tasks"]), splits["train"], splits["val"], splits["test"],
                    tuple(packed["mean"]), tuple(packed["std"]), dict(packed["info"]))


def _with_aliases(metrics: dict) -> dict:
    row = dict(metrics)
    for key, value in metrics.items():
        phase, _, rest = key.partition("/")
        if phase in ("pretrain", "finetune") and rest.startswith("val/"):
            row[rest] = value
    return row


def run_trial(config: dict, search=None, search_name: str = "", home: str = "", data=None,
              shared_key: str = "") -> None:
    from ray import tune

    from comod_platform.plots import plot_run

    cfg = search.config_for(config)
    trial_id = tune.get_context().get_trial_id()
    paths = SearchPaths(search_name, Path(home))
    out = paths.trial_dir(trial_id)
    shared = unpack(data) if data is not None and data_key(cfg) == shared_key else None
    epochs_done = {"n": 0}

    def report(phase: str, epoch: int, step: int, metrics: dict) -> None:
        epochs_done["n"] = epoch + (cfg.pretrain.epochs if phase == "finetune" else 0)
        tune.report({**_with_aliases(metrics), STEP: step, EPOCH: epochs_done["n"]})

    metrics = run_experiment(cfg, out, data=shared, callbacks=Callbacks(on_epoch=report),
                             pretrain_cache=paths.pretrain_cache)
    if not epochs_done["n"]:  # a finished run read back: its epochs were reported before
        epochs_done["n"] = cfg.pretrain.epochs + cfg.finetune.epochs
    plot_run(out)
    tune.report({**metrics, FINAL_FLAG: 1, STEP: int(metrics.get("steps", 0)), EPOCH: epochs_done["n"]})
