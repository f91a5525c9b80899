"""The MLflow runs of a search's trials: found, created, re-attached, written and ended.

One child run per trial under the search's parent run, found again by its
Ray trial id tag (``comod.ray_trial_id``), so a restored search re-attaches to
its runs instead of duplicating them; a run that ended before the driver was
lost is left as it is, one that was running (or was interrupted) goes on. No
Ray here: a trial is anything with a ``trial_id`` and its sampled ``config``
(the Ray Tune adapter, :class:`tune_callbacks.MlflowTrialCallback`, passes
Ray's trials), a checkpoint anything with ``as_directory()``.

Every method named ``queue_*``, ``end*`` or ``log_*`` only puts a write on the
:class:`writer.Writer`'s thread, which retries it through an outage; the
calls that run there are the underscored ones. Each child run records its
dataset as an MLflow dataset input: the one the parent run holds (the base
experiment's, which the driver loaded once) when the trial's data settings
are the base experiment's, else one described from the trial's config. The
parent run carries the best completed trial's final metrics and its ids.
"""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from comod_platform.conventions import (EPOCH, FINAL_FLAG, INTERRUPTED, PROTOCOL_KEYS, TAG_BEST_RUN, TAG_BEST_TRIAL,
                                        TAG_ERROR, TAG_KIND, TAG_PARENT, TAG_ROLE, TAG_SEARCH, TAG_STATE,
                                        TAG_STOPPED_EPOCH, TAG_TRIAL_ID, report_metrics)
from comod_platform.tracking import (dataset_input, dataset_settings, describe_dataset, log_batch_chunked,
                                     log_dataset, log_params, params_of)
from comod_platform.writer import BACKGROUND_NICE, Writer, transient

log = logging.getLogger(__name__)
RAY_KEYS = {"training_iteration", "time_this_iter_s", "time_total_s", "timestamp", "iterations_since_restore",
            "time_since_restore", "pid", "done"}
"""Ray Tune's own keys of a result, which are not the trial's metrics."""
OWN_PLAIN = {"wall_seconds", "steps", "pretrain_seconds", "pretrain_wait_seconds"}
"""Our final metrics without a slash (Ray's own result keys have none either)."""


def numeric_metrics(result: dict) -> dict[str, float]:
    """A trial's report as MLflow metrics: its numbers (those Ray Tune saw and those of its
    ``conventions.METRICS`` text), without Ray's own keys, flags without a slash, and the report's
    bookkeeping (epoch, step, the final and diverged flags: the step is each metric's step, the epoch a
    tag, the end the state tag), so that a run's charts are its results."""
    return {k: float(v) for k, v in report_metrics(result).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in RAY_KEYS
            and k not in PROTOCOL_KEYS and ("/" in k or k in OWN_PLAIN)}


COALESCE_S = 1.0
"""Seconds a trial's metrics and tags wait for more before one write sends them all: each write is a
database commit, and a short trial reports its epochs within a second; the end of a trial, and of the
search, sends what waits at once."""
RUN_STATUS = {"completed": "FINISHED", "pruned": "FINISHED", "interrupted": "KILLED", "failed": "FAILED"}
"""The MLflow status a trial's run ends with, by the trial's state: a pruned trial ended normally (the
scheduler's decision, told by its state tag), so the UI does not mark it like a failure; KILLED is for a
trial that a stopped search left unfinished."""


