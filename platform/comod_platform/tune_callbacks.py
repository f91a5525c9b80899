"""Ray Tune callbacks of a search: MLflow tracking and terminal progress.

Both run in the driver. The MLflow callback is the search's only MLflow
writer (no concurrent SQLite writers, no tracking code in trials) and writes
from a background thread, so neither trials nor the scheduling loop wait on
the tracking server. A child run is found again by its Ray trial id tag, so
a restored search re-attaches to its runs instead of duplicating them.

Each child run records its dataset as an MLflow dataset input: the one the
parent run holds (the base experiment's, which the driver loaded once) when
the trial's data settings are the base experiment's, else one described from
the trial's config. The parent run carries the best completed trial's final
metrics (``val/mean_*``, ``test/mean_*`` and the search's metric) and its ids.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from pathlib import Path

from ray.tune import Callback

from comod_platform import interrupts
from comod_platform.writer import FLUSH_TIMEOUT_ENV, Writer, retry_call, transient  # noqa: F401 - re-exported

from comod_platform.tracking import (dataset_input, dataset_settings, describe_dataset, log_dataset, log_params,
                                     params_of)
from comod_platform.conventions import (CURVE, DIVERGED_FLAG, EPOCH, FINAL_FLAG, GPUS, INTERRUPTED, NODE, REASON,
                                        STEP, TAG_ERROR,
                                        TAG_GPUS, TAG_KIND, TAG_NODE, TAG_PARENT, TAG_RETRIES, TAG_ROLE, TAG_SEARCH, TAG_STATE,
                                        TAG_STOPPED_EPOCH, TAG_TRIAL_ID, better, outcome)

log = logging.getLogger(__name__)
SKIP = {"training_iteration", "time_this_iter_s", "time_total_s", "timestamp", "iterations_since_restore",
        "time_since_restore", "pid", "done"}


OWN_PLAIN = {"wall_seconds", "steps"}
"""Our final metrics without a slash (Ray's own result keys have none either)."""


def numeric_metrics(result: dict) -> dict[str, float]:
    return {k: float(v) for k, v in result.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in SKIP
            and ("/" in k or k in OWN_PLAIN)}


TAG_BEST_TRIAL = "comod.best_trial"
"""On the parent run: the Ray trial id of the best completed trial so far (by the search's metric)."""
TAG_BEST_RUN = "comod.best_run_id"
"""On the parent run: the MLflow run id of that trial."""
PARENT_METRIC_PREFIXES = ("val/mean_", "test/mean_")
"""The best trial's final metrics that the parent run carries (with the search's metric)."""


class MlflowTrialCallback(Callback):
    def __init__(self, search, search_name: str, tracking_uri: str, experiment_id: str, parent_run_id: str,
                 trials_root: str, keep_checkpoints: int = 3):
        self.search, self.search_name = search, search_name
        self.tracking_uri, self.experiment_id, self.parent_run_id = tracking_uri, experiment_id, parent_run_id
        self.trials_root = trials_root
        self.metric, self.mode = search.search.metric, search.search.mode
        self.keep_checkpoints = keep_checkpoints
        self._client = self._writer = None
        self._runs: dict[str, str] = {}
        self._closed: set[str] = set()
        self._started: set[str] = set()  # trials started, and trials ended, by this driver
        self._ended: set[str] = set()
        self._where: dict[str, tuple] = {}
        self._logged_step: dict[str, int] = {}
        self._curve_step: dict[str, int] = {}
        self._buffered: dict[str, list] = {}
        self._scheduled: set[str] = set()
        self._buffer_lock = threading.Lock()
        self._base_input = None
        self._best: str | None = None

    def __getstate__(self):  # pickled with the Tuner's state: no client, thread or cache
        state = self.__dict__.copy()
        state.update(_client=None, _writer=None, _runs={}, _closed=set(), _started=set(), _ended=set(), _where={},
                     _logged_step={},
                     _curve_step={}, _buffered={}, _scheduled=set(), _buffer_lock=None, _reconciled=False,
                     _base_input=None, _best=None)
        return state

    def __setstate__(self, state):
        self.__dict__.update({"_started": set(), "_ended": set(), **state})  # a callback pickled before these
        self._buffer_lock = threading.Lock()

    @property
    def client(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    @property
    def writer(self) -> Writer:
        if self._writer is None:
            self._writer = Writer(describe=f"MLflow at {self.tracking_uri}")
        return self._writer

    def run_id(self, trial) -> str:
        """The trial's child run, created on first sight or found again by tag."""
        if trial.trial_id in self._runs:
            return self._runs[trial.trial_id]
        found = self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.`{TAG_TRIAL_ID}` = '{trial.trial_id}'", max_results=1)
        if found:
            run_id = found[0].info.run_id
            if found[0].info.status in ("FINISHED", "KILLED", "FAILED") \
                    and found[0].data.tags.get(TAG_STATE) != INTERRUPTED:
                self._closed.add(trial.trial_id)  # ended before the driver was lost: keep it as it is
            else:  # running when the driver was lost, or interrupted: the trial goes on in this run
                self.client.update_run(run_id, status="RUNNING")
                if found[0].data.tags.get(TAG_STATE) == INTERRUPTED:
                    self.client.set_tag(run_id, TAG_STATE, "running")
                self._logged_step[trial.trial_id] = max(  # the epochs it logged before the driver was lost
                    [m.step for key in ("pretrain/train_loss", "finetune/train_loss")
                     for m in self.client.get_metric_history(run_id, key)], default=-1)
                # created, but its params lost (the server went away, or the driver, right after)
                cfg = self.search.config_for(trial.config)
                missing = {k: v for k, v in params_of(cfg).items() if k not in found[0].data.params}
                if missing:
                    log_params(self.client, run_id, missing)
                if not found[0].inputs.dataset_inputs:
                    log_dataset(self.client, run_id, self._dataset_of(cfg))
        else:
            cfg = self.search.config_for(trial.config)
            run = self.client.create_run(self.experiment_id, run_name=f"{self.search_name}-{trial.trial_id}", tags={
                TAG_PARENT: self.parent_run_id, TAG_SEARCH: self.search_name, TAG_ROLE: "trial",
                TAG_TRIAL_ID: trial.trial_id, TAG_KIND: cfg.modulation.kind, TAG_STATE: "running"})
            run_id = run.info.run_id
            log_params(self.client, run_id, params_of(cfg))
            log_dataset(self.client, run_id, self._dataset_of(cfg))
        self._runs[trial.trial_id] = run_id
        return run_id

    def _dataset_of(self, cfg):
        """The trial's dataset input: the parent run's (the base experiment's dataset, as the driver loaded
        it) when the trial's data settings are the base's; else described from the trial's config."""
        base = self._base_dataset()
        base_cfg = self.search.base_config()
        if dataset_settings(cfg) == dataset_settings(base_cfg) and cfg.data.root == base_cfg.data.root:
            return base
        source = None
        if cfg.data.dataset == base_cfg.data.dataset and cfg.data.root == base_cfg.data.root:
            from mlflow.data import get_dataset_source_from_json  # the same files: the base's source

            try:
                source = get_dataset_source_from_json(base.dataset.source, base.dataset.source_type)
            except Exception:  # noqa: BLE001 - a source type this MLflow does not know: describe it anew
                source = None
        return dataset_input(describe_dataset(cfg, source=source))

    def _base_dataset(self):
        """The parent run's dataset input (``DatasetInput``), read once; a parent without one (a search
        started before runs recorded datasets) gets it now, described from the base experiment's config."""
        if self._base_input is None:
            inputs = self.client.get_run(self.parent_run_id).inputs.dataset_inputs
            if inputs:
                self._base_input = inputs[0]
            else:
                self._base_input = dataset_input(describe_dataset(self.search.base_config()))
                log_dataset(self.client, self.parent_run_id, self._base_input)
        return self._base_input

    # -- Ray Tune hooks -------------------------------------------------
    def on_step_begin(self, iteration, trials, **info):
        # After a restore: trials that ended before the driver was lost may have
        # ended before their last MLflow writes went out; finish those runs now.
        if getattr(self, "_reconciled", False):
            return
        self._reconciled = True
        self.writer.submit(self._drop_lost_runs, {trial.trial_id for trial in trials})
        for trial in trials:
            if trial.status in ("TERMINATED", "ERROR"):
                self.writer.submit(self._reconcile, trial)

    def _drop_lost_runs(self, known: set[str]) -> None:
        """Runs of trials that a lost driver started after its last experiment snapshot: the restored
        search never heard of them (Optuna closed theirs as failed) and samples that work anew, so they
        are ended, tagged ``lost`` and deleted (MLflow keeps deleted runs; ``mlflow runs restore``)."""
        from mlflow.entities import ViewType

        token = None
        while True:
            page = self.client.search_runs([self.experiment_id], run_view_type=ViewType.ACTIVE_ONLY,
                                           filter_string=f"tags.`{TAG_PARENT}` = '{self.parent_run_id}'",
                                           max_results=1000, page_token=token)
            for run in page:
                trial_id = run.data.tags.get(TAG_TRIAL_ID)
                if trial_id is None or trial_id in known:
                    continue
                self.client.set_tag(run.info.run_id, TAG_STATE, "lost")
                if run.info.status == "RUNNING":
                    self.client.set_terminated(run.info.run_id, status="KILLED")
                self.client.delete_run(run.info.run_id)
                log.warning("MLflow run %s of trial %s dropped: the lost driver started it after its last "
                            "snapshot, and the resumed search runs that work again", run.info.run_id, trial_id)
            token = page.token
            if not token:
                return

    def _reconcile(self, trial) -> None:
        self.run_id(trial)  # finds the run, and whether it ended already
        if trial.trial_id in self._closed:
            return
        last = trial.last_result or {}
        if last.get(FINAL_FLAG):
            self._log_metrics(trial, numeric_metrics(last), int(last.get(STEP, 0)))
        state, reason = self._outcome(trial)
        self._end(trial, state, reason, trial.checkpoint)

    def on_trial_start(self, iteration, trials, trial, **info):
        self._started.add(trial.trial_id)
        self.writer.submit(self.run_id, trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if result.get(CURVE):  # learning-curve points between epoch ends, at their own steps, each once
            done = self._curve_step.get(trial.trial_id, -1)
            for step, point in json.loads(result[CURVE]):
                if step > done:
                    self._queue_metrics(trial, point, int(step))
                    self._curve_step[trial.trial_id] = done = step
        metrics = numeric_metrics(result)
        if not result.get(FINAL_FLAG):  # per-epoch aliases repeat pretrain/val/..., finetune/val/...
            metrics = {k: v for k, v in metrics.items() if not k.startswith("val/")}
        else:
            self._consider_best(trials, trial, result)
        step = int(result.get(STEP, result.get("training_iteration", 0)))
        per_epoch = not result.get(FINAL_FLAG) and not result.get(DIVERGED_FLAG)
        self._queue_metrics(trial, metrics, step, per_epoch)
        where = (result.get(NODE), result.get(GPUS))
        if where[0] and self._where.get(trial.trial_id) != where:  # first report, or restarted elsewhere
            self._where[trial.trial_id] = where
            self.writer.submit(self._tags, trial, {TAG_NODE: str(where[0]), TAG_GPUS: str(where[1] or "")})

    @staticmethod
    def _outcome(trial) -> tuple[str, str | None]:
        """(state, reason) of a trial that ended."""
        last = trial.last_result or {}
        state = outcome(last, errored=trial.status == "ERROR")
        if trial.status == "ERROR":
            return state, _error_line(trial)
        return state, (str(last.get(REASON, "diverged"))[:500] if state == "failed" else None)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._ended.add(trial.trial_id)
        state, reason = self._outcome(trial)
        self.writer.submit(self._end, trial, state, reason, trial.checkpoint)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._ended.add(trial.trial_id)
        self.writer.submit(self._end, trial, "failed", _error_line(trial), trial.checkpoint)

    def on_trial_recover(self, iteration, trials, trial, **info):
        # restarted from its last checkpoint (Ray's FailureConfig); the run goes on
        retries = getattr(trial.run_metadata, "num_failures", None)
        self.writer.submit(self._tags, trial, {TAG_RETRIES: str(retries if retries is not None else "?"),
                                               TAG_ERROR: f"restarted after: {_error_line(trial)}"})

    def on_experiment_end(self, trials, **info):
        self._consider_best(trials)  # a restored search whose trials had all ended: its parent gets them too
        if interrupts.requested():  # Ctrl-C or SIGTERM: the trials that had not ended end as interrupted
            for trial in trials:  # (Ray's clean-up has marked them TERMINATED by now: their own end counts)
                last = trial.last_result or {}
                alive = trial.trial_id in self._started and trial.trial_id not in self._ended
                if (alive or trial.status in ("PENDING", "PAUSED")) and not last.get(FINAL_FLAG) \
                        and not last.get(DIVERGED_FLAG):
                    interrupts.unfinished.add(trial.trial_id)
                    self.writer.submit(self._end_interrupted, trial)
        best = sorted((t for t in trials if (t.last_result or {}).get(FINAL_FLAG)),
                      key=self._score, reverse=True)[:self.keep_checkpoints]
        for trial in best:
            self.writer.submit(self._log_checkpoint, trial, trial.checkpoint)
        timeout = float(os.environ.get(FLUSH_TIMEOUT_ENV, 900))
        if self._writer is not None and not self._writer.flush(timeout):
            log.warning("MLflow at %s stayed unreachable: %d writes not sent; `comod search resume %s` "
                        "finishes the runs once it is back", self.tracking_uri, self._writer.pending(),
                        self.search_name)

    def _score(self, trial) -> float:
        value = float((trial.last_result or {}).get(self.metric, float("nan")))
        return value if self.mode == "max" else -value

    def _consider_best(self, trials, current=None, result=None) -> None:
        """When the best completed trial (by the search's metric) changed, queue its final metrics and ids
        for the parent run, at the step of the number of trials completed so far (so the parent's history
        of the metric is the best after each completion). Reads the trials' last results only, in the
        scheduling loop; the write goes out from the writer thread."""
        finals = []
        for trial in trials:
            last = result if trial is current else (trial.last_result or {})
            value = last.get(self.metric)
            if last.get(FINAL_FLAG) and isinstance(value, (int, float)) and value == value:
                finals.append((float(value) if self.mode == "max" else -float(value), trial, last))
        if current is not None and all(t is not current for _, t, _ in finals) and result.get(FINAL_FLAG):
            value = result.get(self.metric)  # a trial that the list does not hold (yet)
            if isinstance(value, (int, float)) and value == value:
                finals.append((float(value) if self.mode == "max" else -float(value), current, result))
        if not finals:
            return
        _, trial, last = max(finals, key=lambda entry: entry[0])
        if trial.trial_id == self._best:
            return
        self._best = trial.trial_id
        metrics = {k: v for k, v in numeric_metrics(last).items()
                   if k == self.metric or k.startswith(PARENT_METRIC_PREFIXES)}
        self.writer.submit(self._log_best, trial, metrics, len(finals))

    def _log_checkpoint(self, trial, checkpoint) -> None:
        if checkpoint is None:
            return
        with checkpoint.as_directory() as folder:
            path = Path(folder) / "checkpoint.pt"
            if path.exists():
                self.client.log_artifact(self.run_id(trial), str(path))

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    # -- writes (background thread) -------------------------------------
    def _queue_metrics(self, trial, metrics: dict, step: int, per_epoch: bool = False) -> None:
        """Buffer a result's metrics; one write sends everything buffered for the trial by then, so a
        busy writer (or a server away) coalesces epochs into fewer batches (each a database commit)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        with self._buffer_lock:
            self._buffered.setdefault(trial.trial_id, []).extend(
                (Metric(k, v, now, step), per_epoch) for k, v in metrics.items())
            if trial.trial_id in self._scheduled:
                return  # the write already queued will take these too
            self._scheduled.add(trial.trial_id)
        self.writer.submit(self._send_buffered, trial)

    def _send_buffered(self, trial) -> None:
        run_id = self.run_id(trial)
        with self._buffer_lock:
            batch = self._buffered.pop(trial.trial_id, [])
            self._scheduled.discard(trial.trial_id)
        try:
            if trial.trial_id not in self._closed:
                # a trial restarted from an older checkpoint (or from scratch) reports some epochs again:
                # each epoch's step is logged once
                done = self._logged_step.get(trial.trial_id, -1)
                send = [m for m, per_epoch in batch if not per_epoch or m.step > done]
                steps = [m.step for m, per_epoch in batch if per_epoch]
                for i in range(0, len(send), 1000):
                    self.client.log_batch(run_id, metrics=send[i:i + 1000])
                if steps:
                    self._logged_step[trial.trial_id] = max(done, *steps)
        except Exception:
            with self._buffer_lock:  # back in front, in order: the writer retries this call
                self._buffered[trial.trial_id] = batch + self._buffered.get(trial.trial_id, [])
                self._scheduled.add(trial.trial_id)
            raise

    def _log_metrics(self, trial, metrics: dict, step: int) -> None:
        from mlflow.entities import Metric

        run_id = self.run_id(trial)
        if trial.trial_id in self._closed:
            return
        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, step) for k, v in metrics.items()]
        for i in range(0, len(batch), 1000):
            self.client.log_batch(run_id, metrics=batch[i:i + 1000])

    def _log_best(self, trial, metrics: dict, step: int) -> None:
        """The best trial's final metrics and ids on the parent run (unless it has them already: a
        restored search's driver considers the trials that had ended before it)."""
        from mlflow.entities import Metric, RunTag

        child = self.run_id(trial)
        parent = self.client.get_run(self.parent_run_id).data
        if parent.tags.get(TAG_BEST_TRIAL) == trial.trial_id and all(
                parent.metrics.get(k) == v for k, v in metrics.items()):
            return
        now = int(time.time() * 1000)
        self.client.log_batch(self.parent_run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()],
                              tags=[RunTag(TAG_BEST_TRIAL, trial.trial_id), RunTag(TAG_BEST_RUN, child)])

    def _tags(self, trial, tags: dict[str, str]) -> None:
        """Set ``tags`` on the trial's run in one write."""
        from mlflow.entities import RunTag

        run_id = self.run_id(trial)
        if trial.trial_id not in self._closed:
            self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])

    def _end_interrupted(self, trial) -> None:
        """The run of a trial the stopped search left unfinished (none if it never started): KILLED and
        tagged interrupted; a resume re-opens it."""
        if trial.trial_id in self._runs:
            self._end(trial, "interrupted", None)

    def _end(self, trial, state: str, error: str | None, checkpoint=None) -> None:
        run_id = self.run_id(trial)
        if trial.trial_id in self._closed:
            return
        last = trial.last_result or {}
        tags = {TAG_STATE: state, TAG_STOPPED_EPOCH: str(int(last.get(EPOCH, 0)))}
        if error:
            tags[TAG_ERROR] = error
        self._tags(trial, tags)
        if checkpoint is not None:  # the trial's last persisted checkpoint (on the search's storage)
            try:
                with checkpoint.as_directory() as folder:
                    out = Path(folder)
                    for name in ("config.yaml", "metrics.json"):
                        if (out / name).exists():
                            self.client.log_artifact(run_id, str(out / name))
                    for plot in sorted((out / "plots").glob("*.png")):  # drawn by the trial itself
                        self.client.log_artifact(run_id, str(plot), "plots")
            except Exception as err:  # noqa: BLE001
                if transient(err):
                    raise  # retried by the writer: the server is away, the files are not
                log.warning("artifacts of trial %s not logged: %s", trial.trial_id, err)
        status = {"completed": "FINISHED", "pruned": "KILLED", "interrupted": "KILLED", "failed": "FAILED"}[state]
        self.client.set_terminated(run_id, status=status)


