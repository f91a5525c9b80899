"""Run and resume searches: Ray Tune schedules, Optuna samples, MLflow records.

``run_search`` creates the search's state (see :mod:`search_state`), the
MLflow experiment and parent run, and an Optuna study in a real database
under the search's unique name, then fits a Ray Tune ``Tuner`` with
:class:`PruneAwareOptunaSearch` and ASHA on per-epoch reports.
``resume_search`` restores the same Tuner: the Optuna study, the Ray
experiment and the MLflow runs all continue, with no duplicated runs.
"""
from __future__ import annotations

import logging
import os
import pickle
import shutil
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

from comod.config import flatten
from comod.names import KINDS
from comod.schema import to_dict
from comod_platform import interrupts
from comod_platform import sqlite_stores
from comod_platform import storage as storage_mod
from comod_platform.conventions import (COMPLETED, EPOCH, FAILED, INTERRUPTED, PRUNED, REASON, TAG_ROLE, TAG_SEARCH,
                                        TAG_SEARCH_ID, better, direction, experiment_name, outcome, param_text,
                                        report_metrics)
from comod_platform.credentials import redact, redact_all
from comod_platform.search_state import (SearchMeta, SearchPaths, check_name, default_name,
                                         first_difference, search_hash, versions)
from comod_platform.searchfile import SearchFile, parse_search, read_search, resolve_search_path

log = logging.getLogger(__name__)


class SearchError(RuntimeError):
    """A search cannot start or resume; the message says why and what to do."""


def optuna_storage_url(paths: SearchPaths) -> str:
    """The study's database: ``COMOD_OPTUNA_STORAGE`` (a team database), else SQLite in the search folder."""
    return os.environ.get("COMOD_OPTUNA_STORAGE") or f"sqlite:///{paths.optuna_db}"


KEEP_CHECKPOINTS = 3
"""Epoch checkpoints a trial keeps on the storage. Ray snapshots the whole experiment whenever a trial
has written this many since the last snapshot (so that no snapshot names a deleted checkpoint): fewer
kept means more snapshots in the scheduling loop, more means more storage."""


def check_optuna_storage(url: str) -> None:
    """Open one connection to the study's database, so a bad one stops the search before anything is made."""
    if url.startswith("sqlite:"):
        return
    try:
        import sqlalchemy

        shown = sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - a URL SQLAlchemy cannot parse
        raise SearchError(f"Optuna storage {redact(url)!r} (COMOD_OPTUNA_STORAGE) is not a database URL; use e.g. "
                          f"postgresql+psycopg2://USER:PASSWORD@HOST:5432/optuna, or unset it to keep the study "
                          f"in SQLite in the search folder") from None
    try:
        engine = sqlalchemy.create_engine(url, connect_args={"connect_timeout": 10} if "postgres" in url else {})
        with engine.connect():
            pass
        engine.dispose()
    except ModuleNotFoundError as err:
        raise SearchError(f"Optuna storage {shown} (COMOD_OPTUNA_STORAGE) needs the driver {err.name}: "
                          f"pip install 'comod[cluster]'") from None
    except Exception as err:  # noqa: BLE001
        first = redact_all(str(getattr(err, "orig", None) or err).strip().splitlines()[0][:300])
        raise SearchError(f"Optuna storage {shown} (COMOD_OPTUNA_STORAGE) cannot be used: {first}; start the "
                          f"database or fix the URL, or unset COMOD_OPTUNA_STORAGE to keep the study in SQLite "
                          f"in the search folder") from None


def _max_epochs(sf: SearchFile) -> int:
    """The most epochs a trial can train, both phases (the trials' epoch clock of ASHA)."""
    return sf.max_epochs()


def _scheduler(sf: SearchFile):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    s = sf.search.scheduler
    if s.type == "fifo":
        return FIFOScheduler()
    # ASHA stops any trial whose clock reaches max_t: one past the last epoch, so a trial's
    # natural end (its last epoch, then the final report) is never an early stop
    return ASHAScheduler(time_attr=EPOCH, max_t=_max_epochs(sf) + 1, grace_period=s.grace_period,
                         reduction_factor=s.reduction_factor)


