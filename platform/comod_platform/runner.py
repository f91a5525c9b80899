"""Run and resume searches: Ray Tune schedules, Optuna samples, MLflow records.

A new search is checked (:mod:`preflight`) before its state, study, experiment and parent run are made; a
resumed one goes on in all of them, nothing duplicated. Each returns the search's summary (:mod:`summary`)."""
from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

from comod.config import flatten
from comod.schema import to_dict
from comod_platform import interrupts, preflight, sqlite_stores
from comod_platform import storage as storage_mod
from comod_platform.conventions import TAG_ROLE, TAG_SEARCH, TAG_SEARCH_ID, direction, experiment_name, param_text
from comod_platform.credentials import redact_all
from comod_platform.paths import runs_home, unwritable
from comod_platform.preflight import SearchError
from comod_platform.search_state import SearchMeta, SearchPaths, check_name, default_name, search_hash, versions
from comod_platform.searchfile import SearchFile, load_search, parse_search, read_search, resolve_search_path
from comod_platform.summary import last_line, summarise_grid
from comod_platform.tuner import VERBOSE_ENV, build_tuner, init_ray, load_shared_data


SERVICE_DEFAULTS = {
    "RAY_AIR_NEW_OUTPUT": "0",  # our progress line instead of Ray's tables
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",  # nothing reads Ray's CSV and TensorBoard files (JSON stays)
    # MLflow's client would retry a lost server for minutes inside each call; the writer retries on its own
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",  # see tuner.KEEP_CHECKPOINTS
    # nothing outside the cluster is reached: no usage reports (whose sender waits for its network at exit)
    "MLFLOW_DISABLE_TELEMETRY": "true", "RAY_USAGE_STATS_ENABLED": "0"}
"""Environment defaults of the driver and the workers it starts; a value already set is kept."""


def _service_defaults() -> None:
    for key, value in SERVICE_DEFAULTS.items():
        os.environ.setdefault(key, value)
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # Ctrl-C and SIGTERM take comod's one path (interrupts)
    sqlite_stores.install()  # the runs folder's MLflow store and study in WAL mode (COMOD_SQLITE_WAL=0: not)


def _start_tracking(sf: SearchFile, name: str, data: dict | None = None, search_id: str | None = None
                    ) -> tuple[str, str, str]:
    """The search's experiment and its parent run: the search settings and the space as params, the base
    experiment's dataset (``data``, the driver's copy) as its dataset input, which the trials' runs share."""
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


def _prepare_in_background(raw: dict, stem: str) -> tuple[SearchFile, dict]:
    """A new search's checked file, shared dataset and open tracking store (nothing recorded)."""
    from comod_platform.tracking import open_store

    sf = parse_search(raw, stem)
    data = load_shared_data(sf)
    open_store()
    return sf, data


def run_search(search_path: str | Path, name: str | None = None, address: str | None = None,
               storage: str | None = None) -> dict:
    """Start a new search from a search file; returns its summary. ``storage`` (else ``$COMOD_STORAGE``)
    keeps Ray Tune's experiment (:mod:`storage`). Ray starts while a second thread checks the file, loads
    the dataset and opens the tracking store; nothing is recorded until every check has passed."""
    source = resolve_search_path(search_path).resolve()  # joining a Ray job's cluster may change the working folder
    if problem := unwritable(runs_home(), "COMOD_HOME (the runs folder)"):
        raise SearchError(problem)
    if name is not None:
        preflight.refuse_existing(SearchPaths(check_name(name)))  # at once, before Ray starts
    raw, stem = read_search(search_path)  # a missing file or broken YAML stops here, before Ray starts
    _service_defaults()
    with ThreadPoolExecutor(1, thread_name_prefix="comod-prepare") as pool:
        prepared = pool.submit(_prepare_in_background, raw, stem)
        try:
            init_ray(address)
        finally:
            sf, data = prepared.result()  # its error (a bad file, a missing dataset) comes first
    paths = SearchPaths(name or default_name(sf.name))
    preflight.refuse_existing(paths)
    made_folder = not paths.root.exists()
    lock = paths.lock(f"comod search run {paths.name}")  # a second driver of this name is refused from here
    try:
        preflight.refuse_existing(paths, locked=True)  # a driver that made a search of the name meanwhile
        # the study's database: a team database, else SQLite in the search folder
        optuna_url = os.environ.get("COMOD_OPTUNA_STORAGE") or f"sqlite:///{paths.optuna_db}"
        preflight.check_optuna_storage(optuna_url)
        search_id = paths.search_id()
        from comod_platform.tracking import tracking_uri

        preflight.claim_stores(paths.name, search_id, optuna_url, tracking_uri())
        ray_storage = storage_mod.resolve(storage, str(paths.ray_storage))
        preflight.check_cluster(sf, address, ray_storage)  # before anything is made: a refused search leaves no trace
    except BaseException:
        lock.release()
        if made_folder:
            shutil.rmtree(paths.root, ignore_errors=True)
        raise
    with lock:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        shutil.copyfile(source, paths.search_file)
        study = optuna.create_study(study_name=paths.name, storage=optuna.storages.RDBStorage(optuna_url),
                                    load_if_exists=True, direction=direction(sf.search.mode))
        study.set_user_attr(TAG_SEARCH_ID, search_id)  # the searcher loads the study this search made
        uri, experiment_id, parent_run_id = _start_tracking(sf, paths.name, data, search_id)
        meta = SearchMeta(name=paths.name, study_name=paths.name, optuna_storage=optuna_url, tracking_uri=uri,
                          experiment_id=experiment_id, parent_run_id=parent_run_id, ray_storage=ray_storage,
                          created=time.time(), search_id=search_id, versions=versions(),
                          search_sha256=search_hash(raw), search_settings=raw)
        paths.write_meta(meta)
        return _fit(sf, paths, meta, data=data)


