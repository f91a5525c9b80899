"""Ray Tune callbacks of a search: MLflow tracking and terminal progress.

Both run in the driver. :class:`MlflowTrialCallback` adapts Ray Tune's hooks to :class:`trial_runs.TrialRuns`
(the search's only MLflow writer); it decides what needs Ray's view of the trials: outcomes, the best trial
(for the parent run), the trials a stopped search left unfinished, and the checkpoints kept.
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
from collections import Counter
from contextlib import suppress
from pathlib import Path

from ray.tune import Callback

from comod_platform import interrupts
from comod_platform.conventions import (CURVE, DIVERGED_FLAG, EPOCH, FINAL_FLAG, GPUS, NODE, REASON, STEP, TAG_EPOCHS,
                                        TAG_ERROR, TAG_GPUS, TAG_NODE, TAG_REPORTS, TAG_RETRIES, better, outcome)
from comod_platform.trial_runs import TrialRuns, numeric_metrics
from comod_platform.writer import FLUSH_TIMEOUT_ENV

log = logging.getLogger(__name__)
PARENT_METRIC_PREFIXES = ("val/mean_", "test/mean_")  # the best trial's metrics on the parent (and the search's)


def _error_line(trial) -> str:
    path = getattr(trial, "error_file", None)
    with suppress(OSError, IndexError):  # none, or empty
        return Path(path).read_text().strip().splitlines()[-1][:500] if path else ""
    return ""


def _outcome(trial) -> tuple[str, str | None]:
    """(state, reason) of a trial that ended."""
    last = trial.last_result or {}
    state = outcome(last, errored=trial.status == "ERROR")
    if trial.status == "ERROR":
        return state, _error_line(trial)
    return state, (str(last.get(REASON, "diverged"))[:500] if state == "failed" else None)


class MlflowTrialCallback(Callback):
    def __init__(self, search, search_name: str, tracking_uri: str, experiment_id: str, parent_run_id: str,
                 keep_checkpoints: int = 3):
        self.runs = TrialRuns(search, search_name, tracking_uri, experiment_id, parent_run_id)
        self.keep_checkpoints = keep_checkpoints
        self.metric, self.mode = search.search.metric, search.search.mode
        self._reset()

    def _reset(self) -> None:
        self._started: set[str] = set()  # trials started, and trials ended, by this driver
        self._ended: set[str] = set()
        self._where: dict[str, tuple] = {}
        self._curve_step: dict[str, int] = {}
        self._reconciled = False
        self._best: str | None = None

    def __getstate__(self):  # pickled with the Tuner's state: the runs' settings, no thread or cache
        return {k: self.__dict__[k] for k in ("runs", "metric", "mode", "keep_checkpoints")}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._reset()

    # -- Ray Tune hooks -------------------------------------------------
    def on_step_begin(self, iteration, trials, **info):
        # after a restore: trials that ended while the driver was lost may lack their last writes
        if self._reconciled:
            return
        self._reconciled = True
        self.runs.drop_lost_runs({trial.trial_id for trial in trials})
        for trial in trials:
            if trial.status in ("TERMINATED", "ERROR"):
                last = trial.last_result or {}
                if last.get(FINAL_FLAG):
                    self.runs.queue_metrics(trial, numeric_metrics(last), int(last.get(STEP, 0)))
                self.runs.end(trial, *_outcome(trial), last, trial.checkpoint)

    def on_trial_start(self, iteration, trials, trial, **info):
        self._started.add(trial.trial_id)
        self.runs.start(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if result.get(CURVE):  # learning-curve points between epoch ends, at their own steps, each once
            done = self._curve_step.get(trial.trial_id, -1)
            for step, point in json.loads(result[CURVE]):
                if step > done:
                    self.runs.queue_metrics(trial, point, int(step))
                    self._curve_step[trial.trial_id] = done = step
        final = result.get(FINAL_FLAG)
        if final:
            self._consider_best(trials, trial, result)
        # an epoch's aliases (val/...) repeat its pretrain/val/... or finetune/val/...
        metrics = {k: v for k, v in numeric_metrics(result).items() if final or not k.startswith("val/")}
        step = int(result.get(STEP, result.get("training_iteration", 0)))
        self.runs.queue_metrics(trial, metrics, step, per_epoch=not final and not result.get(DIVERGED_FLAG))
        # the report's bookkeeping, as tags with its metrics (the step is theirs already)
        self.runs.queue_tags(trial, {TAG_EPOCHS: str(int(result.get(EPOCH, 0))),
                                     TAG_REPORTS: str(int(result.get("training_iteration", 0)))})
        where = (result.get(NODE), result.get(GPUS))
        if where[0] and self._where.get(trial.trial_id) != where:  # first report, or restarted elsewhere
            moved = trial.trial_id in self._where  # first: with the trial's metrics; a move is news at once
            self._where[trial.trial_id] = where
            self.runs.queue_tags(trial, {TAG_NODE: str(where[0]), TAG_GPUS: str(where[1] or "")}, now=moved)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._ended.add(trial.trial_id)
        self.runs.end(trial, *_outcome(trial), trial.last_result, trial.checkpoint)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._ended.add(trial.trial_id)
        self.runs.end(trial, "failed", _error_line(trial), trial.last_result, trial.checkpoint)

    def on_trial_recover(self, iteration, trials, trial, **info):
        # restarted from its last checkpoint (Ray's FailureConfig); the run goes on
        self.runs.queue_tags(trial, {TAG_RETRIES: str(getattr(trial.run_metadata, "num_failures", "?")),
                                     TAG_ERROR: f"restarted after: {_error_line(trial)}"}, now=True)

    def on_experiment_end(self, trials, **info):
        self._consider_best(trials)  # a restored search whose trials had all ended: its parent gets them too
        if interrupts.requested():  # Ctrl-C or SIGTERM: the trials that had not ended end as interrupted
            for trial in trials:  # (Ray's clean-up has marked them TERMINATED by now: their own end counts)
                last = trial.last_result or {}
                alive = trial.trial_id in self._started and trial.trial_id not in self._ended
                if (alive or trial.status in ("PENDING", "PAUSED")) and not last.get(FINAL_FLAG) \
                        and not last.get(DIVERGED_FLAG):
                    interrupts.unfinished.add(trial.trial_id)
                    self.runs.end_interrupted(trial, last)
        finals = [t for t in trials if (t.last_result or {}).get(FINAL_FLAG)]
        for trial in sorted(finals, key=lambda t: self._signed(t.last_result), reverse=True)[:self.keep_checkpoints]:
            self.runs.log_checkpoint(trial, trial.checkpoint)
        if not self.runs.flush(float(os.environ.get(FLUSH_TIMEOUT_ENV, 900))):
            log.warning("MLflow at %s stayed unreachable: %d writes not sent; `comod search resume %s` "
                        "finishes the runs once it is back", self.runs.tracking_uri, self.runs.pending(),
                        self.runs.search_name)

    def _signed(self, last: dict) -> float:
        """The search's metric in ``last``, larger is better (NaN when absent)."""
        value = last.get(self.metric)
        value = float(value) if isinstance(value, (int, float)) else float("nan")
        return value if self.mode == "max" else -value

    def _consider_best(self, trials, current=None, result=None) -> None:
        """When the best completed trial changed, queue its final metrics and ids for the parent run, at the
        step of the number of trials completed so far (the parent's history: the best after each completion)."""
        lasts = {t.trial_id: (t, t.last_result or {}) for t in trials}
        if current is not None:  # its report, which its last result may not be yet
            lasts[current.trial_id] = (current, result)
        finals = [(signed, trial, last) for trial, last in lasts.values()
                  if last.get(FINAL_FLAG) and not math.isnan(signed := self._signed(last))]
        if not finals:
            return
        _, trial, last = max(finals, key=lambda entry: entry[0])
        if trial.trial_id == self._best:
            return
        self._best = trial.trial_id
        metrics = {k: v for k, v in numeric_metrics(last).items()
                   if k == self.metric or k.startswith(PARENT_METRIC_PREFIXES)}
        self.runs.log_best(trial, metrics, len(finals))


