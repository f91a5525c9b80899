"""MLflow tracking of experiments, following design.md's conventions.

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


def tracking_uri() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    home = runs_home()
    home.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{home / 'mlflow.db'}"


def artifact_root() -> str | None:
    """Local artifact folder for the embedded store; a server chooses its own."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
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


def setup(experiment: str):
    """Point MLflow at the tracking store and return the experiment's id."""
    _quiet()
    import mlflow

    uri = tracking_uri()
    check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    found = mlflow.get_experiment_by_name(experiment)
    if found is not None:
        return found.experiment_id
    return mlflow.create_experiment(experiment, artifact_location=artifact_root())


def params_of(cfg: ExperimentConfig) -> dict[str, str]:
    return {k: json.dumps(v) if isinstance(v, (list, dict)) else str(v) for k, v in flatten(cfg).items()}


class RunLogger:
    """Logs one experiment to one MLflow run (see the module docstring)."""

    def __init__(self, cfg: ExperimentConfig, out_dir: Path, experiment: str = "comod-train",
                 tags: dict[str, str] | None = None, parent_run_id: str | None = None):
        import mlflow
        from mlflow.tracking import MlflowClient

        self.experiment_id = setup(experiment)
        self.client = MlflowClient()
        self.out_dir = Path(out_dir)
        run_file = self.out_dir / RUN_FILE
        run_id = None
        if run_file.exists():
            previous = json.loads(run_file.read_text())
            if previous.get("tracking_uri") == mlflow.get_tracking_uri():
                run_id = previous["run_id"]
        all_tags = {"comod.modulation_kind": cfg.modulation.kind, "comod.dataset": cfg.data.dataset,
                    **(tags or {})}
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        if run_id is not None:
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
        else:
            run = self.client.create_run(self.experiment_id, run_name=cfg.name, tags=all_tags)
            self.run_id = run.info.run_id
            from mlflow.entities import Param

            params = [Param(k, v) for k, v in params_of(cfg).items()]
            for i in range(0, len(params), 100):  # MLflow's batch limit is 100 params
                self.client.log_batch(self.run_id, params=params[i:i + 100])
            self.out_dir.mkdir(parents=True, exist_ok=True)
            run_file.write_text(json.dumps({"tracking_uri": mlflow.get_tracking_uri(), "run_id": self.run_id}))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        for i in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[i:i + 1000])

    def log_artifacts(self, paths: list[Path], artifact_path: str | None = None) -> None:
        for path in paths:
            if Path(path).exists():
                self.client.log_artifact(self.run_id, str(path), artifact_path)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)