VERBOSE_ENV = "COMOD_VERBOSE"
"""Set (to 1) by ``--verbose``: a local search lets Ray's own output reach the terminal."""


def verbose_default(verbose: bool | None = None) -> bool:
    """``verbose`` when given, else whether ``$COMOD_VERBOSE`` is set to something other than 0."""
    if verbose is not None:
        return verbose
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0", "false", "no")


def _last_line(text: str, limit: int = 300) -> str:
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    return (lines[-1] if lines else "")[:limit]


class QuietRayHandler(logging.Handler):
    """The one handler of the "ray" logger in a quiet local search (ERROR and above reach it).

    Ray Tune logs a failed trial with Ray's whole traceback: this prints one line of comod's instead (the
    trial's error is also in its MLflow run, in ``comod search status`` and in the end summary), and drops
    Tune's closing list of the trials that did not complete (the summary has them). Any other error of Ray's
    is printed as it is, traceback and all."""

    FAILED = "Trial task failed for trial"

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            if record.name.startswith("ray.tune") and message.startswith(self.FAILED):
                trial = message[len(self.FAILED):].strip()  # Ray's trial name, run_trial_ID: comod shows the ID
                trial = trial[len("run_trial_"):] if trial.startswith("run_trial_") else trial
                error = record.exc_info[1] if record.exc_info else None
                shown = _last_line(str(error)) if error is not None else "see comod search status"
                text = f"comod: trial {trial} failed: {shown}"
            elif record.name.startswith("ray.tune") and message.startswith("Trials did not complete"):
                return
            else:
                text = self.format(record)
            print(text, file=sys.stderr, flush=True)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def quiet_ray() -> None:
    """Keep Ray's own output off the terminal of a local search: its start-up and token-authentication
    notices (WARNING records of the "ray" logger), its INFO and WARNING lines and Python warnings raised in
    Ray's code. Errors still show, through :class:`QuietRayHandler` (a failed trial's as one line). Called
    before ``ray.init`` and again after it (which takes Ray's handlers off the "ray" logger, so that its
    errors would reach Python's last-resort handler). Token authentication itself is left as Ray sets it
    up: RAY_AUTH_MODE is not touched (the driver's Ray core has read it at import, and a cluster started
    in another mode refuses the driver)."""
    import warnings

    warnings.filterwarnings("ignore", module=r"ray(\.|$)")
    ray_logger = logging.getLogger("ray")
    ray_logger.setLevel(logging.ERROR)
    ray_logger.propagate = False
    if not any(isinstance(h, QuietRayHandler) for h in ray_logger.handlers):
        handler = QuietRayHandler(logging.ERROR)
        handler.setFormatter(logging.Formatter("ray: %(levelname)s: %(message)s"))
        ray_logger.handlers[:] = [handler]


LOCAL_RAY_CONFIG = {"prestart_worker_first_driver": False}
"""Settings of a Ray this driver starts itself. Ray starts a worker per CPU for a first driver's tasks
before it returns from ``ray.init``; a search runs no such task (Ray Tune gives each trial actor a
runtime environment of its own, so its actors start in new workers), so those workers only took CPU
from the search's start-up and, idle, from its trials. Measured on 2 cores, 40 trials, three
interleaved pairs: the whole command 0.2-1.0 s shorter (0.66 s on average, 2.3%)."""


def _init_ray(address: str | None, verbose: bool | None = None) -> None:
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    try:
        if address:
            # trials on the cluster's nodes need the driver's storage credentials and offline mode
            # (a submitted job's own runtime environment reaches the workers already)
            env = {} if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") else storage_mod.worker_env()
            ray.init(address=address, log_to_driver=False, runtime_env={"env_vars": env} if env else None)
        elif verbose_default(verbose):
            ray.init(include_dashboard=False, log_to_driver=True, _system_config=LOCAL_RAY_CONFIG)
        else:
            quiet_ray()
            ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False,
                     _system_config=LOCAL_RAY_CONFIG)
            quiet_ray()
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise SearchError(f"cannot reach the Ray cluster at {address}: {err}; check the address "
                          f"(ray status on the head node), or leave --address out to run locally") from None


