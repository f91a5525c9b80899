"""Ray Tune callbacks of a search: MLflow tracking and terminal progress.

Both run in the driver. The MLflow callback is the search's only MLflow
writer (no concurrent SQLite writers, no tracking code in trials) and writes
from a background thread, so neither trials nor the scheduling loop wait on
the tracking server. A child run is found again by its Ray trial id tag, so
a restored search re-attaches to its runs instead of duplicating them.
"""
from __future__ import annotations

import logging
import queue
import sys
import threading
import time
from pathlib import Path

from ray.tune import Callback

from comod_platform.tracking import log_params, params_of
from comod_platform.conventions import (FINAL_FLAG, STEP, TAG_ERROR, TAG_KIND, TAG_PARENT, TAG_ROLE, TAG_SEARCH,
                                        TAG_STATE, TAG_STOPPED_EPOCH, TAG_TRIAL_ID, EPOCH)

log = logging.getLogger(__name__)
SKIP = {"training_iteration", "time_this_iter_s", "time_total_s", "timestamp", "iterations_since_restore",
        "time_since_restore", "pid", "done"}


OWN_PLAIN = {"wall_seconds", "steps"}
"""Our final metrics without a slash (Ray's own result keys have none either)."""


def numeric_metrics(result: dict) -> dict[str, float]:
    return {k: float(v) for k, v in result.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in SKIP
            and ("/" in k or k in OWN_PLAIN)}


