"""One search trial on a Ray worker: the experiment, reported to Ray Tune from the training thread.

Every epoch is reported with its validation metrics under the search's names (``pretrain/val/mean_f1`` also as
``val/mean_f1``, one curve across both phases) and the trial's epoch count, the scheduler's clock. The last
report carries the last epoch, the test metrics and the final flag together, so a scheduler cannot stop a trial
between them. Epoch checkpoints go to Ray Tune (persisted at most every ``search.checkpoint_interval_s``), so a
restarted trial continues from its last one. A diverging loss or a time limit (:mod:`watchdog`) ends the trial
with the diverged flag and the reason. The dataset comes through the object store when the trial's data
settings are the base experiment's.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import torch

from comod.config import config_to_dict
from comod.data.taskdata import Split, TaskData
from comod_platform.conventions import CURVE, DIVERGED_FLAG, EPOCH, FINAL_FLAG, GPUS, NODE, REASON, STEP, pack_report
from comod_platform.search_state import SearchPaths
from comod_platform.watchdog import TrialTimeout, Watchdog


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


CHECKPOINT_FILES = ("checkpoint.pt", "config.yaml")
FINAL_FILES = CHECKPOINT_FILES + ("metrics.json", "plots")


def _stage(out: Path, names: tuple[str, ...]) -> Path:
    """A new folder holding ``names`` from ``out``, for one Ray checkpoint: hard links where possible,
    which keep this epoch's files even after the next epoch replaces them (checkpoints are written to
    a temporary name, then renamed)."""
    folder = Path(tempfile.mkdtemp(prefix="comod-ckpt-"))
    for name in names:
        src = out / name
        if src.is_dir():
            shutil.copytree(src, folder / name)
        elif src.is_file():
            try:
                os.link(src, folder / name)
            except OSError:
                shutil.copy2(src, folder / name)
    return folder


def _report_to_tune(row: dict, folder: Path | None, metric: str) -> None:
    """One report to Ray Tune, its metrics packed (:func:`conventions.pack_report`), with ``folder`` (then
    deleted) as its checkpoint if given."""
    from ray import tune

    try:
        tune.report(pack_report(row, metric), checkpoint=tune.Checkpoint.from_directory(folder) if folder else None)
    finally:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)


class TrialRun:
    """The experiment's callbacks in one trial (see the module's docstring)."""

    def __init__(self, search, cfg, trial_id: str, out: Path):
        import ray

        self.search, self.cfg, self.trial_id, self.out = search, cfg, trial_id, out
        self.metric = search.search.metric
        self.watchdog = Watchdog(search.search.trial_timeout_s, search.search.stall_timeout_s)
        self.where = {NODE: ray.get_runtime_context().get_node_id(), GPUS: ",".join(map(str, ray.get_gpu_ids()))}
        self.epochs = self.step = 0
        self.fresh, self.payload = False, None  # a checkpoint written since the last report; the last one's payload
        self.persisted, self.said = time.monotonic(), 0.0
        self.last: dict = {}  # the last epoch's row, sent with the final report
        self.held = None  # pretraining's last epoch (row, folder), until fine-tuning says whether it is the last
        self.curve: list = []  # validation points between epoch ends, sent with the next report

    def row(self, metrics: dict) -> dict:  # ``pretrain/val/X`` and ``finetune/val/X`` also as ``val/X``
        aliases = {key.partition("/")[2]: value for key, value in metrics.items()
                   if key.startswith(("pretrain/val/", "finetune/val/"))}
        return {**metrics, **aliases, STEP: self.step, EPOCH: self.epochs, **self.where}

    def with_curve(self, row: dict) -> dict:
        if self.curve:
            row[CURVE] = json.dumps(self.curve)
            self.curve.clear()
        return row

    def on_checkpoint(self, path, payload) -> None:
        self.fresh, self.payload = True, payload  # the last one is the final checkpoint, the plots' source

    def on_wait(self, line: str) -> None:  # another trial is making the pretrained model this one needs
        self.watchdog.alive()
        if time.monotonic() - self.said > 60:
            print(f"comod: trial {self.trial_id} {line}", flush=True)
            self.said = time.monotonic()

    def on_epoch(self, phase: str, epoch: int, step: int, metrics: dict) -> None:
        self.watchdog.alive()
        self.epochs = epoch + (self.cfg.pretrain.epochs if phase == "finetune" else 0)
        self.step = step
        last = epoch == getattr(self.cfg, phase).epochs
        if last and phase == "finetune":
            # the last epoch goes out with the final report: a scheduler deciding at this epoch (an ASHA
            # rung on the last epoch) must not stop a trial between its training and its test metrics
            self.last = self.row(metrics)
            return
        row = self.with_curve(self.row(metrics))
        # a replayed epoch (pretrained model from the cache) has nothing new to keep; an epoch soon after
        # the last persisted one is kept locally only (the next persisted one, or the final, covers it)
        folder = None
        if self.fresh and time.monotonic() - self.persisted >= self.search.search.checkpoint_interval_s:
            self.persisted = time.monotonic()
            folder = _stage(self.out, CHECKPOINT_FILES)
        self.fresh = False
        if last:  # pretraining's last epoch: the trial's last too when fine-tuning has no epochs (on_phase)
            self.held = (row, folder)
        else:
            _report_to_tune(row, folder, self.metric)

    def on_phase(self, name: str, first_epoch: int, epochs: int) -> None:
        """Fine-tuning starts: pretraining's last epoch goes out now, unless fine-tuning has nothing to
        train (the kind without couplings), which makes it the trial's last epoch, sent with the final."""
        if name != "finetune" or self.held is None:
            return
        (row, folder), self.held = self.held, None
        if epochs > first_epoch:
            _report_to_tune(row, folder, self.metric)
            return
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
        self.last = {k: v for k, v in row.items() if k != CURVE}
        if CURVE in row:
            self.curve[:0] = json.loads(row[CURVE])

    def run(self, data, resumed: bool, paths: SearchPaths) -> None:
        from comod.train import Callbacks, DivergedError, run_experiment
        from comod_platform.plots import gain_images

        callbacks = Callbacks(on_epoch=self.on_epoch, on_checkpoint=self.on_checkpoint, on_step=self.watchdog.alive,
                              on_wait=self.on_wait, on_phase=self.on_phase,
                              on_eval=lambda phase, step, metrics: self.curve.append([step, metrics]))
        try:
            with self.watchdog:
                metrics = run_experiment(self.cfg, self.out, data=data, callbacks=callbacks, resume=resumed,
                                         pretrain_cache=paths.pretrain_cache,
                                         cache_wait_s=self.search.search.trial_timeout_s)
        except (DivergedError, TrialTimeout, TimeoutError) as err:  # recorded ends, not crashes: not retried
            reason = self.watchdog.reason if isinstance(err, TrialTimeout) and self.watchdog.reason else str(err)
            _report_to_tune({DIVERGED_FLAG: 1, REASON: reason, self.metric: float("nan"), STEP: self.step,
                             EPOCH: self.epochs, **self.where}, None, self.metric)
            return
        if not self.epochs:  # a finished run read back: its epochs were reported before
            self.epochs = self.cfg.pretrain.epochs + self.cfg.finetune.epochs
        gain_images(self.out, checkpoint=self.payload)  # the curves are MLflow's charts of the metrics
        final = self.with_curve({**self.last, **metrics, FINAL_FLAG: 1, STEP: int(metrics.get("steps", 0)),
                                 EPOCH: self.epochs, **self.where})
        _report_to_tune(final, _stage(self.out, FINAL_FILES), self.metric)


def run_trial(config: dict, search=None, search_name: str = "", home: str = "", data=None,
              shared_key: str = "") -> None:
    """Ray Tune's function trainable: the experiment of ``config`` in the search's ``trials/ID`` folder."""
    from ray import tune

    cfg = search.config_for(config)
    trial_id = tune.get_context().get_trial_id()
    paths = SearchPaths(search_name, Path(home))
    out = paths.trial_dir(trial_id)
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:  # the authority: the local folder may be missing or hold unreported epochs
        checkpoint.to_directory(str(out))
    shared = unpack(data) if data is not None and data_key(cfg) == shared_key else None
    TrialRun(search, cfg, trial_id, out).run(shared, checkpoint is not None, paths)