class ProgressCallback(Callback):
    """One status line per change: trials running, done, pruned, failed; best so far."""

    def __init__(self, metric: str, mode: str, total: int, stream=None):
        self.metric, self.mode, self.total, self.stream = metric, mode, total, stream
        self.best: tuple[float, str] | None = None
        self.last_line = ""

    def __getstate__(self):
        return {**self.__dict__, "stream": None}

    def _print(self, trials) -> None:
        counts, pruned = Counter(), 0
        for t in trials:
            last = t.last_result or {}
            diverged = t.status == "TERMINATED" and last.get(DIVERGED_FLAG)  # a recorded reason: a failure
            counts["ERROR" if diverged else t.status] += 1
            pruned += t.status == "TERMINATED" and not diverged and not last.get(FINAL_FLAG)
        best = f"; best {self.metric}={self.best[0]:.4f} ({self.best[1]})" if self.best else ""
        line = (f"[search] {counts['RUNNING']} running, {counts['TERMINATED']} done ({pruned} stopped early), "
                f"{counts['ERROR']} failed, of {self.total}{best}")
        if line != self.last_line:
            print(line, file=self.stream or sys.stderr, flush=True)
            self.last_line = line

    def on_trial_result(self, iteration, trials, trial, result, **info):
        value = result.get(self.metric)
        if result.get(FINAL_FLAG) and isinstance(value, (int, float)) \
                and (self.best is None or better(value, self.best[0], self.mode)):
            self.best = (float(value), trial.trial_id)
        self._print(trials)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._print(trials)

    on_trial_error = on_trial_complete

    def on_experiment_end(self, trials, **info):
        if not interrupts.requested():  # a stopped search's trials all read TERMINATED now: its summary counts
            self._print(trials)