def resume_search(name: str, address: str | None = None, storage: str | None = None) -> dict:
    """Continue an interrupted search where it stopped."""
    paths = SearchPaths(check_name(name))
    meta = paths.read_meta()
    with paths.lock(f"comod search resume {name}"):  # refused while another driver runs it
        if storage and storage_mod.resolve(storage, meta.ray_storage) != meta.ray_storage:
            raise SearchError(f"search {name!r} keeps its experiment in {meta.ray_storage}; resume it there "
                              f"(leave --storage out)")
        preflight.check_unchanged(paths, meta)
        sf = parse_search(yaml.safe_load(paths.search_file.read_text()), name)
        if "***" in meta.optuna_storage:
            raise SearchError(f"search {name!r} keeps its study in {meta.optuna_storage}, whose password is not "
                              f"recorded: set COMOD_OPTUNA_STORAGE to that URL with its password, or give the "
                              f"password to the driver by reference (PGPASSWORD, or a PGPASSFILE)")
        preflight.check_optuna_storage(meta.optuna_storage)
        preflight.check_owned(meta)
        _service_defaults()
        init_ray(address)
        preflight.check_cluster(sf, address, meta.ray_storage)
        return _fit(sf, paths, meta, restore=True)


def _fit(sf: SearchFile, paths: SearchPaths, meta: SearchMeta, restore: bool = False,
         data: dict | None = None) -> dict:
    from mlflow.tracking import MlflowClient

    from comod_platform.searcher import close_running
    from comod_platform.writer import retry_call, usage as writer_usage

    recorded_before = writer_usage()  # this search's writes only, were there others in this process
    client = MlflowClient(tracking_uri=meta.tracking_uri)
    retry_call(client.update_run, meta.parent_run_id, status="RUNNING")
    status = "KILLED"
    with interrupts.stop_on_signal(meta.name):
        try:
            grid = build_tuner(sf, paths, meta, storage_mod.join(meta.ray_storage, meta.name), restore, data).fit()
            status = "KILLED" if interrupts.requested() else "FINISHED"
        except Exception:
            status = "FAILED"
            raise
        finally:
            try:  # no Optuna trial stays RUNNING while no driver runs it
                close_running(meta.optuna_storage, meta.study_name, interrupted=status != "FINISHED")
            except Exception as err:  # noqa: BLE001 - the stop goes on; a resume closes what is left
                print(f"comod: the running Optuna trials of {meta.name} stay RUNNING "
                      f"({redact_all(last_line(str(err)))}); `comod search resume {meta.name}` closes them",
                      file=sys.stderr, flush=True)
            retry_call(client.set_terminated, meta.parent_run_id, status=status)
    stopped = interrupts.requested()
    summary = {"name": meta.name, **summarise_grid(grid, sf, interrupts.unfinished if stopped else ())}
    if stopped:
        summary["stopped_by"] = signal.Signals(stopped).name
    summary["writers"] = writer_usage(recorded_before)  # what recording cost the driver (its writers' CPU)
    return summary


def run_or_resume(search: str | Path, name: str, address: str | None = None, storage: str | None = None) -> dict:
    """``comod search run SEARCH --name N --or-resume`` (a submitted job's command): resume search ``name``
    when the runs folder has it (from the same search file), else run it."""
    check_name(name)
    load_search(search)  # a broken file fails the same way in both cases
    search = source = resolve_search_path(search).resolve()
    # the job's working folder is Ray's to clean up: work from the runs folder instead
    home = runs_home()
    home.mkdir(parents=True, exist_ok=True)
    os.environ["COMOD_HOME"] = str(home)
    os.chdir(home)
    paths = SearchPaths(name)
    if not paths.exists():
        return run_search(search, name=name, address=address, storage=storage)
    if yaml.safe_load(source.read_text()) != yaml.safe_load(paths.search_file.read_text()):
        raise SearchError(f"a search named {name!r} exists already ({paths.root}) with another search file than "
                          f"{source}; continue it with the same file, or choose another --name")
    print(f"[search] resuming search {name} from {paths.root}", file=sys.stderr, flush=True)
    return resume_search(name, address=address, storage=storage)


__all__ = ["SearchError", "VERBOSE_ENV", "resume_search", "run_or_resume", "run_search"]
