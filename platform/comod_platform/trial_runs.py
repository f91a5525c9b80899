"""The MLflow runs of a search's trials: found, created, re-attached, written and ended.

One child run per trial under the search's parent run, found again by its Ray trial id tag: a restored
search leaves an ended run as it is and goes on with one that was running. No Ray here: a trial is
anything with ``trial_id`` and ``config``, a checkpoint anything with ``as_directory()``.
:class:`TrialRuns` puts every write on a :class:`writer.Writer` thread (what piles up for a trial
meanwhile goes out in one write); the plain functions are the writes, on an MLflow client.
"""
from __future__ import annotations

import logging
import threading
from contextlib import suppress
from pathlib import Path

from comod_platform.conventions import (EPOCH, INTERRUPTED, PROTOCOL_KEYS, TAG_BEST_RUN, TAG_BEST_TRIAL, TAG_ERROR,
                                        TAG_KIND, TAG_PARENT, TAG_ROLE, TAG_SEARCH, TAG_STATE, TAG_STOPPED_EPOCH,
                                        TAG_TRIAL_ID, report_metrics)
from comod_platform.tracking import (all_runs, dataset_input, dataset_settings, describe_dataset, log_dataset,
                                     log_params, metric_entities, params_of)
from comod_platform.writer import Writer, transient

log = logging.getLogger(__name__)
RAY_KEYS = {"training_iteration", "time_this_iter_s", "time_total_s", "timestamp", "iterations_since_restore",
            "time_since_restore", "pid", "done"}  # Ray Tune's own keys of a result, not the trial's metrics
OWN_PLAIN = {"wall_seconds", "steps", "pretrain_seconds", "pretrain_wait_seconds"}  # final metrics without a slash
RUN_STATUS = {"completed": "FINISHED", "pruned": "FINISHED", "interrupted": "KILLED", "failed": "FAILED"}
"""A trial's run's MLflow status by its state: a pruned trial ended normally (its state tag tells)."""


def numeric_metrics(result: dict) -> dict[str, float]:
    """A trial's report as MLflow metrics: its numbers (with its ``conventions.METRICS`` text's), without
    Ray's keys, flags and the report's bookkeeping."""
    return {k: float(v) for k, v in report_metrics(result).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in RAY_KEYS
            and k not in PROTOCOL_KEYS and ("/" in k or k in OWN_PLAIN)}


def create_run(client, experiment_id: str, parent_run_id: str, search_name: str, trial_id: str, cfg,
               dataset) -> str:
    """A new child run for the trial (named by kind and trial id), with its params and dataset input."""
    run_id = client.create_run(experiment_id, run_name=f"{cfg.modulation.kind}-{trial_id}", tags={
        TAG_PARENT: parent_run_id, TAG_SEARCH: search_name, TAG_ROLE: "trial", TAG_TRIAL_ID: trial_id,
        TAG_KIND: cfg.modulation.kind, TAG_STATE: "running"}).info.run_id
    log_params(client, run_id, params_of(cfg))
    log_dataset(client, run_id, dataset)
    return run_id


def reattach_run(client, found, cfg) -> int | None:
    """A trial's run made by an earlier driver: None when it had ended (kept as it is); else it runs again,
    gets the params it lacks, and the last epoch step it logged is returned."""
    run_id, state = found.info.run_id, found.data.tags.get(TAG_STATE)
    if found.info.status in ("FINISHED", "KILLED", "FAILED") and state != INTERRUPTED:
        return None
    client.update_run(run_id, status="RUNNING")
    if state == INTERRUPTED:
        client.set_tag(run_id, TAG_STATE, "running")
    missing = {k: v for k, v in params_of(cfg).items() if k not in found.data.params}
    if missing:
        log_params(client, run_id, missing)
    return max([m.step for key in ("pretrain/train_loss", "finetune/train_loss")
                for m in client.get_metric_history(run_id, key)], default=-1)


def drop_lost_runs(client, experiment_id: str, parent_run_id: str, known: set[str]) -> None:
    """Runs of trials a lost driver started after its last snapshot (the restored search samples that work
    anew): ended, tagged ``lost`` and deleted (``mlflow runs restore`` brings one back)."""
    from mlflow.entities import ViewType

    # read whole before any is deleted: a deletion between two pages would shift the second
    for run in list(all_runs(client, experiment_id, f"tags.`{TAG_PARENT}` = '{parent_run_id}'",
                             run_view_type=ViewType.ACTIVE_ONLY)):
        trial_id = run.data.tags.get(TAG_TRIAL_ID)
        if trial_id is None or trial_id in known:
            continue
        client.set_tag(run.info.run_id, TAG_STATE, "lost")
        if run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, status="KILLED")
        client.delete_run(run.info.run_id)
        log.warning("MLflow run %s of trial %s dropped: the lost driver started it after its last snapshot, "
                    "and the resumed search runs that work again", run.info.run_id, trial_id)


