"""The ``comod`` command line: ``comod train`` (one experiment, logged to MLflow) and ``comod ui`` (the
runs folder's MLflow UI on 127.0.0.1, telemetry off) here, the search commands in :mod:`cli_search`. Bad
input exits non-zero with one message that names the problem and the fix (docs/guides/failures.md)."""
from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from contextlib import suppress
from pathlib import Path

from comod_platform.errors import EXIT_FAILED, EXIT_USAGE, UserError, user_errors
from comod_platform.paths import disk_message, runs_home, unwritable


def _parser() -> tuple[argparse.ArgumentParser, dict]:
    from importlib import metadata

    try:
        version = metadata.version("comod")
    except metadata.PackageNotFoundError:  # a checkout that was never installed
        version = "unknown (not installed: pip install -e .)"
    parser = argparse.ArgumentParser(prog="comod", description="Task adaptation by stochastic comodulation.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version}",
                        help="print comod's version (the installed package's) and exit")
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

    ui = sub.add_parser("ui", help="serve the MLflow UI of the runs folder on 127.0.0.1; with NAME, print (or "
                                   "--open) the runs page of search NAME")
    ui.add_argument("name", nargs="?", metavar="NAME",
                    help="a search's --name (or an MLflow experiment's name, e.g. comod-train): print the URL of "
                         "its runs page, with the trials and their key metrics side by side")
    ui.add_argument("--port", type=int, default=5000)
    ui.add_argument("--open", action="store_true",
                    help="open that page (else the list of experiments) in a web browser")
    ui.add_argument("--verbose", action="store_true",
                    help="let the MLflow server's own output (its start-up, warnings, every request) reach the "
                         "terminal instead of the runs folder's ui.log")
    from comod_platform.cli_search import add_commands

    return parser, {"train": cmd_train, "ui": cmd_ui, **add_commands(sub)}


def main(argv: list[str] | None = None, console: bool = False) -> int:
    """Run the command ``argv``; ``console``: as the console script, whose search may fork (own_session)."""
    parser, handlers = _parser()
    args = parser.parse_args(argv)
    args.console = console
    try:
        return handlers[args.command](args)
    except UserError as err:
        from comod_platform.credentials import redact_all

        print(f"comod: error: {redact_all(str(err))}", file=sys.stderr)  # a URL's password is never echoed
        return err.code
    except KeyboardInterrupt:
        print("comod: interrupted; run the same command again (with the same --out) to resume",
              file=sys.stderr)
        return 143 if _terminated and _terminated[0] == signal.SIGTERM else 130


_terminated: list[int] = []


def _stop_signal(signum, frame):
    """Ctrl-C and SIGTERM end ``comod train`` (exit 130 or 143); once it trains, at the next step
    (:func:`_stop_at_step`), so that the stop never lands inside a database write."""
    _terminated.append(signum)
    raise KeyboardInterrupt


def _stop_at_step(*_) -> None:
    if _terminated:
        raise KeyboardInterrupt