def _load_shared_data(sf: SearchFile) -> dict:
    """The base experiment's dataset, loaded once in the driver; trials get it from the object store."""
    from comod.data import load_data
    from comod_platform.trainable import pack

    return pack(load_data(sf.base_config()))


def _trainable(sf: SearchFile, paths: SearchPaths, data: dict | None = None):
    from ray import tune

    from comod_platform.trainable import data_key, run_trial

    base = sf.base_config()
    if data is None:
        data = _load_shared_data(sf)
    fn = tune.with_parameters(run_trial, search=sf, search_name=paths.name, home=str(paths.root.parent.parent),
                              data=data, shared_key=data_key(base))
    r = sf.search.resources
    return tune.with_resources(fn, {"cpu": r.cpu, "gpu": r.gpu})


def _callbacks(sf: SearchFile, paths: SearchPaths, meta: SearchMeta):
    from ray.tune.logger import JsonLoggerCallback

    from comod_platform.tune_callbacks import MlflowTrialCallback, ProgressCallback

    return [JsonLoggerCallback(), MlflowTrialCallback(sf, paths.name, meta.tracking_uri, meta.experiment_id, meta.parent_run_id,
                                str(paths.trials)),
            ProgressCallback(sf.search.metric, sf.search.mode, sf.search.num_trials)]


def _start_tracking(sf: SearchFile, name: str, data: dict | None = None, search_id: str | None = None
                    ) -> tuple[str, str, str]:
    """The search's experiment (tagged as model training, with comod's saved view sorted by the search's
    metric) and its parent run: the search settings and the space as params, the base experiment's
    dataset (``data``, loaded once by the driver) as its dataset input, which the trials' runs share."""
    from mlflow.tracking import MlflowClient

    from comod_platform.tracking import describe_dataset, log_dataset, log_params, setup, tracking_uri

    from comod_platform.writer import RetryingClient, retry_call

    experiment_id = retry_call(setup, experiment_name(name), metric=sf.search.metric, mode=sf.search.mode)
    uri = tracking_uri()
    client = RetryingClient(MlflowClient(tracking_uri=uri))  # a locked store or a server's blip is waited out
    if search_id:
        client.set_experiment_tag(experiment_id, TAG_SEARCH_ID, search_id)
    parent = client.create_run(experiment_id, run_name=name, tags={TAG_SEARCH: name, TAG_ROLE: "search"})
    settings = {key: param_text(value) for key, value in flatten(to_dict(sf.search), "search.").items()}
    settings.update({f"space.{key}": param_text(to_dict(dist)) for key, dist in sf.space.items()})
    log_params(client, parent.info.run_id, settings)
    log_dataset(client, parent.info.run_id, describe_dataset(sf.base_config(), data))
    return uri, experiment_id, parent.info.run_id


def _refuse_existing(paths: SearchPaths, locked: bool = False) -> None:
    """A name taken in this runs folder is refused: by a live driver (named; unless ``locked``, this process
    holds the lock), or by a search that exists."""
    if not locked:
        paths.check_not_busy()
    if paths.exists():
        raise SearchError(f"a search named {paths.name!r} exists already ({paths.root}); continue it with "
                          f"`comod search resume {paths.name}`, or choose another --name")


