"""MLflow tracking of experiments, following docs/guides/tracking.md.

The store is ``MLFLOW_TRACKING_URI`` (a team server), else an embedded SQLite store and artifact folder
in the runs folder. Params are the flattened config, metrics per epoch at the global step; a resumed run
re-attaches to its MLflow run (its id kept beside the checkpoint). Experiments are tagged as model training
with a saved view of their runs table (``VIEW_KEY``); runs record their dataset as a dataset input.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import time
import urllib.request
import warnings
from contextlib import nullcontext, suppress
from pathlib import Path

from filelock import FileLock

from comod.config import ExperimentConfig, config_to_dict, flatten
from comod_platform.paths import runs_home

RUN_FILE = "mlflow_run.json"
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"  # MLflow 3's kind for model training (the others are GenAI)
VIEW_KEY = "comod"
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_KEY}"  # a saved view of the runs table, opened by viewStateShareKey
VIEW_NAME = "comod: compare trials"
KEY_METRICS = ("val/mean_f1", "test/mean_f1", "test/mean_recall", "test/mean_precision")  # the view's columns
DATASET_CONTEXT = "train/val/test"
UI_MODE = "workflowType=machine_learning"  # MLflow 3's UI in Model training mode, whatever its switch says


class TrackingError(RuntimeError):
    """The tracking server cannot be used (unreachable, refused)."""


def _quiet():
    """MLflow's INFO lines (a new store's "Creating initial MLflow database tables") off the terminal."""
    import mlflow  # noqa: F401 - first: it sets its logger's level itself

    for name in ("alembic", "mlflow", "urllib3"):
        logging.getLogger(name).setLevel(logging.WARNING)


def embedded_uri() -> str:
    return f"sqlite:///{runs_home() / 'mlflow.db'}"


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI``, else the embedded store, made here by MLflow if new."""
    if uri := os.environ.get("MLFLOW_TRACKING_URI"):
        return uri
    runs_home().mkdir(parents=True, exist_ok=True)
    # made under the lock, and looked for under it: a command never opens a store another is still making
    with _store_lock(embedded_uri()):
        if not (runs_home() / "mlflow.db").exists():
            _quiet()  # MLflow makes the new store, and says so at INFO
            from mlflow.tracking import MlflowClient

            MlflowClient(tracking_uri=embedded_uri()).search_experiments(max_results=1)
    return embedded_uri()


def _store_lock(uri: str):
    """Held while the embedded store, or an experiment in it, is made: commands started together take turns."""
    return FileLock(str(runs_home() / "mlflow.db.lock")) if uri == embedded_uri() else nullcontext()


def artifact_root() -> str | None:
    """Local artifact folder for the embedded store (known by its URI: ``mlflow.set_tracking_uri`` exports
    ``MLFLOW_TRACKING_URI``); a server chooses its own."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    return (runs_home() / "artifacts").as_uri() if not uri or uri == embedded_uri() else None


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, with the fix, when an HTTP tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).close()
    except OSError as err:  # urllib's URLError among them
        reason = getattr(err, "reason", err)
        raise TrackingError(f"MLflow tracking server {uri} is unreachable ({reason}); start it "
                            f"(mlflow server --host 127.0.0.1 ...) or unset MLFLOW_TRACKING_URI to use "
                            f"the embedded store in {runs_home()}") from None


def open_store() -> str:
    """Reach the tracking store once (a new embedded store makes its tables) and return its URI."""
    _quiet()
    from mlflow.tracking import MlflowClient

    uri = tracking_uri()
    check_reachable(uri)
    MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    return uri


def setup(experiment: str, metric: str | None = None, mode: str = "max"):
    """Point MLflow at the store; the experiment's id, found or made, marked (:func:`mark_experiment`)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    _quiet()
    uri = tracking_uri()  # a new embedded store is made here; reaching it once more would be a second query
    check_reachable(uri)
    root = artifact_root()  # before set_tracking_uri, which exports MLFLOW_TRACKING_URI
    mlflow.set_tracking_uri(uri)
    with _store_lock(uri):
        found = mlflow.get_experiment_by_name(experiment)
        if found is None:
            with suppress(mlflow.exceptions.MlflowException):  # made meanwhile by another command on the server
                mlflow.create_experiment(experiment, artifact_location=root)
            found = mlflow.get_experiment_by_name(experiment)
        mark_experiment(MlflowClient(tracking_uri=uri), found.experiment_id, metric, mode, found.tags)
    return found.experiment_id