def cmd_train(args) -> int:
    previous = {sig: signal.signal(sig, _stop_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    _terminated.clear()
    try:
        return _train(args)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _train(args) -> int:
    from comod.config import ConfigError, load_config

    with user_errors(ConfigError, code=EXIT_USAGE):
        cfg = load_config(args.config, args.overrides)
    # imported once the config is good: a config error need not wait for MLflow's import
    from comod.data import load_data
    from comod.data.taskdata import DatasetNotFoundError
    from comod.train import (CHECKPOINT, TrainingError, check_same_config, load_checkpoint, run_experiment,
                             task_indices)
    from comod_platform.plots import plot_run
    from comod_platform.progress import ProgressCallbacks
    from comod_platform.tracking import RUN_FILE, RunLogger, TrackingError, check_reachable, tracking_uri

    out = args.out or runs_home() / "train" / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if problem := unwritable(out, "--out" if args.out else "COMOD_HOME"):
        raise UserError(problem, EXIT_FAILED)
    saved = None
    if args.restart:
        # only what a run writes: --out may be a folder that holds other files
        for name in (CHECKPOINT, CHECKPOINT + ".tmp", "config.yaml", "metrics.json", RUN_FILE):
            (out / name).unlink(missing_ok=True)
    elif (out / CHECKPOINT).exists():
        # checked before the MLflow run is touched, so a mismatch changes nothing recorded
        fix = "pass --restart to discard it and start over, or choose another --out"
        with user_errors(TrainingError):
            saved = load_checkpoint(out / CHECKPOINT, fix=fix)
        with user_errors(TrainingError, code=EXIT_USAGE):
            check_same_config(saved, cfg, out, fix)
    finished = saved is not None and saved.get("metrics") is not None
    data = None
    with user_errors(TrackingError, DatasetNotFoundError), user_errors(TrainingError, code=EXIT_USAGE):
        check_reachable(tracking_uri())
        if not finished:  # bad data or task names fail here, before an MLflow run exists
            data = load_data(cfg)
            for phase in ("pretrain", "finetune"):
                task_indices(data, getattr(cfg, phase).tasks, f"{phase}.tasks")
        logger = RunLogger(cfg, out, experiment=args.experiment, data=data)
    if finished and logger.previous_status == "FINISHED":
        metrics = saved["metrics"]  # nothing to run or log again
    else:
        if saved is not None:
            logger.backfill(saved["history"])
        callbacks = ProgressCallbacks(logger, enabled=not args.no_progress)
        show_step = callbacks.on_step
        callbacks.on_step = lambda *step: (show_step(*step), _stop_at_step())
        status = "FAILED"
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, lambda signum, frame: _terminated.append(signum))
            _stop_at_step()  # a signal that came while the run was being set up
            metrics = run_experiment(cfg, out, data=data, callbacks=callbacks)
            status = "FINISHED"
        except (DatasetNotFoundError, TrainingError, ValueError, FileNotFoundError) as err:
            raise UserError(str(err), EXIT_FAILED) from None
        except OSError as err:  # a full disk, a folder made read-only under the run
            raise UserError(disk_message(err, out), EXIT_FAILED) from None
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
        logger.log_metrics(metrics, step=int(metrics.get("steps", 0)), skip_logged=logger.previous_status is not None)
        logger.log_artifacts([out / "config.yaml", out / "metrics.json", out / "checkpoint.pt"])
        logger.log_artifacts(plot_run(out), "plots")
        logger.finish("FINISHED")
    summary = {k: round(v, 4) for k, v in metrics.items() if k.startswith("test/mean_")}
    print(json.dumps(summary, indent=2))
    print(f"outputs in {out}; MLflow run {logger.run_id} (browse with: comod ui {shlex.quote(args.experiment)} --open)")
    return 0


def experiment_page(name: str, uri: str) -> tuple[str, str]:
    """(tracking URI, experiment id) of search ``name``, else of experiment ``name`` at ``uri``, tagged so
    that its page opens on the runs table."""
    from mlflow.tracking import MlflowClient

    from comod_platform.search_state import SearchPaths, known_searches
    from comod_platform.tracking import TrackingError, check_reachable, mark_experiment

    paths = SearchPaths(name)
    with user_errors(TrackingError):
        meta = paths.read_meta() if paths.exists() else None
        uri = meta.tracking_uri if meta else uri
        check_reachable(uri)
        client = MlflowClient(tracking_uri=uri)
        if meta:
            experiment_id, params = meta.experiment_id, client.get_run(meta.parent_run_id).data.params
        elif (found := client.get_experiment_by_name(name)) is not None:
            experiment_id, params = found.experiment_id, {}
        else:
            known = known_searches()
            hint = f"searches here: {', '.join(known)}" if known else "no search has been run here yet"
            raise UserError(f"no search or MLflow experiment named {name!r} in {uri} ({hint}); "
                            f"`comod search list` lists the searches", EXIT_FAILED)
        mark_experiment(client, experiment_id, params.get("search.metric"), params.get("search.mode") or "max")
    return uri, experiment_id


def _wait_until_serving(url: str, proc: subprocess.Popen, timeout: float = 300.0) -> bool:
    """Poll ``url``/health until the server answers (True), or it exits or ``timeout`` s pass (False)."""
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return True
        except OSError:
            time.sleep(0.25)
    return False


def _show(page: str, name: str | None, open_page: bool) -> None:
    import webbrowser

    if name:
        print(f"{name}: {page}", flush=True)
    if open_page and not webbrowser.open(page):
        print(f"comod: no web browser found here; open {page} yourself", file=sys.stderr)


def cmd_ui(args) -> int:
    from comod_platform.tracking import UI_MODE, artifact_root, runs_url, tracking_uri

    uri, experiment_id = experiment_page(args.name, tracking_uri()) if args.name else (tracking_uri(), None)
    server = uri.startswith(("http://", "https://"))
    base = uri.rstrip("/") if server else f"http://127.0.0.1:{args.port}"
    page = runs_url(base, experiment_id) if experiment_id else f"{base}/#/experiments?{UI_MODE}"
    if server:
        print(f"MLFLOW_TRACKING_URI points at a server; its UI is {uri}")
        _show(page, args.name, args.open)
        return 0
    # one worker: a local single-user UI (MLflow's default of 4 takes a minute to start on 2 cores)
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(args.port),
               "--workers", "1", "--backend-store-uri", uri]
    if root := artifact_root():
        command += ["--default-artifact-root", root]
    log = None if args.verbose else runs_home() / "ui.log"
    try:
        output = open(log, "w") if log else None
    except OSError:  # an unwritable runs folder: no log
        log, output = None, subprocess.DEVNULL
    shown = "" if log is None else f"; its log: {log}"
    print(f"MLflow UI of {uri} on {base} (runs folder {runs_home()}{shown}); Ctrl-C stops it", flush=True)
    # in a session of its own: the server and the uvicorn workers it starts are one process group, which
    # _stop ends as a whole when this command ends (Ctrl-C, SIGTERM, or the server's own exit)
    # no usage events from its pages, a live log
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(command, env=env, start_new_session=True, stdout=output,
                            stderr=subprocess.STDOUT if output is not None else None)
    if log is not None:
        output.close()  # the server holds its own copy

    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # raises KeyboardInterrupt
    try:
        serving = _wait_until_serving(base, proc)
        if serving:
            _show(page, args.name, args.open)
        code = proc.wait()
        if serving and not code:
            return 0
        # uvicorn ends with status 0 when it cannot bind the port: say why, in one line
        why = _server_error(log) if log is not None else "see its output above"
        print(f"comod: error: the MLflow server {'ended' if serving else 'did not start'} on {base}: {why}",
              file=sys.stderr)
        return code or EXIT_FAILED
    except KeyboardInterrupt:
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
        _stop(proc)


def _server_error(log: Path) -> str:
    """The server's last ERROR line (else its last line), without the time stamp, and where its log is."""
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        lines = []
    errors = [line for line in lines if "ERROR" in line or "Error" in line]
    last = (errors or lines or ["no output"])[-1].split("ERROR:", 1)[-1].strip()
    return f"{last[:300]} (its log: {log})"


def _stop(proc: subprocess.Popen) -> None:
    """End the server's process group: SIGTERM for a clean stop, then SIGKILL so that no worker keeps the port."""
    with suppress(ProcessLookupError, subprocess.TimeoutExpired):
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(15)
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    if proc.poll() is None:
        proc.wait(5)


def run() -> None:
    """The console script: :func:`main`, then an exit that skips the interpreter's slow teardown."""
    code = main(console=True)
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        # no garbage collection from here on: object refs in reference cycles, freed in another thread while
        # ray.shutdown takes the driver down, would end the process with status 1 ("core worker ... shutdown")
        gc.freeze()
        ray.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


if __name__ == "__main__":
    run()
