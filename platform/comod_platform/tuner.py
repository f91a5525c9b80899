"""Ray for a search's driver (a local Ray kept off the terminal unless verbose, or a cluster), and the
search's Ray Tune ``Tuner``, new or restored."""
from __future__ import annotations

import logging
import os
import pickle
import sys
import warnings

from comod_platform import storage as storage_mod
from comod_platform.conventions import EPOCH
from comod_platform.preflight import SearchError
from comod_platform.summary import last_line

VERBOSE_ENV = "COMOD_VERBOSE"  # set (to 1) by --verbose: Ray's own output reaches a local search's terminal
KEEP_CHECKPOINTS = 3
"""Epoch checkpoints a trial keeps. Ray snapshots the experiment whenever a trial has written this many
since the last snapshot: fewer kept means more snapshots in the scheduling loop, more means more storage."""


class QuietRayHandler(logging.Handler):
    """The "ray" logger's one handler in a quiet local search: a failed trial's traceback becomes one line, Tune's
    closing list of unfinished trials goes (the summary has both), any other error is printed as it is."""

    FAILED = "Trial task failed for trial"

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            if record.name.startswith("ray.tune") and message.startswith(self.FAILED):
                trial = message[len(self.FAILED):].strip().removeprefix("run_trial_")  # comod shows the ID
                error = record.exc_info[1] if record.exc_info else None
                shown = last_line(str(error)) if error is not None else "see comod search status"
                text = f"comod: trial {trial} failed: {shown}"
            elif record.name.startswith("ray.tune") and message.startswith("Trials did not complete"):
                return
            else:
                text = self.format(record)
            print(text, file=sys.stderr, flush=True)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def quiet_ray() -> None:
    """Keep Ray's notices, INFO and WARNING lines and warnings off a local search's terminal (errors go
    through :class:`QuietRayHandler`); called before ``ray.init`` and after it, which resets the logger."""
    warnings.filterwarnings("ignore", module=r"ray(\.|$)")
    ray_logger = logging.getLogger("ray")
    ray_logger.setLevel(logging.ERROR)
    ray_logger.propagate = False
    handler = QuietRayHandler(logging.ERROR)
    handler.setFormatter(logging.Formatter("ray: %(levelname)s: %(message)s"))
    ray_logger.handlers[:] = [handler]


def init_ray(address: str | None) -> None:
    """Join the Ray cluster at ``address`` (else ``$RAY_ADDRESS``), or start a local Ray."""
    import ray

    from comod_platform.compat import local_ray_options

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    try:
        if address:
            # trials on the cluster's nodes need the driver's storage credentials and offline mode
            # (a submitted job's own runtime environment reaches the workers already)
            env = {} if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") else storage_mod.worker_env()
            ray.init(address=address, log_to_driver=False, runtime_env={"env_vars": env} if env else None)
        elif os.environ.get(VERBOSE_ENV, "") not in ("", "0", "false", "no"):
            ray.init(include_dashboard=False, log_to_driver=True, **local_ray_options())
        else:
            quiet_ray()
            ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False, **local_ray_options())
            quiet_ray()
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise SearchError(f"cannot reach the Ray cluster at {address}: {err}; check the address "
                          f"(ray status on the head node), or leave --address out to run locally") from None


def load_shared_data(sf) -> dict:
    """The base experiment's dataset, loaded once in the driver; trials get it from the object store."""
    from comod.data import load_data
    from comod_platform.trainable import pack

    return pack(load_data(sf.base_config()))


def build_tuner(sf, paths, meta, experiment_path: str, restore: bool, data: dict | None = None):
    """The search's Tuner: restored from ``experiment_path`` when ``restore`` and Ray Tune saved it there."""
    from ray import tune
    from ray.tune.logger import JsonLoggerCallback
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from comod_platform.searcher import StudySearcher, create_sampler, points_to_evaluate
    from comod_platform.trainable import data_key, run_trial
    from comod_platform.tune_callbacks import MlflowTrialCallback, ProgressCallback

    s = sf.search
    fn = tune.with_parameters(run_trial, search=sf, search_name=paths.name, shared_key=data_key(sf.base_config()),
                              home=str(paths.root.parent.parent), data=load_shared_data(sf) if data is None else data)
    trainable = tune.with_resources(fn, {"cpu": s.resources.cpu, "gpu": s.resources.gpu})
    if restore and tune.Tuner.can_restore(experiment_path):
        try:
            return tune.Tuner.restore(experiment_path, trainable, resume_unfinished=True, resume_errored=False,
                                      restart_errored=False)
        except (ImportError, AttributeError, TypeError, ValueError, EOFError, pickle.UnpicklingError) as err:
            started = ", ".join(f"{k} {v}" for k, v in meta.versions.items()) or "unrecorded versions"
            raise SearchError(f"cannot read the Ray Tune state of search {meta.name!r} in {experiment_path} "
                              f"({type(err).__name__}: {last_line(str(err), 200)}); it was written with "
                              f"{started}: resume with those versions, or run the search again under another "
                              f"--name") from None
    # ASHA stops any trial whose clock reaches max_t: one past the last epoch, so a trial's
    # natural end (its last epoch, then the final report) is never an early stop
    scheduler = FIFOScheduler() if s.scheduler.type == "fifo" else ASHAScheduler(
        time_attr=EPOCH, max_t=sf.max_epochs() + 1, grace_period=s.scheduler.grace_period,
        reduction_factor=s.scheduler.reduction_factor)
    searcher = StudySearcher(sf.suggest, s.metric, s.mode, meta.optuna_storage, meta.study_name, create_sampler(sf),
                             points=points_to_evaluate(sf), report_intermediate=s.scheduler.type != "fifo")
    callbacks = [JsonLoggerCallback(),  # the result grid reads its files
                 MlflowTrialCallback(sf, paths.name, meta.tracking_uri, meta.experiment_id, meta.parent_run_id),
                 ProgressCallback(s.metric, s.mode, s.num_trials)]
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=s.num_trials,
                                    max_concurrent_trials=s.max_concurrent, metric=s.metric, mode=s.mode,
                                    reuse_actors=True),
        run_config=tune.RunConfig(name=meta.name, storage_path=meta.ray_storage, verbose=0, callbacks=callbacks,
                                  failure_config=tune.FailureConfig(max_failures=s.max_retries),
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=KEEP_CHECKPOINTS)))