def _claim_stores(name: str, search_id: str, optuna_url: str, tracking: str) -> None:
    """A new search's name must be free in the tracking store and in the Optuna database too, which a team
    may share: an experiment ``search/NAME`` or a study ``NAME`` made by another search folder (another
    runs folder, another user who chose the same --name) is refused before anything is created. One made
    by this folder (a start that failed half-way) is this search's."""
    import optuna
    from mlflow.tracking import MlflowClient

    from comod_platform.writer import retry_call

    found = retry_call(MlflowClient(tracking_uri=tracking).get_experiment_by_name, experiment_name(name))
    if found is not None and found.tags.get(TAG_SEARCH_ID) != search_id:
        deleted = " (deleted, and its name stays taken)" if found.lifecycle_stage == "deleted" else ""
        raise SearchError(f"the tracking store {redact(tracking)} has an experiment {experiment_name(name)!r} "
                          f"already{deleted}, made by another search of that name (another runs folder or "
                          f"another user): names are unique per tracking store; choose another --name")
    if optuna_url.startswith("sqlite:") and not Path(optuna_url.removeprefix("sqlite:///")).exists():
        return  # the search folder's own, new database
    storage = optuna.storages.RDBStorage(optuna_url)
    try:
        study_id = storage.get_study_id_from_name(name)
    except KeyError:
        return
    if storage.get_study_user_attrs(study_id).get(TAG_SEARCH_ID) != search_id:
        raise SearchError(f"the Optuna database {redact(optuna_url)} has a study {name!r} already, made by "
                          f"another search of that name: names are unique per Optuna database; choose another "
                          f"--name")


def _check_owned(meta: SearchMeta) -> None:
    """On resume: the experiment and the study of the search's name are still the ones it made."""
    import optuna
    from mlflow.tracking import MlflowClient

    from comod_platform.writer import retry_call

    found = retry_call(MlflowClient(tracking_uri=meta.tracking_uri).get_experiment_by_name,
                       experiment_name(meta.name))
    if found is None or found.experiment_id != meta.experiment_id \
            or (meta.search_id and found.tags.get(TAG_SEARCH_ID) != meta.search_id):
        what = "has none" if found is None else f"has one (id {found.experiment_id}) of another search"
        raise SearchError(f"search {meta.name!r} recorded to experiment {meta.experiment_id} "
                          f"({experiment_name(meta.name)}) of {redact(meta.tracking_uri)}, which now {what}: "
                          f"the tracking store was replaced or another search took the name; set "
                          f"MLFLOW_TRACKING_URI to the search's store, or run it again under another --name")
    if meta.search_id is None:
        return  # a search from before ids were recorded
    storage = optuna.storages.RDBStorage(meta.optuna_storage)
    try:
        owner = storage.get_study_user_attrs(storage.get_study_id_from_name(meta.study_name)).get(TAG_SEARCH_ID)
    except KeyError:
        owner = None
    if owner != meta.search_id:
        what = "has no study of that name" if owner is None else "has one of another search"
        raise SearchError(f"search {meta.name!r} made study {meta.study_name!r} in {redact(meta.optuna_storage)}, "
                          f"which now {what}: set COMOD_OPTUNA_STORAGE to the search's database, or run it again "
                          f"under another --name")


RESTORE_PINNED = ("ray",)
"""Packages whose version a resume must match: Ray Tune's experiment state is a pickle of Ray's classes.
The Optuna and MLflow stores are versioned databases and comod's own state is plain files, so a resume
after upgrading those works (with a note)."""


def _check_unchanged(paths: SearchPaths, meta: SearchMeta) -> None:
    """On resume: the search file is the one the search started with, and Ray's version is its version."""
    current = yaml.safe_load(paths.search_file.read_text())
    if meta.search_sha256 is not None and search_hash(current) != meta.search_sha256:
        changed = first_difference(meta.search_settings or {}, current) or "its contents"
        raise SearchError(f"the search file of {meta.name!r} ({paths.search_file}) was edited after the search "
                          f"started ({changed}); a resumed search must sample and score as it started: undo the "
                          f"edit, or run the edited file as a new search (comod search run FILE --name NEW)")
    now = versions()
    pinned = [p for p in RESTORE_PINNED if meta.versions.get(p) not in (None, now[p])]
    if pinned:
        started = ", ".join(f"{p} {meta.versions[p]}" for p in pinned)
        here = ", ".join(f"{p} {now[p]}" for p in pinned)
        raise SearchError(f"search {meta.name!r} was started with {started}, and this is {here}: Ray Tune's "
                          f"saved experiment state is read only by the version that wrote it; resume with that "
                          f"version (pip install 'ray[default,tune]=={meta.versions['ray']}'), or run the "
                          f"search again under another --name")
    changed = [f"{p} {meta.versions[p]} -> {now[p]}" for p in now
               if p not in RESTORE_PINNED and meta.versions.get(p) not in (None, now[p])]
    if changed:
        print(f"comod: resuming {meta.name} with other versions than it started with ({', '.join(changed)})",
              file=sys.stderr, flush=True)


