"""MLflow tracking of experiments, following docs/guides/tracking.md.

The tracking URI comes from ``MLFLOW_TRACKING_URI`` (a team server), else an
embedded SQLite store in the runs folder with a local artifact folder.
Params are the flattened config (one dotted name per setting), metrics are
logged per epoch with the global step, artifacts are the config, the final
metrics and the checkpoint. A resumed run re-attaches to its MLflow run
(its id is kept beside the checkpoint) instead of starting a duplicate.
"""
from __future__ import annotations

import json
import logging
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

from comod.config import ExperimentConfig, flatten
from comod_platform.paths import runs_home

RUN_FILE = "mlflow_run.json"


class TrackingError(RuntimeError):
    """The tracking server cannot be used (unreachable, refused)."""


def _quiet():
    for name in ("alembic", "mlflow", "urllib3"):
        logging.getLogger(name).setLevel(logging.WARNING)


def embedded_uri() -> str:
    return f"sqlite:///{runs_home() / 'mlflow.db'}"


def tracking_uri() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    runs_home().mkdir(parents=True, exist_ok=True)
    return embedded_uri()


def artifact_root() -> str | None:
    """Local artifact folder for the embedded store; a server chooses its own.

    ``mlflow.set_tracking_uri`` exports ``MLFLOW_TRACKING_URI``, so the
    embedded store is recognised by its URI, not by the variable being unset."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri and uri != embedded_uri():
        return None
    return (runs_home() / "artifacts").as_uri()


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, with the fix, when an HTTP tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as response:
            response.read()
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise TrackingError(f"MLflow tracking server {uri} is unreachable ({reason}); start it "
                            f"(mlflow server --host 127.0.0.1 ...) or unset MLFLOW_TRACKING_URI to use "
                            f"the embedded store in {runs_home()}") from None


def open_store() -> str:
    """Reach the tracking store once (a fresh embedded store creates its tables here); returns its URI.

    Creates no experiment and no run, so a search can do this while Ray starts."""
    _quiet()
    from mlflow.tracking import MlflowClient

    uri = tracking_uri()
    check_reachable(uri)
    MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    return uri


def setup(experiment: str):
    """Point MLflow at the tracking store and return the experiment's id."""
    _quiet()
    import mlflow

    uri = tracking_uri()
    check_reachable(uri)
    root = artifact_root()  # before set_tracking_uri, which exports MLFLOW_TRACKING_URI
    mlflow.set_tracking_uri(uri)
    found = mlflow.get_experiment_by_name(experiment)
    if found is not None:
        return found.experiment_id
    return mlflow.create_experiment(experiment, artifact_location=root)


def log_params(client, run_id: str, params: dict[str, str]) -> None:
    """Log params in batches of MLflow's limit (100), values cut to its 6000 characters."""
    from mlflow.entities import Param

    batch = [Param(k, v[:6000]) for k, v in params.items()]
    for i in range(0, len(batch), 100):
        client.log_batch(run_id, params=batch[i:i + 100])


def params_of(cfg: ExperimentConfig) -> dict[str, str]:
    from comod_platform.conventions import param_text

    return {k: param_text(v) for k, v in flatten(cfg).items()}


class RunLogger:
    """Logs one experiment to one MLflow run (see the module docstring)."""

    def __init__(self, cfg: ExperimentConfig, out_dir: Path, experiment: str = "comod-train",
                 tags: dict[str, str] | None = None, parent_run_id: str | None = None):
        import mlflow
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        self.experiment_id = setup(experiment)
        self.client = MlflowClient()
        self.out_dir = Path(out_dir)
        run_file = self.out_dir / RUN_FILE
        run_id = None
        self.previous_status: str | None = None
        """Status of the re-attached run before this process (None: a new run)."""
        if run_file.exists():
            previous = json.loads(run_file.read_text())
            if previous.get("tracking_uri") == mlflow.get_tracking_uri():
                try:
                    found = self.client.get_run(previous["run_id"])
                except MlflowException:  # deleted from the store: start a new one
                    found = None
                if found is not None and found.info.lifecycle_stage == "active":
                    run_id, self.previous_status = found.info.run_id, found.info.status
        all_tags = {"comod.modulation_kind": cfg.modulation.kind, "comod.dataset": cfg.data.dataset,
                    **(tags or {})}
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        if run_id is not None:
            self.run_id = run_id
            if self.previous_status != "FINISHED":
                self.client.update_run(run_id, status="RUNNING")
        else:
            run = self.client.create_run(self.experiment_id, run_name=cfg.name, tags=all_tags)
            self.run_id = run.info.run_id
            log_params(self.client, self.run_id, params_of(cfg))
            self.out_dir.mkdir(parents=True, exist_ok=True)
            run_file.write_text(json.dumps({"tracking_uri": mlflow.get_tracking_uri(), "run_id": self.run_id}))

    @property
    def resumed(self) -> bool:
        return self.previous_status is not None

    def logged_steps(self) -> dict[str, set[int]]:
        """Metric name -> the steps the run already holds."""
        names = self.client.get_run(self.run_id).data.metrics
        return {k: {m.step for m in self.client.get_metric_history(self.run_id, k)} for k in names}

    def log_metrics(self, metrics: dict[str, float], step: int, skip_logged: bool = False) -> None:
        """Log ``metrics`` at ``step``; with ``skip_logged`` (a resumed run),
        leave out the names the run already holds at that step."""
        from mlflow.entities import Metric

        if skip_logged:
            done = self.logged_steps()
            metrics = {k: v for k, v in metrics.items() if step not in done.get(k, ())}
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        for i in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[i:i + 1000])

    def backfill(self, history: list[dict]) -> None:
        """Log the epochs of a checkpoint's ``history`` that the run lacks: a
        run stopped between an epoch's checkpoint and its logging resumes
        after that epoch, which would otherwise never be logged."""
        from mlflow.entities import Metric

        done = self.logged_steps()
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, entry["step"])
                 for entry in history if entry.get("phase") in ("pretrain", "finetune", "curve")
                 for k, v in entry.items() if k not in ("phase", "epoch", "step", "finetune_step")
                 and entry["step"] not in done.get(k, ())]
        for i in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[i:i + 1000])

    def log_artifacts(self, paths: list[Path], artifact_path: str | None = None) -> None:
        for path in paths:
            if Path(path).exists():
                self.client.log_artifact(self.run_id, str(path), artifact_path)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)
