"""The ``comod`` command line.

``comod train CONFIG [--set path=value ...] [--out DIR]`` runs one
experiment and logs it to MLflow; ``comod ui`` serves the MLflow UI of the
embedded store on 127.0.0.1. Bad input exits non-zero with one message that
names the problem and the fix, never a bare traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

EXIT_USAGE = 2
EXIT_FAILED = 1


class UserError(Exception):
    """A problem the user can fix; printed as one line, exit status ``code``."""

    def __init__(self, message: str, code: int = EXIT_USAGE):
        super().__init__(message)
        self.code = code


def _parser() -> argparse.ArgumentParser:
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return {"train": cmd_train, "ui": cmd_ui}[args.command](args)
    except UserError as err:
        print(f"comod: error: {err}", file=sys.stderr)
        return err.code
    except KeyboardInterrupt:
        print("comod: interrupted; run the same command again (with the same --out) to resume",
              file=sys.stderr)
        return 130


def cmd_train(args) -> int:
    from comod.config import ConfigError, load_config
    from comod.data.taskdata import DatasetNotFoundError
    from comod.train import TrainingError, run_experiment
    from comod_platform.paths import default_train_dir
    from comod_platform.progress import ProgressCallbacks
    from comod_platform.tracking import RunLogger, TrackingError

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        raise UserError(str(err)) from None
    out = args.out or default_train_dir(cfg.name)
    if args.restart and out.exists():
        shutil.rmtree(out)
    try:
        logger = RunLogger(cfg, out, experiment=args.experiment)
    except TrackingError as err:
        raise UserError(str(err), EXIT_FAILED) from None
    callbacks = ProgressCallbacks(logger, enabled=not args.no_progress)
    status = "FAILED"
    try:
        metrics = run_experiment(cfg, out, callbacks=callbacks)
        status = "FINISHED"
    except DatasetNotFoundError as err:
        raise UserError(str(err), EXIT_FAILED) from None
    except (TrainingError, ValueError, FileNotFoundError) as err:
        raise UserError(str(err), EXIT_FAILED) from None
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        callbacks.close()
        if status != "FINISHED":
            logger.finish(status)
    logger.log_metrics(metrics, step=int(metrics.get("steps", 0)))
    logger.log_artifacts([out / "config.yaml", out / "metrics.json", out / "checkpoint.pt"])
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
    command = [sys.executable, "-m", "mlflow", "ui", "--host", "127.0.0.1", "--port", str(args.port),
               "--backend-store-uri", uri]
    root = artifact_root()
    if root:
        command += ["--default-artifact-root", root]
    print(f"MLflow UI of {uri} on http://127.0.0.1:{args.port} (runs folder {runs_home()}); Ctrl-C stops it")
    try:
        return subprocess.call(command, env=os.environ.copy())
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