def _prepare_in_background(raw: dict, stem: str) -> tuple[SearchFile, dict]:
    """What a new search needs besides Ray: the checked search file, the shared dataset and an open
    tracking store (imports of torch and MLflow, a fresh store's tables). Nothing here is recorded."""
    from comod_platform.tracking import open_store

    sf = parse_search(raw, stem)
    data = _load_shared_data(sf)
    open_store()
    return sf, data


def run_search(search_path: str | Path, name: str | None = None, address: str | None = None,
               storage: str | None = None, verbose: bool | None = None) -> dict:
    """Start a new search from a search file; returns its summary.

    ``storage`` (else ``$COMOD_STORAGE``) is where Ray Tune keeps the
    experiment and the trials' checkpoints: see :mod:`comod_platform.storage`.
    A local Ray keeps its own output off the terminal unless ``verbose`` (default: ``$COMOD_VERBOSE``).

    Ray starts (or is joined) while a second thread checks the search file,
    loads the dataset and opens the tracking store, so the driver's start-up
    costs the longer of the two, not their sum. Nothing is recorded until the
    file, the names, the Optuna database and the storage have all passed."""
    source = resolve_search_path(search_path).resolve()  # joining a Ray job's cluster may change the working folder
    from comod_platform.paths import runs_home, unwritable

    problem = unwritable(runs_home(), "COMOD_HOME (the runs folder)")
    if problem:
        raise SearchError(problem)
    if name is not None:
        _refuse_existing(SearchPaths(check_name(name)))  # at once, before Ray starts
    raw, stem = read_search(search_path)  # a missing file or broken YAML stops here, before Ray starts
    _service_defaults()
    with ThreadPoolExecutor(1, thread_name_prefix="comod-prepare") as pool:
        prepared = pool.submit(_prepare_in_background, raw, stem)
        try:
            _init_ray(address, verbose)
        finally:
            sf, data = prepared.result()  # its error (a bad file, a missing dataset) comes first
    paths = SearchPaths(name or default_name(sf.name))
    _refuse_existing(paths)
    made_folder = not paths.root.exists()
    lock = paths.lock(f"comod search run {paths.name}")  # a second driver of this name is refused from here
    try:
        _refuse_existing(paths, locked=True)  # a driver that made a search of the name while this one started
        optuna_url = optuna_storage_url(paths)
        check_optuna_storage(optuna_url)
        search_id = paths.search_id()
        from comod_platform.tracking import tracking_uri

        _claim_stores(paths.name, search_id, optuna_url, tracking_uri())
        _check_resources(sf, address)
        ray_storage = storage_mod.resolve(storage, str(paths.ray_storage))
        _check_storage(ray_storage)  # before anything is made: a refused search leaves no trace
    except BaseException:
        lock.release()
        if made_folder:
            shutil.rmtree(paths.root, ignore_errors=True)
        raise
    with lock:
        shutil.copyfile(source, paths.search_file)
        _create_study(sf, paths.name, optuna_url, search_id)
        uri, experiment_id, parent_run_id = _start_tracking(sf, paths.name, data, search_id)
        meta = SearchMeta(name=paths.name, study_name=paths.name, optuna_storage=optuna_url, tracking_uri=uri,
                          experiment_id=experiment_id, parent_run_id=parent_run_id, ray_storage=ray_storage,
                          created=time.time(), search_id=search_id, versions=versions(),
                          search_sha256=search_hash(raw), search_settings=raw)
        paths.write_meta(meta)
        return _fit(sf, paths, meta, address, restore=False, data=data)