def _error_line(trial) -> str:
    path = getattr(trial, "error_file", None)
    try:
        if path and Path(path).exists():
            return Path(path).read_text().strip().splitlines()[-1][:500]
    except OSError:
        pass
    return ""


class ProgressCallback(Callback):
    """One status line per change: trials running, done, pruned, failed; best so far."""

    def __init__(self, metric: str, mode: str, total: int, stream=None):
        self.metric, self.mode, self.total = metric, mode, total
        self.stream = stream
        self.best: tuple[float, str] | None = None
        self.last_line = ""

    def __getstate__(self):
        state = self.__dict__.copy()
        state["stream"] = None
        return state

    def _better(self, value: float) -> bool:
        return self.best is None or better(value, self.best[0], self.mode)

    def _print(self, trials) -> None:
        counts = {"RUNNING": 0, "TERMINATED": 0, "ERROR": 0, "PENDING": 0, "PAUSED": 0}
        pruned = 0
        for t in trials:
            last = t.last_result or {}
            if t.status == "TERMINATED" and last.get(DIVERGED_FLAG):
                counts["ERROR"] += 1  # ended with a recorded reason: a failure, not a result
                continue
            counts[t.status] = counts.get(t.status, 0) + 1
            if t.status == "TERMINATED" and not last.get(FINAL_FLAG):
                pruned += 1
        best = f"; best {self.metric}={self.best[0]:.4f} ({self.best[1]})" if self.best else ""
        line = (f"[search] {counts['RUNNING']} running, {counts['TERMINATED']} done ({pruned} stopped early), "
                f"{counts['ERROR']} failed, of {self.total}{best}")
        if line != self.last_line:
            print(line, file=self.stream or sys.stderr, flush=True)
            self.last_line = line

    def on_trial_result(self, iteration, trials, trial, result, **info):
        value = result.get(self.metric)
        if result.get(FINAL_FLAG) and isinstance(value, (int, float)) and self._better(value):
            self.best = (float(value), trial.trial_id)
        self._print(trials)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._print(trials)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._print(trials)

    def on_experiment_end(self, trials, **info):
        if not interrupts.requested():  # a stopped search's trials all read TERMINATED now: its summary counts
            self._print(trials)


__all__ = ["MlflowTrialCallback", "ProgressCallback", "numeric_metrics"]
