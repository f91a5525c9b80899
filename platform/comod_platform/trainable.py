"""One search trial on a Ray worker: the experiment, reported to Ray Tune.

Every epoch is reported with its validation metrics under the search's
names (``pretrain/val/mean_f1`` also as ``val/mean_f1``, so a scheduler sees
one curve across both phases) and the trial's own epoch count, which the
scheduler uses as its clock (Ray's iteration count restarts when a trial is
restored; the epoch count does not). The last report carries the last
epoch's metrics, the final (test) metrics and the final flag together, so a
scheduler that decides at the last epoch cannot stop a trial before its test
metrics are recorded. Ray Tune sees the search's metric and the protocol's keys as values of their own,
the other metrics as one JSON text (``conventions.METRICS``, :func:`conventions.pack_report`), which
keeps its experiment snapshots small. The trial works in the search's ``trials/ID``
folder; an epoch's checkpoint (with the config) goes to Ray Tune as the
trial's checkpoint, which Ray persists to the search's storage (a shared
mount or S3 on a cluster), whenever ``search.checkpoint_interval_s`` has
passed since the last one. A trial restarted (after a crash, on another
node after a node was lost, or after the driver was lost) continues from
that last persisted epoch. The final checkpoint also holds the final metrics and
the plots, which the driver logs to MLflow from there. Plots are drawn here,
on the trial's reserved CPU, not in the driver. A diverging loss, or a trial
past ``search.trial_timeout_s`` or ``search.stall_timeout_s`` (:mod:`watchdog`),
ends the trial with a report carrying the diverged flag (a recorded failure,
not retried) and the reason.

Reports go to Ray Tune from a thread of the trial's own (:mod:`reporter`),
so training does not wait while the driver handles each epoch; a trial the
scheduler stops ends at its next optimisation step.

The dataset arrives through the Ray object store as numpy arrays (zero-copy
on a node), loaded once by the driver, when the trial's data settings are
the base experiment's; other data settings are loaded by the trial itself.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import warnings
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch

from comod.config import config_to_dict
from comod.data.taskdata import Split, TaskData
from comod_platform.conventions import CURVE, DIVERGED_FLAG, EPOCH, FINAL_FLAG, GPUS, NODE, REASON, STEP, pack_report
from comod_platform.reporter import EpochReporter
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


def _with_aliases(metrics: dict) -> dict:
    row = dict(metrics)
    for key, value in metrics.items():
        phase, _, rest = key.partition("/")
        if phase in ("pretrain", "finetune") and rest.startswith("val/"):
            row[rest] = value
    return row


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


@contextmanager
def _staged(out: Path, names: tuple[str, ...]):
    folder = _stage(out, names)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _report_to_tune(row: dict, folder: Path | None, metric: str) -> None:
    """One report to Ray Tune, its metrics packed (:func:`conventions.pack_report`), with ``folder`` as
    its checkpoint if given."""
    from ray import tune

    tune.report(pack_report(row, metric),
                checkpoint=tune.Checkpoint.from_directory(folder) if folder is not None else None)


def _stopping_signal():
    """Whether Ray has asked this trial's training to stop (its session's stop event), or None."""
    try:
        from ray.train._internal.session import get_session

        event = get_session().stop_event
    except Exception:  # noqa: BLE001 - another Ray: the reporting thread still learns it at a report
        return None
    return event.is_set


def _restore(checkpoint, out: Path) -> bool:
    """Put the trial's last persisted checkpoint (if any) into ``out``; True if there was one.

    Ray's checkpoint is the authority: the local folder may be missing (another
    node) or hold epochs whose reports never reached the driver."""
    if checkpoint is None:
        return False
    out.mkdir(parents=True, exist_ok=True)
    with checkpoint.as_directory() as folder:
        for name in os.listdir(folder):
            src, dst = Path(folder) / name, out / name
            if src.is_dir():
                shutil.rmtree(dst, ignore_errors=True)
                shutil.copytree(src, dst)
            else:
                tmp = dst.with_name(dst.name + ".tmp")
                shutil.copyfile(src, tmp)
                os.replace(tmp, dst)
    return True


def _placement() -> dict:
    import ray

    return {NODE: ray.get_runtime_context().get_node_id(), GPUS: ",".join(str(g) for g in ray.get_gpu_ids())}


def run_trial(config: dict, search=None, search_name: str = "", home: str = "", data=None,
              shared_key: str = "") -> None:
    from ray import tune

    from comod.train import Callbacks, DivergedError, run_experiment
    from comod_platform.plots import plot_run

    cfg = search.config_for(config)
    trial_id = tune.get_context().get_trial_id()
    paths = SearchPaths(search_name, Path(home))
    out = paths.trial_dir(trial_id)
    resumed = _restore(tune.get_checkpoint(), out)
    shared = unpack(data) if data is not None and data_key(cfg) == shared_key else None
    state = {"epochs": 0, "step": 0, "fresh": False, "persisted": time.monotonic()}
    interval = search.search.checkpoint_interval_s
    where = _placement()

    def on_checkpoint(path, payload) -> None:
        state["fresh"] = True
        state["payload"] = payload  # the last one is the final checkpoint, which the plots are drawn from

    reporter = EpochReporter(partial(_report_to_tune, metric=search.search.metric), _stopping_signal())
    curve: list = []  # validation points between epoch ends, sent with the next report

    def with_curve(row: dict) -> dict:
        if curve:
            row[CURVE] = json.dumps(curve)
            curve.clear()
        return row

    def report(phase: str, epoch: int, step: int, metrics: dict) -> None:
        state["epochs"] = epoch + (cfg.pretrain.epochs if phase == "finetune" else 0)
        state["step"] = step
        last = epoch == getattr(cfg, phase).epochs
        if last and phase == "finetune":
            # the last epoch goes out with the final report: a scheduler deciding at this epoch (an ASHA
            # rung on the last epoch) must not stop a trial between its training and its test metrics
            state["last"] = {**_with_aliases(metrics), STEP: step, EPOCH: state["epochs"], **where}
            return
        row = with_curve({**_with_aliases(metrics), STEP: step, EPOCH: state["epochs"], **where})
        fresh, state["fresh"] = state["fresh"], False
        # a replayed epoch (pretrained model from the cache) has nothing new to keep; an epoch soon after
        # the last persisted one is kept locally only (the next persisted one, or the final, covers it)
        folder = None
        if fresh and time.monotonic() - state["persisted"] >= interval:
            state["persisted"] = time.monotonic()
            folder = _stage(out, CHECKPOINT_FILES)
        if last:  # pretraining's last epoch: the trial's last too when fine-tuning has no epochs (phase())
            state["held"] = (row, folder)
            return
        reporter.submit(row, folder)

    def phase(name: str, first_epoch: int, epochs: int) -> None:
        """Fine-tuning starts: pretraining's last epoch goes out now, unless fine-tuning has nothing to
        train (the kind without couplings), which makes it the trial's last epoch, sent with the final."""
        held = state.pop("held", None) if name == "finetune" else None
        if held is None:
            return
        if epochs > first_epoch:
            reporter.submit(*held)
        else:
            row, folder = held
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)
            state["last"] = {k: v for k, v in row.items() if k != CURVE}
            if CURVE in row:
                curve[:0] = json.loads(row[CURVE])

    watchdog = Watchdog(search.search.trial_timeout_s, search.search.stall_timeout_s)
    said = {"at": 0.0}

    def waiting(line: str) -> None:  # another trial is making the pretrained model this one needs
        watchdog.alive()
        if time.monotonic() - said["at"] > 60:
            print(f"comod: trial {trial_id} {line}", flush=True)
            said["at"] = time.monotonic()

    def stepped(*_) -> None:
        watchdog.alive()
        reporter.check()

    def reported(phase: str, epoch: int, step: int, metrics: dict) -> None:
        watchdog.alive()
        report(phase, epoch, step, metrics)

    callbacks = Callbacks(on_epoch=reported, on_checkpoint=on_checkpoint, on_step=stepped, on_wait=waiting,
                          on_phase=phase,
                          on_eval=lambda phase, step, metrics: curve.append([step, metrics]))
    try:
        with watchdog:
            metrics = run_experiment(cfg, out, data=shared, callbacks=callbacks, resume=resumed,
                                     pretrain_cache=paths.pretrain_cache,
                                     cache_wait_s=search.search.trial_timeout_s)
    except (DivergedError, TrialTimeout, TimeoutError) as err:  # recorded ends, not crashes: not retried
        reporter.close()
        reason = watchdog.reason if isinstance(err, TrialTimeout) and watchdog.reason else str(err)
        _report_to_tune({DIVERGED_FLAG: 1, REASON: reason, search.search.metric: float("nan"), STEP: state["step"],
                         EPOCH: state["epochs"], **where}, None, search.search.metric)
        return
    except BaseException:
        reporter.abandon()
        raise
    reporter.close()  # every epoch's report went out before the final one
    if not state["epochs"]:  # a finished run read back: its epochs were reported before
        state["epochs"] = cfg.pretrain.epochs + cfg.finetune.epochs
    plot_run(out, checkpoint=state.get("payload"))
    final = with_curve({**state.get("last", {}), **metrics, FINAL_FLAG: 1, STEP: int(metrics.get("steps", 0)),
                        EPOCH: state["epochs"], **where})
    with _staged(out, FINAL_FILES) as folder:
        _report_to_tune(final, folder, search.search.metric)