def _create_study(sf: SearchFile, name: str, url: str, search_id: str) -> None:
    """The search's Optuna study, made here with the search's id (Ray's OptunaSearch loads it)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=name, storage=optuna.storages.RDBStorage(url), load_if_exists=True,
                                direction=direction(sf.search.mode))
    study.set_user_attr(TAG_SEARCH_ID, search_id)


def resume_search(name: str, address: str | None = None, storage: str | None = None,
                  verbose: bool | None = None) -> dict:
    """Continue an interrupted search where it stopped."""
    paths = SearchPaths(check_name(name))
    meta = paths.read_meta()
    with paths.lock(f"comod search resume {name}"):  # refused while another driver runs it
        if storage and storage_mod.resolve(storage, meta.ray_storage) != meta.ray_storage:
            raise SearchError(f"search {name!r} keeps its experiment in {meta.ray_storage}; resume it there "
                              f"(leave --storage out)")
        _check_unchanged(paths, meta)
        sf = parse_search(yaml.safe_load(paths.search_file.read_text()), name)
        if "***" in meta.optuna_storage:
            raise SearchError(f"search {name!r} keeps its study in {meta.optuna_storage}, whose password is not "
                              f"recorded: set COMOD_OPTUNA_STORAGE to that URL with its password, or give the "
                              f"password to the driver by reference (PGPASSWORD, or a PGPASSFILE)")
        check_optuna_storage(meta.optuna_storage)
        _check_owned(meta)
        return _fit(sf, paths, meta, address, restore=True, verbose=verbose)


def _fit(sf: SearchFile, paths: SearchPaths, meta: SearchMeta, address: str | None, restore: bool,
         data: dict | None = None, verbose: bool | None = None) -> dict:
    from mlflow.tracking import MlflowClient

    from comod_platform.study_storage import flush_all as flush_study_writes
    from comod_platform.writer import retry_call, usage as writer_usage

    if restore:
        _prepare_cluster(address, meta.ray_storage, verbose)
        _check_resources(sf, address)
    experiment_path = storage_mod.join(meta.ray_storage, meta.name)
    recorded_before = writer_usage()  # this search's writes only, were there others in this process
    client = MlflowClient(tracking_uri=meta.tracking_uri)
    retry_call(client.update_run, meta.parent_run_id, status="RUNNING")
    status = "KILLED"
    with interrupts.StopOnSignal(meta.name):
        try:
            trainable = _trainable(sf, paths, data)
            grid = _tuner(sf, paths, meta, trainable, experiment_path, restore).fit()
            status = "KILLED" if interrupts.requested() else "FINISHED"
        except Exception:
            status = "FAILED"
            raise
        finally:
            flush_study_writes()  # the study's last writes are in its database before anyone reads it
            if status != "FINISHED":
                _close_running_study_trials(meta)
            retry_call(client.set_terminated, meta.parent_run_id, status=status)
    summary = {"name": meta.name, **summarise_grid(grid, sf, interrupts.unfinished if interrupts.requested()
                                                     else ())}
    if interrupts.requested():
        summary["stopped_by"] = signal.Signals(interrupts.requested()).name
    summary["writers"] = writer_usage(recorded_before)  # what recording cost the driver (its writers' CPU)
    return summary


def _close_running_study_trials(meta: SearchMeta) -> None:
    """A stopped search leaves no Optuna trial RUNNING: each is closed as failed and marked interrupted,
    and a resume continues it as a new trial of the same parameters (:class:`PruneAwareOptunaSearch`)."""
    import optuna

    from comod_platform.searcher import INTERRUPTED_ATTR

    try:
        storage = optuna.storages.RDBStorage(meta.optuna_storage)
        study_id = storage.get_study_id_from_name(meta.study_name)
        for frozen in storage.get_all_trials(study_id, deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            storage.set_trial_user_attr(frozen._trial_id, INTERRUPTED_ATTR, "1")
            storage.set_trial_state_values(frozen._trial_id, optuna.trial.TrialState.FAIL)
    except Exception as err:  # noqa: BLE001 - the stop goes on; a resume closes what is left
        log.warning("the Optuna trials of %s that were running stay RUNNING (%s); `comod search resume %s` "
                    "closes them", meta.name, redact_all(_last_line(str(err))), meta.name)


def _service_defaults() -> None:
    """Environment defaults of the driver (and of the workers it starts); a value already set is kept."""
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # our progress line instead of Ray's tables
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # Ctrl-C and SIGTERM take comod's one path (interrupts)
    # Ray's CSV and TensorBoard result files cost ~30 ms a result in the driver loop and nothing
    # reads them; the JSON one stays (added in _callbacks): the result grid reads it
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    # MLflow's client would retry a lost server for minutes inside each call; the search's writer
    # retries (and buffers) on its own, call by call
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")  # see KEEP_CHECKPOINTS
    # searches run where nothing outside the cluster is reached: no usage reports, whose sender
    # wraps every MLflow call and waits for its network at exit
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    sqlite_stores.install()  # the runs folder's MLflow store and study in WAL mode (COMOD_SQLITE_WAL=0: not)


def _prepare_cluster(address: str | None, storage: str, verbose: bool | None = None) -> None:
    """Start or join Ray, then check that every node sees the storage."""
    _service_defaults()
    _init_ray(address, verbose)
    _check_storage(storage)


def _check_resources(sf: SearchFile, address: str | None) -> None:
    """A trial's request (``search.resources``) must fit on one node: on a Ray this driver started, one that
    fits nowhere is refused at once (it would wait forever); on a cluster, which an autoscaler may grow, it
    is said once and the trials wait for such a node."""
    from comod_platform.storage import alive_nodes

    r = sf.search.resources
    wanted = {"CPU": float(r.cpu), "GPU": float(r.gpu)}
    nodes = alive_nodes()
    have = [{k: float((n.get("Resources") or {}).get(k, 0.0)) for k in wanted} for n in nodes]
    if any(all(node[k] >= v for k, v in wanted.items()) for node in have):
        return
    asked = f"{r.cpu:g} CPU and {r.gpu:g} GPU per trial (search.resources)"
    largest = ", ".join(f"{node['CPU']:g} CPU + {node['GPU']:g} GPU" for node in have) or "no live node"
    if not (address or os.environ.get("RAY_ADDRESS")):
        raise SearchError(f"no node can run a trial: it asks {asked}, and this machine's Ray has {largest}; "
                          f"lower search.resources (gpu: 0 on a machine without a GPU), or run the search on a "
                          f"cluster that has such nodes (--address)")
    print(f"comod: no node of the cluster has {asked} now (it has {largest}); the trials wait until the "
          f"cluster's autoscaler adds one", file=sys.stderr, flush=True)


def _check_storage(storage: str) -> None:
    """Every node of the (started) Ray cluster must read what the driver writes to ``storage``."""
    try:
        storage_mod.check_shared(storage)
    except storage_mod.StorageError as err:
        raise SearchError(str(err)) from None


def _tuner(sf: SearchFile, paths: SearchPaths, meta: SearchMeta, trainable, experiment_path: str, restore: bool):
    import optuna
    from ray import tune

    from comod_platform.searcher import PruneAwareOptunaSearch, create_sampler, points_to_evaluate
    from comod_platform.study_storage import WriteBehindStorage

    failures = tune.FailureConfig(max_failures=sf.search.max_retries)
    if restore and tune.Tuner.can_restore(experiment_path):
        try:
            tuner = tune.Tuner.restore(experiment_path, trainable, resume_unfinished=True, resume_errored=False,
                                       restart_errored=False)
        except (ImportError, AttributeError, TypeError, ValueError, EOFError, pickle.UnpicklingError
                ) as err:
            started = ", ".join(f"{k} {v}" for k, v in meta.versions.items()) or "unrecorded versions"
            raise SearchError(f"cannot read the Ray Tune state of search {meta.name!r} in {experiment_path} "
                              f"({type(err).__name__}: {_last_line(str(err), 200)}); it was written with "
                              f"{started}: resume with those versions, or run the search again under another "
                              f"--name") from None
    else:
        s = sf.search
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        searcher = PruneAwareOptunaSearch(
            space=sf.suggest, metric=s.metric, mode=s.mode, sampler=create_sampler(sf),
            points_to_evaluate=points_to_evaluate(sf),
            report_intermediate=s.scheduler.type != "fifo",
            study_name=meta.study_name, storage=WriteBehindStorage(
                optuna.storages.RDBStorage(meta.optuna_storage), meta.study_name,
                [direction(s.mode)]))
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(search_alg=searcher, scheduler=_scheduler(sf), num_samples=s.num_trials,
                                        max_concurrent_trials=s.max_concurrent, metric=s.metric, mode=s.mode,
                                        reuse_actors=True),
            run_config=tune.RunConfig(name=meta.name, storage_path=meta.ray_storage, verbose=0,
                                      callbacks=_callbacks(sf, paths, meta), failure_config=failures,
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=KEEP_CHECKPOINTS)))
    return tuner


SUMMARY_METRICS = ("test/mean_f1", "test/mean_recall", "test/mean_precision")
"""Test metrics of each kind's best trial in a search's summary, besides the search metric."""


def summarise_grid(grid, sf: SearchFile, interrupted=()) -> dict:
    """A finished (or stopped) search in numbers: trials by state, the best trial overall and of each kind.

    ``interrupted``: the ids of trials a stopped search left unfinished (counted apart from the pruned).
    Keys: ``trials``, ``completed``, ``pruned`` (stopped early), ``interrupted``, ``failed``, ``best`` (``{value, trial_id}`` or
    None), ``metric``; ``best_per_kind``: ``{kind: {trial_id, value, test/mean_f1, test/mean_recall,
    test/mean_precision} or None}`` for every kind the search's trials used (a kind with no completed trial:
    None); ``failures``: ``[{trial_id, error}]``, each error's last line."""
    completed = pruned = failed = stopped = 0
    interrupted = set(interrupted)
    metric, mode = sf.search.metric, sf.search.mode
    best = None
    base_kind = sf.base_config().modulation.kind
    per_kind: dict[str, dict | None] = {}
    failures = []
    for result in grid:
        metrics = report_metrics(result.metrics)
        config = result.config or {}
        kind = config.get("modulation.kind", base_kind)
        per_kind.setdefault(kind, None)
        trial_id = metrics.get("trial_id") or _trial_id_of(result)
        state = outcome(metrics, errored=result.error is not None)
        if state == FAILED:
            failed += 1
            error = result.error if result.error is not None else metrics.get(REASON, "the loss diverged")
            failures.append({"trial_id": trial_id, "error": _last_line(str(error)) or type(error).__name__})
            continue
        if state == COMPLETED:
            completed += 1
            value = metrics.get(metric)
            if value is None:
                continue
            if best is None or better(value, best[0], mode):
                best = (value, trial_id)
            top = per_kind[kind]
            if top is None or better(value, top["value"], mode):
                per_kind[kind] = {"trial_id": trial_id, "value": value,
                                  **{k: metrics.get(k) for k in SUMMARY_METRICS}}
        elif trial_id in interrupted:
            stopped += 1
        else:
            pruned += 1
    order = {k: i for i, k in enumerate(KINDS)}
    per_kind = dict(sorted(per_kind.items(), key=lambda item: (order.get(item[0], len(order)), item[0])))
    return {"trials": len(grid), COMPLETED: completed, PRUNED: pruned, INTERRUPTED: stopped, FAILED: failed,
            "best": {"value": best[0], "trial_id": best[1]} if best else None, "metric": metric,
            "best_per_kind": per_kind, "failures": failures}


def _trial_id_of(result) -> str | None:
    """A result without metrics (a trial that failed before its first report): its id from its folder name."""
    import re

    folder = str(getattr(result, "path", "") or "").rstrip("/").rsplit("/", 1)[-1]  # run_trial_ID_INDEX_...
    found = re.search(r"_([0-9a-f]{5}_\d{5}|[0-9a-f]{8})_\d+(_|$)", folder)
    return found.group(1) if found else None


__all__ = ["SearchError", "run_search", "resume_search"]