def log_trial_files(client, run_id: str, folder: Path) -> None:
    """The trial's config, final metrics and plots (from its last checkpoint's folder) as artifacts."""
    for name in ("config.yaml", "metrics.json"):
        if (folder / name).exists():
            client.log_artifact(run_id, str(folder / name))
    for plot in sorted(p for p in (folder / "plots").glob("*") if p.is_file()):  # drawn by the trial
        client.log_artifact(run_id, str(plot), "plots")


def end_tags(state: str, error: str | None, last: dict) -> dict[str, str]:
    """The tags that end a trial's run: its state, the epoch it stopped at, and why it failed."""
    return {TAG_STATE: state, TAG_STOPPED_EPOCH: str(int(last.get(EPOCH, 0))), **({TAG_ERROR: error} if error else {})}


def epochs_once(batch: list, done: int) -> tuple[list, int]:
    """The metrics of ``batch`` ((Metric, per_epoch) pairs) to send, and the last epoch step then logged:
    each epoch of a trial restarted from an older checkpoint is logged once (up to ``done`` were)."""
    send, seen = [], set()
    for metric, per_epoch in batch:
        if per_epoch:
            if metric.step <= done or (metric.key, metric.step) in seen:
                continue
            seen.add((metric.key, metric.step))
        send.append(metric)
    return send, max([done, *(step for _, step in seen)])