class TrialRuns:
    def __init__(self, search, search_name: str, tracking_uri: str, experiment_id: str, parent_run_id: str,
                 coalesce_s: float = COALESCE_S):
        self.search, self.search_name, self.coalesce_s = search, search_name, coalesce_s
        self.tracking_uri, self.experiment_id, self.parent_run_id = tracking_uri, experiment_id, parent_run_id
        self._reset()

    def _reset(self) -> None:
        self._client = self._writer = None
        self._runs: dict[str, str] = {}
        self._tried: set[str] = set()  # trials whose run this driver has tried to find or make
        self._earlier: dict | None = None  # the runs an earlier driver made, not yet re-attached (run_id)
        self._artifact_uris: dict[str, str] = {}  # per run: where its artifacts go (known from its creation)
        self._closed: set[str] = set()      # runs that had ended before this driver: left as they are
        self._logged_step: dict[str, int] = {}
        self._buffered: dict[str, list] = {}   # per trial: (Metric, per_epoch) waiting to be sent
        self._tag_buffer: dict[str, dict] = {}  # per trial: tags waiting to be sent with them
        self._scheduled: dict[str, object] = {}  # trials with a send on its way: the trial
        self._due: list[tuple[float, object]] = []  # (when, trial): sends waiting for their coalescing time
        self._due_lock = threading.Condition()
        self._timer: threading.Thread | None = None
        self._buffer_lock = threading.Lock()
        self._base_input = None

    def __getstate__(self):  # pickled with the Tuner's state: no client, thread or cache
        return {k: self.__dict__[k] for k in
                ("search", "search_name", "tracking_uri", "experiment_id", "parent_run_id", "coalesce_s")}

    def __setstate__(self, state):
        self.__dict__.update({"coalesce_s": COALESCE_S, **state})
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
            self._writer = Writer(describe=f"MLflow at {self.tracking_uri}", nice=BACKGROUND_NICE, idle=True)
        return self._writer

    # -- the run of a trial --------------------------------------------------
    def run_id(self, trial) -> str:
        """The trial's child run, created on first sight or found again by tag (on the writer's thread)."""
        if trial.trial_id in self._runs:
            return self._runs[trial.trial_id]
        found = self._earlier_runs().pop(trial.trial_id, None)
        if found is None and trial.trial_id in self._tried:
            # an earlier try failed part-way (the server went away between its calls, or after taking
            # create_run but before answering it): its run may be there, to complete rather than make twice
            found = next(iter(self._all_runs(f"tags.`{TAG_TRIAL_ID}` = '{trial.trial_id}'")), None)
        self._tried.add(trial.trial_id)
        run_id = self._reattach(trial, found) if found is not None else self._create(trial)
        self._runs[trial.trial_id] = run_id
        return run_id

    def _earlier_runs(self) -> dict:
        """The trial runs of the search's experiment that this driver did not create (an earlier driver of the
        search did), by trial id, read in one search on first use: a search's runs have one writer, its
        driver, so a trial not among them is new (a query per trial was about 8 ms of the writer's CPU per
        trial here)."""
        if self._earlier is None:
            earlier = {}
            for run in self._all_runs(f"tags.`{TAG_ROLE}` = 'trial'"):  # newest first (MLflow's order)
                trial_id = run.data.tags.get(TAG_TRIAL_ID)
                if trial_id is not None:
                    earlier.setdefault(trial_id, run)  # a trial's newest run, were there two
            self._earlier = earlier
        return self._earlier

    def _all_runs(self, filter_string: str, **kwargs):
        """Every active run of the search's experiment that ``filter_string`` matches, page by page."""
        token = None
        while True:
            page = self.client.search_runs([self.experiment_id], filter_string=filter_string, max_results=1000,
                                           page_token=token, **kwargs)
            yield from page
            token = page.token
            if not token:
                return

    def _create(self, trial) -> str:
        cfg = self.search.config_for(trial.config)
        # named by what differs between rows (the search is the experiment's name already)
        run = self.client.create_run(self.experiment_id, run_name=f"{cfg.modulation.kind}-{trial.trial_id}", tags={
            TAG_PARENT: self.parent_run_id, TAG_SEARCH: self.search_name, TAG_ROLE: "trial",
            TAG_TRIAL_ID: trial.trial_id, TAG_KIND: cfg.modulation.kind, TAG_STATE: "running"})
        self._artifact_uris[run.info.run_id] = run.info.artifact_uri
        log_params(self.client, run.info.run_id, params_of(cfg))
        log_dataset(self.client, run.info.run_id, self._dataset_of(cfg))
        return run.info.run_id

    def _reattach(self, trial, found) -> str:
        run_id = found.info.run_id
        self._artifact_uris[run_id] = found.info.artifact_uri
        if found.info.status in ("FINISHED", "KILLED", "FAILED") and found.data.tags.get(TAG_STATE) != INTERRUPTED:
            self._closed.add(trial.trial_id)  # ended before the driver was lost: keep it as it is
            return run_id
        # running when the driver was lost, or interrupted: the trial goes on in this run
        self.client.update_run(run_id, status="RUNNING")
        if found.data.tags.get(TAG_STATE) == INTERRUPTED:
            self.client.set_tag(run_id, TAG_STATE, "running")
        self._logged_step[trial.trial_id] = max(  # the epochs it logged before the driver was lost
            [m.step for key in ("pretrain/train_loss", "finetune/train_loss")
             for m in self.client.get_metric_history(run_id, key)], default=-1)
        # created, but its params lost (the server went away, or the driver, right after)
        cfg = self.search.config_for(trial.config)
        missing = {k: v for k, v in params_of(cfg).items() if k not in found.data.params}
        if missing:
            log_params(self.client, run_id, missing)
        if not found.inputs.dataset_inputs:
            log_dataset(self.client, run_id, self._dataset_of(cfg))
        return run_id

    def _artifacts(self, run_id: str):
        """The run's artifact repository, from the artifact URI its creation (or the search that found it)
        returned: ``client.log_artifact`` would read the whole run (all its metrics, params and tags) back
        from the store to learn it."""
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        return get_artifact_repository(self._artifact_uris[run_id], tracking_uri=self.tracking_uri)

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

    # -- what the scheduling loop queues ----------------------------------------
    def start(self, trial) -> None:
        self.writer.submit(self.run_id, trial)

    def queue_metrics(self, trial, metrics: dict, step: int, per_epoch: bool = False) -> None:
        """Buffer a result's metrics; one write, ``coalesce_s`` later, sends everything buffered for the
        trial by then (with its tags), so epochs that come close together (or pile up while the server is
        away) go out in one batch, one database commit."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        with self._buffer_lock:
            self._buffered.setdefault(trial.trial_id, []).extend(
                (Metric(k, v, now, step), per_epoch) for k, v in metrics.items())
        self._schedule(trial)

    def queue_tags(self, trial, tags: dict[str, str], now: bool = False) -> None:
        """Set ``tags`` on the trial's run with its next batch of metrics, or in a write of their own when
        ``now`` (a trial's restart, and its move to another node, are news while it runs). A write now takes
        what waits for the trial's next batch with it, its own tags winning: a batch sent after it would set
        a tag back (a trial that moves within the coalescing time of its first report)."""
        if now:
            self.writer.submit(self._send_buffered, trial, tags)
            return
        with self._buffer_lock:
            self._tag_buffer.setdefault(trial.trial_id, {}).update(tags)
        self._schedule(trial)

    def _schedule(self, trial) -> None:
        with self._buffer_lock:
            if trial.trial_id in self._scheduled:
                return  # the write on its way takes these too
            self._scheduled[trial.trial_id] = trial
        if self.coalesce_s <= 0:
            self.writer.submit(self._send_buffered, trial)
            return
        with self._due_lock:
            self._due.append((time.monotonic() + self.coalesce_s, trial))
            if self._timer is None:  # one thread hands due sends to the writer (a thread per send costs)
                self._timer = threading.Thread(target=self._hand_over, name="comod-mlflow-coalesce", daemon=True)
                self._timer.start()
            self._due_lock.notify()

    def _hand_over(self) -> None:
        # holds no trial between hand-overs (a Ray trial freed in this thread while Ray shuts down would
        # end the process)
        while True:
            with self._due_lock:
                while not self._due:
                    self._due_lock.wait()
                wait = self._due[0][0] - time.monotonic()  # appended in time order: the first is the earliest
                if wait > 0:
                    self._due_lock.wait(wait)
                    continue
                self.writer.submit(self._send_buffered, self._due.pop(0)[1])

    def _send_waiting(self) -> None:
        """Queue the sends that wait for their coalescing time now (the end of the search)."""
        with self._due_lock:  # first: a trial scheduled after this is due again, one before is in _scheduled
            self._due.clear()
        with self._buffer_lock:
            waiting = list(self._scheduled.values())
        for trial in waiting:
            self.writer.submit(self._send_buffered, trial)

    def end(self, trial, state: str, error: str | None, last: dict | None, checkpoint=None) -> None:
        """End the trial's run with ``state`` (its tags, its artifacts from ``checkpoint``, its status)."""
        self.writer.submit(self._end, trial, state, error, last or {}, checkpoint)

    def end_interrupted(self, trial, last: dict | None) -> None:
        """The run of a trial the stopped search left unfinished (none if it never started): KILLED and
        tagged interrupted; a resume re-opens it."""
        self.writer.submit(self._end_interrupted, trial, last or {})

    def reconcile(self, trial, state: str, error: str | None, last: dict | None, checkpoint, step: int) -> None:
        """After a restore: a trial that ended before the driver was lost may have ended before its last
        writes went out; its final metrics (if it completed) and its end are written now."""
        self.writer.submit(self._reconcile, trial, state, error, last or {}, checkpoint, step)

    def drop_lost_runs(self, known: set[str]) -> None:
        self.writer.submit(self._drop_lost_runs, known)

    def log_best(self, trial, metrics: dict, step: int) -> None:
        self.writer.submit(self._log_best, trial, metrics, step)

    def log_checkpoint(self, trial, checkpoint) -> None:
        self.writer.submit(self._log_checkpoint, trial, checkpoint)

    def flush(self, timeout: float | None = None) -> bool:
        """Send everything buffered and wait until every write went out (True), or ``timeout`` s passed."""
        self._send_waiting()
        return self._writer is None or self._writer.flush(timeout)

    def pending(self) -> int:
        return 0 if self._writer is None else self._writer.pending()

    # -- writes (the writer's thread) -------------------------------------------
    def _send_buffered(self, trial, tags: dict[str, str] | None = None) -> None:
        """One write of the trial's buffered metrics and tags (and ``tags``), if there are any."""
        from mlflow.entities import RunTag

        run_id = self.run_id(trial)
        with self._buffer_lock:
            batch = self._buffered.pop(trial.trial_id, [])
            waiting = {**self._tag_buffer.pop(trial.trial_id, {}), **(tags or {})}
            self._scheduled.pop(trial.trial_id, None)
        try:
            if trial.trial_id not in self._closed:
                # a trial restarted from an older checkpoint (or from scratch) reports some epochs again:
                # each epoch's step is logged once
                # (also within one batch: a restart can report an epoch again before the first report went out)
                done = self._logged_step.get(trial.trial_id, -1)
                send, seen = [], set()
                for m, per_epoch in batch:
                    if per_epoch:
                        if m.step <= done or (m.key, m.step) in seen:
                            continue
                        seen.add((m.key, m.step))
                    send.append(m)
                steps = [m.step for m, per_epoch in batch if per_epoch]
                log_batch_chunked(self.client, run_id, metrics=send, tags=[RunTag(k, v) for k, v in waiting.items()])
                if steps:
                    self._logged_step[trial.trial_id] = max(done, *steps)
        except Exception:
            with self._buffer_lock:  # back in front, in order: the writer retries this call
                self._buffered[trial.trial_id] = batch + self._buffered.get(trial.trial_id, [])
                self._tag_buffer[trial.trial_id] = {**waiting, **self._tag_buffer.get(trial.trial_id, {})}
            raise

    def _log_metrics(self, trial, metrics: dict, step: int) -> None:
        from mlflow.entities import Metric

        run_id = self.run_id(trial)
        if trial.trial_id in self._closed:
            return
        now = int(time.time() * 1000)
        log_batch_chunked(self.client, run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def _reconcile(self, trial, state, error, last, checkpoint, step) -> None:
        self.run_id(trial)  # finds the run, and whether it ended already
        if trial.trial_id in self._closed:
            return
        if last.get(FINAL_FLAG):
            self._log_metrics(trial, numeric_metrics(last), step)
        self._end(trial, state, error, last, checkpoint)

    def _drop_lost_runs(self, known: set[str]) -> None:
        """Runs of trials that a lost driver started after its last experiment snapshot: the restored
        search never heard of them (Optuna closed theirs as failed) and samples that work anew, so they
        are ended, tagged ``lost`` and deleted (MLflow keeps deleted runs; ``mlflow runs restore``)."""
        from mlflow.entities import ViewType

        # read whole before any is deleted: a deletion between two pages would shift the second
        for run in list(self._all_runs(f"tags.`{TAG_PARENT}` = '{self.parent_run_id}'",
                                       run_view_type=ViewType.ACTIVE_ONLY)):
            trial_id = run.data.tags.get(TAG_TRIAL_ID)
            if trial_id is None or trial_id in known:
                continue
            self.client.set_tag(run.info.run_id, TAG_STATE, "lost")
            if run.info.status == "RUNNING":
                self.client.set_terminated(run.info.run_id, status="KILLED")
            self.client.delete_run(run.info.run_id)
            log.warning("MLflow run %s of trial %s dropped: the lost driver started it after its last "
                        "snapshot, and the resumed search runs that work again", run.info.run_id, trial_id)

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

    def _log_checkpoint(self, trial, checkpoint) -> None:
        if checkpoint is None:
            return
        with checkpoint.as_directory() as folder:
            path = Path(folder) / "checkpoint.pt"
            if path.exists():
                self._artifacts(self.run_id(trial)).log_artifact(str(path))

    def _end_interrupted(self, trial, last: dict) -> None:
        if trial.trial_id in self._runs:
            self._end(trial, INTERRUPTED, None, last)

    def _end(self, trial, state: str, error: str | None, last: dict, checkpoint=None) -> None:
        run_id = self.run_id(trial)
        if trial.trial_id in self._closed:
            return
        tags = {TAG_STATE: state, TAG_STOPPED_EPOCH: str(int(last.get(EPOCH, 0)))}
        if error:
            tags[TAG_ERROR] = error
        self._send_buffered(trial, tags)  # with the metrics and tags still waiting: one write
        if checkpoint is not None:  # the trial's last persisted checkpoint (on the search's storage)
            try:
                with checkpoint.as_directory() as folder:
                    out, artifacts = Path(folder), self._artifacts(run_id)
                    for name in ("config.yaml", "metrics.json"):
                        if (out / name).exists():
                            artifacts.log_artifact(str(out / name))
                    for plot in sorted(p for p in (out / "plots").glob("*") if p.is_file()):  # drawn by the trial
                        artifacts.log_artifact(str(plot), "plots")
            except Exception as err:  # noqa: BLE001
                if transient(err):
                    raise  # retried by the writer: the server is away, the files are not
                log.warning("artifacts of trial %s not logged: %s", trial.trial_id, err)
        self.client.set_terminated(run_id, status=RUN_STATUS[state])