def mark_experiment(client, experiment_id: str, metric: str | None = None, mode: str = "max",
                    tags: dict[str, str] | None = None) -> None:
    """Tag the experiment as model training and give it comod's saved view (dataset, modulation kind, state,
    key metrics; sorted by ``metric`` if given), unless it has both (``tags``: its tags, when the caller has
    them). Without ``metric`` a view already there is kept."""
    from comod_platform.conventions import TAG_STATE

    if tags is None:
        tags = client.get_experiment(experiment_id).tags
    if tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    metrics = dict.fromkeys(([metric] if metric else []) + list(KEY_METRICS))
    state = {"selectedColumns": ["attributes.`Dataset`", "params.`modulation.kind`", f"tags.`{TAG_STATE}`",
                                 *[f"metrics.`{m}`" for m in metrics]]}
    if metric:
        state.update(orderByKey=f"metrics.`{metric}`", orderByAsc=mode == "min")
    current = None
    with suppress(KeyError, TypeError, ValueError):  # no view yet, or not one of comod's
        current = json.loads(json.loads(tags[VIEW_TAG])["state"])
    if current != state and (metric is not None or current is None):  # no metric: keep a search's sorted view
        now = int(time.time() * 1000)
        envelope = {"name": VIEW_NAME, "createdAt": now, "updatedAt": now, "state": json.dumps(state)}
        client.set_experiment_tag(experiment_id, VIEW_TAG, json.dumps(envelope))


def runs_url(base: str, experiment_id: str, view: bool = True) -> str:
    """The experiment's runs table in MLflow's UI at ``base`` (``http://HOST:PORT``), with ``view`` comod's."""
    query = f"viewStateShareKey={VIEW_KEY}&{UI_MODE}" if view else UI_MODE
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?{query}"


@functools.cache
def _dataset_class():
    """MLflow's ``MetaDataset`` with a profile, made on first use (importing this module imports no MLflow)."""
    from mlflow.data.meta_dataset import MetaDataset

    class ComodDataset(MetaDataset):  # described by its metadata: comod keeps the data in memory
        profile: dict | None = None  # an attribute in place of the base's read-only property

        def __init__(self, source, name, digest, schema, profile: dict):
            self.profile = profile
            super().__init__(source, name=name, digest=digest, schema=schema)

        def to_dict(self) -> dict[str, str]:
            return {**super().to_dict(), "profile": json.dumps(self.profile)}

    return ComodDataset


def dataset_settings(cfg: ExperimentConfig) -> dict:
    """The data settings that decide which samples a run sees (not where they live, nor which device)."""
    return {k: v for k, v in config_to_dict(cfg.data).items() if k not in ("root", "on_device")}


def _source(where: str | None, cfg: ExperimentConfig):
    from mlflow.data.code_dataset_source import CodeDatasetSource

    if where and where != "generated":
        from mlflow.data.dataset_source_registry import resolve_dataset_source

        with warnings.catch_warnings(), suppress(Exception):  # a path no MLflow source takes: say where in tags
            warnings.simplefilter("ignore", UserWarning)  # MLflow registers its local source twice and says so
            return resolve_dataset_source(str(where))
    tags = {"comod.dataset": cfg.data.dataset}
    if where == "generated":
        tags.update({"comod.generator": f"comod.data.{cfg.data.dataset}", "comod.split_seed": str(cfg.data.split_seed)})
    else:
        tags["comod.root"] = where or "searched: $COMOD_DATA, ./data, the system's places"
    return CodeDatasetSource(tags)


def describe_dataset(cfg: ExperimentConfig, data=None, source=None):
    """The run's dataset as an MLflow dataset named ``DATASET/TASK_SET``, its digest a hash of the data
    settings and, for loaded ``data``, of its tasks and split sizes. Without ``data`` (a trial's, which the
    driver never loads) it is described from the config, with ``source`` where the caller knows it."""
    from mlflow.types import ColSpec, DataType, Schema

    settings = dataset_settings(cfg)
    if data is not None:
        if isinstance(data, dict):  # the driver's packed copy (trainable.pack)
            images, tasks, info = {n: s["images"] for n, s in data["splits"].items()}, data["tasks"], data.get("info")
        else:
            images, tasks, info = {n: getattr(data, n).images for n in ("train", "val", "test")}, data.tasks, data.info
        where, tasks = (info or {}).get("source"), {t.name: int(t.num_classes) for t in tasks}
        sizes = {name: int(images[name].shape[0]) for name in ("train", "val", "test")}
        identity = {"data": settings, "sizes": sizes, "tasks": tasks}
        profile = {"tasks": list(tasks), "num_classes": tasks, **{f"{split}_size": n for split, n in sizes.items()},
                   "image_shape": [int(x) for x in images["train"].shape[1:]], "image_dtype": "uint8",
                   "settings": settings}
        schema = Schema([ColSpec(DataType.binary, "image"), *[ColSpec(DataType.long, task) for task in tasks]])
    else:
        where = cfg.data.root or ("generated" if cfg.data.dataset == "synthetic" else None)
        identity = {"data": settings}
        profile = {"tasks": None, "described_from": "config (not loaded by the driver)", "settings": settings,
                   **{f"{split}_limit": settings.get(f"{split}_limit") for split in ("train", "test")}}
        schema = None
    source = _source(where, cfg) if source is None else source
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]
    d = cfg.data  # a folder of one's own images is named by its folder
    name = f"folder:{Path(str(d.root)).name}" if d.dataset == "folder" and d.root else d.dataset
    name += "/" + (d.tasks if isinstance(d.tasks, str) else ",".join(d.tasks))
    return _dataset_class()(source, name=name, digest=digest, schema=schema, profile=profile)