class TrialRuns:
    """The runs of one search's trials, written from one writer thread (its only MLflow writer)."""

    def __init__(self, search, search_name: str, tracking_uri: str, experiment_id: str, parent_run_id: str):
        self.search, self.search_name = search, search_name
        self.tracking_uri, self.experiment_id, self.parent_run_id = tracking_uri, experiment_id, parent_run_id
        self._reset()

    def _reset(self) -> None:
        self._client = self._writer = self._earlier = self._base_input = None
        self._runs: dict[str, str] = {}
        self._tried: set[str] = set()  # trials whose run this driver has tried to find or make
        self._closed: set[str] = set()  # runs that had ended before this driver: left as they are
        self._logged_step: dict[str, int] = {}
        self._pending: dict[str, tuple[list, dict]] = {}  # per trial: metrics and tags waiting to be sent
        self._scheduled: set[str] = set()  # trials with a send on its way
        self._lock = threading.Lock()

    def __getstate__(self):  # pickled with the Tuner's state: no client, thread or cache
        return {k: self.__dict__[k] for k in
                ("search", "search_name", "tracking_uri", "experiment_id", "parent_run_id")}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._reset()

    @property
    def client(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    @property
    def writer(self) -> Writer:
        if self._writer is None:
            self._writer = Writer(describe=f"MLflow at {self.tracking_uri}", idle=True)
        return self._writer

    def run_id(self, trial) -> str:
        """The trial's child run, found again by tag or created now (on the writer's thread)."""
        trial_id = trial.trial_id
        if trial_id in self._runs:
            return self._runs[trial_id]
        if self._earlier is None:  # the trial runs earlier drivers made, read once
            self._earlier = {}
            for run in all_runs(self.client, self.experiment_id, f"tags.`{TAG_ROLE}` = 'trial'"):
                self._earlier.setdefault(run.data.tags.get(TAG_TRIAL_ID), run)  # a trial's newest run
        found = self._earlier.pop(trial_id, None)
        if found is None and trial_id in self._tried:
            # an earlier try failed part-way (after create_run): complete that run rather than make a second
            found = next(all_runs(self.client, self.experiment_id, f"tags.`{TAG_TRIAL_ID}` = '{trial_id}'"), None)
        self._tried.add(trial_id)
        cfg = self.search.config_for(trial.config)
        if found is None:
            run_id = create_run(self.client, self.experiment_id, self.parent_run_id, self.search_name, trial_id,
                                cfg, self._dataset_of(cfg))
        else:
            run_id, step = found.info.run_id, reattach_run(self.client, found, cfg)
            if step is None:
                self._closed.add(trial_id)
            else:
                self._logged_step[trial_id] = step
                if not found.inputs.dataset_inputs:
                    log_dataset(self.client, run_id, self._dataset_of(cfg))
        self._runs[trial_id] = run_id
        return run_id

    def _dataset_of(self, cfg):
        """The parent run's dataset input when the trial's data settings are the base's, else one
        described from the trial's config."""
        from mlflow.data import get_source

        base_cfg = self.search.base_config()
        if self._base_input is None:
            inputs = self.client.get_run(self.parent_run_id).inputs.dataset_inputs
            self._base_input = inputs[0] if inputs else dataset_input(describe_dataset(base_cfg))
            if not inputs:
                log_dataset(self.client, self.parent_run_id, self._base_input)
        same_files = cfg.data.root == base_cfg.data.root
        if same_files and dataset_settings(cfg) == dataset_settings(base_cfg):
            return self._base_input
        source = None
        if same_files and cfg.data.dataset == base_cfg.data.dataset:
            with suppress(Exception):  # a source type this MLflow does not know: describe it anew
                source = get_source(self._base_input)
        return dataset_input(describe_dataset(cfg, source=source))

    # -- what the scheduling loop queues -------------------------------------------------------------
    def start(self, trial) -> None:
        self.writer.submit(self.run_id, trial)

    def queue_metrics(self, trial, metrics: dict, step: int, per_epoch: bool = False) -> None:
        """Buffer a result's metrics (``per_epoch``: each step logged once) for the trial's next write."""
        self._queue(trial, [(m, per_epoch) for m in metric_entities(metrics, step)], {})

    def queue_tags(self, trial, tags: dict[str, str], now: bool = False) -> None:
        """Set ``tags`` with the trial's next write, or at once (with what waits) when ``now``."""
        if now:
            self.writer.submit(self._send, trial, tags)
        else:
            self._queue(trial, [], tags)

    def _queue(self, trial, metrics: list, tags: dict) -> None:
        with self._lock:
            waiting = self._pending.setdefault(trial.trial_id, ([], {}))
            waiting[0].extend(metrics)
            waiting[1].update(tags)
            if trial.trial_id in self._scheduled:
                return  # the send on its way takes these too
            self._scheduled.add(trial.trial_id)
        self.writer.submit(self._send, trial)

    def end(self, trial, state: str, error: str | None, last: dict | None, checkpoint=None) -> None:
        """End the trial's run: its tags (with what waits), its files from ``checkpoint``, its status."""
        self._queue(trial, [], end_tags(state, error, last or {}))
        self.writer.submit(self._end, trial, state, checkpoint)

    def end_interrupted(self, trial, last: dict | None) -> None:
        """A trial a stopped search left unfinished: its run (if it started) KILLED, tagged interrupted."""
        self.writer.submit(self._end_interrupted, trial, last or {})

    def drop_lost_runs(self, known: set[str]) -> None:
        self.writer.submit(drop_lost_runs, self.client, self.experiment_id, self.parent_run_id, known)

    def log_best(self, trial, metrics: dict, step: int) -> None:
        self.writer.submit(self._log_best, trial, metrics, step)

    def log_checkpoint(self, trial, checkpoint) -> None:
        self.writer.submit(self._log_checkpoint, trial, checkpoint)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every write went out (True), or ``timeout`` s passed."""
        return self._writer is None or self._writer.flush(timeout)

    def pending(self) -> int:
        return 0 if self._writer is None else self._writer.pending()

    # -- on the writer's thread ----------------------------------------------------------------------
    def _send(self, trial, tags: dict[str, str] | None = None) -> None:
        """One write of what waits for the trial (and ``tags``), if anything does."""
        from mlflow.entities import RunTag

        run_id = self.run_id(trial)
        with self._lock:
            batch, waiting = self._pending.pop(trial.trial_id, ([], {}))
            self._scheduled.discard(trial.trial_id)
        waiting = {**waiting, **(tags or {})}
        if trial.trial_id in self._closed:
            return
        send, done = epochs_once(batch, self._logged_step.get(trial.trial_id, -1))
        try:
            if send or waiting:
                self.client.log_batch(run_id, metrics=send, tags=[RunTag(k, v) for k, v in waiting.items()])
        except Exception:
            with self._lock:  # back in front, in order: the writer retries this call
                later, later_tags = self._pending.get(trial.trial_id, ([], {}))
                self._pending[trial.trial_id] = (batch + later, {**waiting, **later_tags})
            raise
        self._logged_step[trial.trial_id] = done

    def _log_best(self, trial, metrics: dict, step: int) -> None:
        """The best trial's final metrics and ids on the parent run, unless it has them (after a restore)."""
        from mlflow.entities import RunTag

        child = self.run_id(trial)
        parent = self.client.get_run(self.parent_run_id).data
        if parent.tags.get(TAG_BEST_TRIAL) == trial.trial_id and all(
                parent.metrics.get(k) == v for k, v in metrics.items()):
            return
        self.client.log_batch(self.parent_run_id, metrics=metric_entities(metrics, step),
                              tags=[RunTag(TAG_BEST_TRIAL, trial.trial_id), RunTag(TAG_BEST_RUN, child)])

    def _log_checkpoint(self, trial, checkpoint) -> None:
        if checkpoint is None:
            return
        with checkpoint.as_directory() as folder:
            if (Path(folder) / "checkpoint.pt").exists():
                self.client.log_artifact(self.run_id(trial), str(Path(folder) / "checkpoint.pt"))

    def _end_interrupted(self, trial, last: dict) -> None:
        if trial.trial_id in self._runs:
            self._send(trial, end_tags(INTERRUPTED, None, last))
            self._end(trial, INTERRUPTED)

    def _end(self, trial, state: str, checkpoint=None) -> None:
        run_id = self.run_id(trial)
        if trial.trial_id in self._closed:
            return
        if checkpoint is not None:  # the trial's last persisted checkpoint (on the search's storage)
            try:
                with checkpoint.as_directory() as folder:
                    log_trial_files(self.client, run_id, Path(folder))
            except Exception as err:  # noqa: BLE001
                if transient(err):
                    raise  # retried by the writer: the server is away, the files are not
                log.warning("artifacts of trial %s not logged: %s", trial.trial_id, err)
        self.client.set_terminated(run_id, status=RUN_STATUS[state])