class _Writer:
    """A background thread that runs MLflow calls in order, retrying each a few times."""

    def __init__(self, retries: int = 5):
        self.queue: queue.Queue = queue.Queue()
        self.retries = retries
        self.thread = threading.Thread(target=self._loop, name="comod-mlflow-writer", daemon=True)
        self.thread.start()

    def submit(self, fn, *args, **kwargs) -> None:
        self.queue.put((fn, args, kwargs))

    def _loop(self) -> None:
        while True:
            fn, args, kwargs = self.queue.get()
            for attempt in range(self.retries):
                try:
                    fn(*args, **kwargs)
                    break
                except Exception as err:  # noqa: BLE001 - tracking must never kill the search
                    if attempt == self.retries - 1:
                        log.warning("MLflow call %s failed after %d tries: %s", fn.__name__, self.retries, err)
                    time.sleep(min(2 ** attempt, 10))
            self.queue.task_done()

    def flush(self) -> None:
        self.queue.join()


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

    def __getstate__(self):  # pickled with the Tuner's state: no client, thread or cache
        state = self.__dict__.copy()
        state.update(_client=None, _writer=None, _runs={}, _closed=set(), _reconciled=False)
        return state

    @property
    def client(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    @property
    def writer(self) -> _Writer:
        if self._writer is None:
            self._writer = _Writer()
        return self._writer

    def run_id(self, trial) -> str:
        """The trial's child run, created on first sight or found again by tag."""
        if trial.trial_id in self._runs:
            return self._runs[trial.trial_id]
        found = self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.`{TAG_TRIAL_ID}` = '{trial.trial_id}'", max_results=1)
        if found:
            run_id = found[0].info.run_id
            if found[0].info.status in ("FINISHED", "KILLED", "FAILED"):
                self._closed.add(trial.trial_id)  # ended before the driver was lost: keep it as it is
            else:
                self.client.update_run(run_id, status="RUNNING")
        else:
            cfg = self.search.config_for(trial.config)
            run = self.client.create_run(self.experiment_id, run_name=f"{self.search_name}-{trial.trial_id}", tags={
                TAG_PARENT: self.parent_run_id, TAG_SEARCH: self.search_name, TAG_ROLE: "trial",
                TAG_TRIAL_ID: trial.trial_id, TAG_KIND: cfg.modulation.kind, TAG_STATE: "running"})
            run_id = run.info.run_id
            log_params(self.client, run_id, params_of(cfg))
        self._runs[trial.trial_id] = run_id
        return run_id

    # -- Ray Tune hooks -------------------------------------------------
    def on_step_begin(self, iteration, trials, **info):
        # After a restore: trials that ended before the driver was lost may have
        # ended before their last MLflow writes went out; finish those runs now.
        if getattr(self, "_reconciled", False):
            return
        self._reconciled = True
        for trial in trials:
            if trial.status in ("TERMINATED", "ERROR"):
                self.writer.submit(self._reconcile, trial)

    def _reconcile(self, trial) -> None:
        self.run_id(trial)  # finds the run, and whether it ended already
        if trial.trial_id in self._closed:
            return
        last = trial.last_result or {}
        if last.get(FINAL_FLAG):
            self._log_metrics(trial, numeric_metrics(last), int(last.get(STEP, 0)))
        state = "failed" if trial.status == "ERROR" else "completed" if last.get(FINAL_FLAG) else "pruned"
        self._end(trial, state, None)

    def on_trial_start(self, iteration, trials, trial, **info):
        self.writer.submit(self.run_id, trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        metrics = numeric_metrics(result)
        if not result.get(FINAL_FLAG):  # per-epoch aliases repeat pretrain/val/..., finetune/val/...
            metrics = {k: v for k, v in metrics.items() if not k.startswith("val/")}
        step = int(result.get(STEP, result.get("training_iteration", 0)))
        self.writer.submit(self._log_metrics, trial, metrics, step)

    def on_trial_complete(self, iteration, trials, trial, **info):
        final = bool((trial.last_result or {}).get(FINAL_FLAG))
        self.writer.submit(self._end, trial, "completed" if final else "pruned", None)

    def on_trial_error(self, iteration, trials, trial, **info):
        message = ""
        if getattr(trial, "error_file", None) and Path(trial.error_file).exists():
            message = Path(trial.error_file).read_text().strip().splitlines()[-1][:500]
        self.writer.submit(self._end, trial, "failed", message)

    def on_experiment_end(self, trials, **info):
        best = sorted((t for t in trials if (t.last_result or {}).get(FINAL_FLAG)),
                      key=self._score, reverse=True)[:self.keep_checkpoints]
        for trial in best:
            self.writer.submit(self._log_checkpoint, trial)
        self.flush()

    def _score(self, trial) -> float:
        value = float((trial.last_result or {}).get(self.metric, float("nan")))
        return value if self.mode == "max" else -value

    def _log_checkpoint(self, trial) -> None:
        path = Path(self.trials_root) / trial.trial_id / "checkpoint.pt"
        if path.exists():
            self.client.log_artifact(self.run_id(trial), str(path))

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    # -- writes (background thread) -------------------------------------
    def _log_metrics(self, trial, metrics: dict, step: int) -> None:
        from mlflow.entities import Metric

        run_id = self.run_id(trial)
        if trial.trial_id in self._closed:
            return
        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, step) for k, v in metrics.items()]
        for i in range(0, len(batch), 1000):
            self.client.log_batch(run_id, metrics=batch[i:i + 1000])

    def _end(self, trial, state: str, error: str | None) -> None:
        run_id = self.run_id(trial)
        if trial.trial_id in self._closed:
            return
        last = trial.last_result or {}
        tags = {TAG_STATE: state, TAG_STOPPED_EPOCH: str(int(last.get(EPOCH, 0)))}
        if error:
            tags[TAG_ERROR] = error
        for key, value in tags.items():
            self.client.set_tag(run_id, key, value)
        out = Path(self.trials_root) / trial.trial_id
        try:
            for name in ("config.yaml", "metrics.json"):
                if (out / name).exists():
                    self.client.log_artifact(run_id, str(out / name))
            for plot in sorted((out / "plots").glob("*.png")):  # drawn by the trial itself
                self.client.log_artifact(run_id, str(plot), "plots")
        except Exception as err:  # noqa: BLE001 - a missing plot must not leave the run open
            log.warning("artifacts of trial %s not logged: %s", trial.trial_id, err)
        status = {"completed": "FINISHED", "pruned": "KILLED", "failed": "FAILED"}[state]
        self.client.set_terminated(run_id, status=status)


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
        if self.best is None:
            return True
        return value > self.best[0] if self.mode == "max" else value < self.best[0]

    def _print(self, trials) -> None:
        counts = {"RUNNING": 0, "TERMINATED": 0, "ERROR": 0, "PENDING": 0, "PAUSED": 0}
        pruned = 0
        for t in trials:
            counts[t.status] = counts.get(t.status, 0) + 1
            if t.status == "TERMINATED" and not (t.last_result or {}).get(FINAL_FLAG):
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
        self._print(trials)


__all__ = ["MlflowTrialCallback", "ProgressCallback", "numeric_metrics"]