def dataset_input(dataset):
    """``dataset`` as the ``DatasetInput`` that ``MlflowClient.log_inputs`` takes (a ``DatasetInput`` as it is)."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    if isinstance(dataset, DatasetInput):
        return dataset
    context = InputTag("mlflow.data.context", DATASET_CONTEXT)  # as log_input(context=) tags it
    return DatasetInput(Dataset(**dataset.to_dict()), tags=[context])


def log_dataset(client, run_id: str, dataset) -> None:
    """Record the run's dataset (an ``mlflow.data`` dataset, or a ``DatasetInput`` already made)."""
    client.log_inputs(run_id, datasets=[dataset_input(dataset)])


def all_runs(client, experiment_id: str, filter_string: str, **kwargs):
    """Every run of the experiment that ``filter_string`` matches, page by page (newest first)."""
    token = None
    while True:
        page = client.search_runs([experiment_id], filter_string=filter_string, max_results=1000,
                                  page_token=token, **kwargs)
        yield from page
        token = page.token
        if not token:
            return


def log_params(client, run_id: str, params: dict[str, str]) -> None:
    """Log params, values cut to MLflow's 6000 characters (its client splits a batch to its limits)."""
    from mlflow.entities import Param

    client.log_batch(run_id, params=[Param(k, v[:6000]) for k, v in params.items()])


def params_of(cfg: ExperimentConfig) -> dict[str, str]:
    from comod_platform.conventions import param_text

    return {k: param_text(v) for k, v in flatten(cfg).items()}


def metric_entities(metrics: dict[str, float], step: int) -> list:
    """``metrics`` at ``step`` as MLflow ``Metric``s, stamped now."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(k, float(v), now, step) for k, v in metrics.items()]


class RunLogger:
    """Logs one experiment (``comod train``) to one MLflow run, re-attached on resume."""

    def __init__(self, cfg: ExperimentConfig, out_dir: Path, experiment: str = "comod-train", data=None):
        import mlflow
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        from comod_platform.writer import RetryingClient

        experiment_id = setup(experiment)
        self.client = RetryingClient(MlflowClient())  # a locked SQLite store or a server's blip is waited out
        run_file, found = Path(out_dir) / RUN_FILE, None
        self.previous_status: str | None = None  # the re-attached run's status before (None: a new run)
        if run_file.exists():
            previous = json.loads(run_file.read_text())
            if previous.get("tracking_uri") == mlflow.get_tracking_uri():
                with suppress(MlflowException):  # deleted from the store: start a new one
                    found = self.client.get_run(previous["run_id"])
        if found is not None and found.info.lifecycle_stage == "active":
            self.run_id, self.previous_status = found.info.run_id, found.info.status
            if self.previous_status != "FINISHED":
                self.client.update_run(self.run_id, status="RUNNING")
            return
        tags = {"comod.modulation_kind": cfg.modulation.kind, "comod.dataset": cfg.data.dataset}
        self.run_id = self.client.create_run(experiment_id, run_name=cfg.name, tags=tags).info.run_id
        log_params(self.client, self.run_id, params_of(cfg))
        log_dataset(self.client, self.run_id, describe_dataset(cfg, data))
        run_file.parent.mkdir(parents=True, exist_ok=True)
        run_file.write_text(json.dumps({"tracking_uri": mlflow.get_tracking_uri(), "run_id": self.run_id}))

    def logged_steps(self) -> dict[str, set[int]]:  # metric name -> the steps the run holds
        names = self.client.get_run(self.run_id).data.metrics
        return {k: {m.step for m in self.client.get_metric_history(self.run_id, k)} for k in names}

    def log_metrics(self, metrics: dict[str, float], step: int, skip_logged: bool = False) -> None:
        """Log ``metrics`` at ``step``; with ``skip_logged`` (a resumed run), not those it holds there."""
        if skip_logged:
            done = self.logged_steps()
            metrics = {k: v for k, v in metrics.items() if step not in done.get(k, ())}
        self.client.log_batch(self.run_id, metrics=metric_entities(metrics, step))

    def backfill(self, history: list[dict]) -> None:
        """Log the epochs of a checkpoint's ``history`` that the run lacks (it may have stopped in between)."""
        done = self.logged_steps()
        batch = [m for entry in history if entry.get("phase") in ("pretrain", "finetune", "curve")
                 for m in metric_entities({k: v for k, v in entry.items()
                                           if k not in ("phase", "epoch", "step", "finetune_step")
                                           and entry["step"] not in done.get(k, ())}, entry["step"])]
        self.client.log_batch(self.run_id, metrics=batch)

    def log_artifacts(self, paths: list[Path], artifact_path: str | None = None) -> None:
        for path in paths:
            if Path(path).exists():
                self.client.log_artifact(self.run_id, str(path), artifact_path)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)
