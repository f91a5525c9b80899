"""The ``comod`` command line.

``comod train CONFIG [--set path=value ...] [--out DIR]`` runs one
experiment and logs it to MLflow; ``comod ui`` serves the MLflow UI of the
embedded store on 127.0.0.1. Bad input exits non-zero with one message that
names the problem and the fix, never a bare traceback.
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

from comod_platform.errors import EXIT_FAILED, EXIT_USAGE, UserError  # noqa: F401 - re-exported


def _parser() -> tuple[argparse.ArgumentParser, dict]:
    parser = argparse.ArgumentParser(prog="comod", description="Task adaptation by stochastic comodulation.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = sub.add_parser("train", help="run one experiment (pretrain, fine-tune, evaluate)")
    train.add_argument("config", help="experiment YAML (see configs/)")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE",
                       help="override a setting by its dotted path, e.g. --set modulation.noise_scale=0.3")
    train.add_argument("--out", type=Path, help="output folder (default: the runs folder's train/NAME-TIME); "
                                                "an interrupted run in it is resumed")
    train.add_argument("--restart", action="store_true", help="discard a checkpoint in --out and start over")
    train.add_argument("--experiment", default="comod-train", help="MLflow experiment name")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")

    ui = sub.add_parser("ui", help="serve the MLflow UI of the runs folder on 127.0.0.1")
    ui.add_argument("--port", type=int, default=5000)
    from comod_platform.cli_search import add_commands

    handlers = {"train": cmd_train, "ui": cmd_ui, **add_commands(sub)}
    return parser, handlers


def main(argv: list[str] | None = None) -> int:
    parser, handlers = _parser()
    args = parser.parse_args(argv)
    try:
        return handlers[args.command](args)
    except UserError as err:
        print(f"comod: error: {err}", file=sys.stderr)
        return err.code
    except KeyboardInterrupt:
        print("comod: interrupted; run the same command again (with the same --out) to resume",
              file=sys.stderr)
        return 130


def cmd_train(args) -> int:
    from comod.config import ConfigError, config_to_dict, load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        raise UserError(str(err)) from None
    # imported once the config is good: a config error need not wait for MLflow's import
    from comod.data import load_data
    from comod.data.taskdata import DatasetNotFoundError
    from comod.train import (CHECKPOINT, TrainingError, config_difference, load_checkpoint, run_experiment,
                             task_indices)
    from comod_platform.paths import default_train_dir
    from comod_platform.progress import ProgressCallbacks
    from comod_platform.tracking import RUN_FILE, RunLogger, TrackingError, check_reachable, tracking_uri

    out = args.out or default_train_dir(cfg.name)
    saved = None
    if args.restart:
        # only what a run writes: --out may be a folder that holds other files
        for name in (CHECKPOINT, CHECKPOINT + ".tmp", "config.yaml", "metrics.json", RUN_FILE):
            (out / name).unlink(missing_ok=True)
    elif (out / CHECKPOINT).exists():
        # checked before the MLflow run is touched, so a mismatch changes nothing recorded
        saved = load_checkpoint(out / CHECKPOINT)
        diff = config_difference(saved["config"], config_to_dict(cfg))
        if diff is not None:
            raise UserError(f"{out} holds a run of another config ({diff}); pass --restart to discard it "
                            f"and start over, or choose another --out")
    finished = saved is not None and saved.get("metrics") is not None
    data = None
    try:
        check_reachable(tracking_uri())
        if not finished:  # bad data or task names fail here, before an MLflow run exists
            data = load_data(cfg)
            for phase in ("pretrain", "finetune"):
                task_indices(data, getattr(cfg, phase).tasks, f"{phase}.tasks")
        logger = RunLogger(cfg, out, experiment=args.experiment)
    except TrackingError as err:
        raise UserError(str(err), EXIT_FAILED) from None
    except DatasetNotFoundError as err:
        raise UserError(str(err), EXIT_FAILED) from None
    except TrainingError as err:
        raise UserError(str(err)) from None
    if finished and logger.previous_status == "FINISHED":
        metrics = saved["metrics"]  # nothing to run or log again
    else:
        if saved is not None:
            logger.backfill(saved["history"])
        callbacks = ProgressCallbacks(logger, enabled=not args.no_progress)
        status = "FAILED"
        try:
            metrics = run_experiment(cfg, out, data=data, callbacks=callbacks)
            status = "FINISHED"
        except DatasetNotFoundError as err:
            raise UserError(str(err), EXIT_FAILED) from None
        except (TrainingError, ValueError, FileNotFoundError) as err:
            raise UserError(str(err), EXIT_FAILED) from None
        except KeyboardInterrupt:
            status = "KILLED"  # the run is ended below, once this handler has let go of the interrupted frames
        finally:
            callbacks.close()
            if status == "FAILED":
                logger.finish(status)
        if status == "KILLED":
            # Ctrl-C can land inside an MLflow write; its database connection, still holding SQLite's
            # write lock, is released with the frames of that write, which the handler above kept alive
            gc.collect()
            logger.finish(status)
            raise KeyboardInterrupt
        logger.log_metrics(metrics, step=int(metrics.get("steps", 0)), skip_logged=logger.resumed)
        logger.log_artifacts([out / "config.yaml", out / "metrics.json", out / "checkpoint.pt"])
        from comod_platform.plots import plot_run

        logger.log_artifacts(plot_run(out), "plots")
        logger.finish("FINISHED")
    summary = {k: round(v, 4) for k, v in metrics.items() if k.startswith("test/mean_")}
    print(json.dumps(summary, indent=2))
    print(f"outputs in {out}; MLflow run {logger.run_id} (browse with: comod ui)")
    return 0


def cmd_ui(args) -> int:
    from comod_platform.paths import runs_home
    from comod_platform.tracking import artifact_root, tracking_uri

    uri = tracking_uri()
    if uri.startswith(("http://", "https://")):
        print(f"MLFLOW_TRACKING_URI points at a server; its UI is {uri}")
        return 0
    # one worker: a local single-user UI (MLflow's default of 4 takes a minute to start on 2 cores)
    command = [sys.executable, "-m", "mlflow", "ui", "--host", "127.0.0.1", "--port", str(args.port),
               "--workers", "1", "--backend-store-uri", uri]
    root = artifact_root()
    if root:
        command += ["--default-artifact-root", root]
    print(f"MLflow UI of {uri} on http://127.0.0.1:{args.port} (runs folder {runs_home()}); Ctrl-C stops it")
    try:
        return subprocess.call(command, env=os.environ.copy())
    except KeyboardInterrupt:
        return 0


def run() -> None:
    """The console script: :func:`main`, then an exit that skips the interpreter's teardown.

    A search or a training run has loaded torch, Ray and MLflow, and unloading them takes seconds
    after the work is done and recorded: every MLflow and Optuna write went out before ``main``
    returned, Ray is shut down (a local Ray that a search started, with its agents), and this
    command's output and logs are flushed here."""
    code = main()
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


if __name__ == "__main__":
    run()
