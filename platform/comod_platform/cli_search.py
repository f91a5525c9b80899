"""``comod search ...``, ``comod export ...``, ``comod compare`` and ``comod dashboard``: the search commands.

Each handler turns the platform's errors into one-line :class:`UserError` messages (docs/guides/searches.md).
"""
from __future__ import annotations

import json
import os
import signal
import sys
from contextlib import suppress
from pathlib import Path

from comod_platform.conventions import COMPLETED, FAILED, INTERRUPTED, PRUNED
from comod_platform.dashboard import DEFAULT_PORT, DashboardError, serve
from comod_platform.errors import EXIT_FAILED, EXIT_USAGE, UserError, user_errors
from comod_platform.interrupts import EXIT_CODES, requested
from comod_platform.paths import disk_message, runs_home

SEARCH_HELP = "search file (search_spaces/NAME.yaml) or the NAME of one in search_spaces/"
RAY_HELP = "Ray cluster address (default: $RAY_ADDRESS, else a local Ray)"
_ADDRESS_HELP = "the Ray dashboard of the cluster's head node, http://HEAD:8265 (default: $RAY_ADDRESS when a URL)"


def add_commands(sub) -> dict:
    """Register the commands on ``sub`` (argparse subparsers); returns name -> handler."""
    search = sub.add_parser("search", help="run, resume and inspect hyperparameter searches")
    ssub = search.add_subparsers(dest="search_command", required=True, metavar="SEARCH_COMMAND")
    run = ssub.add_parser("run", help="run a search on this machine or an existing Ray cluster")
    run.add_argument("search", help=SEARCH_HELP)
    run.add_argument("--name", help="unique name of this search (default: file name and time)")
    run.add_argument("--address", help=RAY_HELP)
    run.add_argument("--storage", metavar="URI",
                     help="where Ray Tune keeps the experiment and trial checkpoints: a folder every node mounts, "
                          "or s3://BUCKET/PREFIX (default: $COMOD_STORAGE, else the search's folder)")
    run.add_argument("--or-resume", action="store_true",
                     help="resume the search named --name when the runs folder has it, else run it "
                          "(the entrypoint of a submitted job: a resubmission continues)")
    resume = ssub.add_parser("resume", help="continue an interrupted search")
    resume.add_argument("name")
    resume.add_argument("--address", help=RAY_HELP)
    for command in (run, resume):
        command.add_argument("--json", action="store_true",
                             help="end with the summary as JSON on stdout (for scripts) instead of the text one")
        command.add_argument("--verbose", action="store_true", help="let a local Ray's own output (its notices, "
                             "log lines, the trials' output) reach the terminal")
    status = ssub.add_parser("status", help="a table of a search's trials, or its job's state on a cluster")
    status.add_argument("name")
    status.add_argument("--address", help="a Ray dashboard URL (http://HEAD:8265): show the search's latest job "
                                          "there instead of the local table")
    ssub.add_parser("list", help="the searches in the runs folder")
    _add_job_commands(ssub)

    export = sub.add_parser("export", help="export a search's best config or its trial table")
    esub = export.add_subparsers(dest="export_command", required=True, metavar="WHAT")
    best = esub.add_parser("best", help="the best trial's experiment config, ready for comod train")
    trials = esub.add_parser("trials", help="one row per trial as Parquet")
    for command in (best, trials):
        command.add_argument("name")
        command.add_argument("--out", type=Path, required=True)
    best.add_argument("--top-k", type=int, default=1, help="re-evaluate the top K configs over new seeds first")
    best.add_argument("--seeds", type=int, nargs="+", help="new seeds for the re-evaluation")
    best.add_argument("--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE",
                      help="settings for final training, e.g. --set pretrain.epochs=30")

    compare = sub.add_parser("compare", help="stochastic vs deterministic vs none, from a search's trials")
    compare.add_argument("name")
    compare.add_argument("--metric", help="metric to compare (default: the search's)")
    compare.add_argument("--out", type=Path, help="folder for compare.md and plots (default: the search's)")
    compare.add_argument("--where", action="append", default=[], metavar="PATH=VALUE",
                         help="compare only the trials with this setting (repeatable; values as YAML), e.g. "
                              "--where pretrain.modulation_kind=none")
    dash = sub.add_parser("dashboard", help="serve optuna-dashboard on 127.0.0.1 for a search's Optuna study")
    dash.add_argument("name", help="the search (see comod search list)")
    dash.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port on 127.0.0.1 (default {DEFAULT_PORT})")
    return {"search": cmd_search, "export": cmd_export, "compare": cmd_compare, "dashboard": cmd_dashboard}


def _user_errors():
    """The errors a user can fix: the first :data:`USAGE_ERRORS` are bad input (exit 2), the rest failures (1)."""
    from comod.config import ConfigError
    from comod.data.taskdata import DatasetNotFoundError
    from comod_platform.results import ResultsError
    from comod_platform.runner import SearchError
    from comod_platform.search_state import BadName, SearchBusy, SearchNotFound
    from comod_platform.tracking import TrackingError

    return (ConfigError, BadName, DatasetNotFoundError, SearchError, SearchNotFound, SearchBusy, TrackingError,
            ResultsError)


USAGE_ERRORS = 2


def cmd_search(args) -> int:
    if args.search_command in JOB_COMMANDS or (args.search_command == "status" and args.address):
        return _job_command(args)
    if args.search_command == "run" and args.or_resume and not args.name:
        raise UserError("--or-resume needs the search's --name: the one to resume when it exists, e.g. "
                        "comod search run SEARCH --name N --or-resume")
    if getattr(args, "verbose", False):
        from comod_platform.runner import VERBOSE_ENV

        os.environ[VERBOSE_ENV] = "1"  # also reaches run_or_resume's run or resume
    if args.search_command in ("run", "resume") and getattr(args, "console", False) and not (
            args.address or os.environ.get("RAY_ADDRESS")):
        from comod_platform import own_session

        own_session.enter()  # a local Ray: the driver and its Ray out of reach of a signal to the caller's group
    try:
        if args.search_command in ("run", "resume"):
            from comod_platform import runner

            if args.search_command == "resume":
                summary = runner.resume_search(args.name, address=args.address)
            else:
                start = runner.run_or_resume if args.or_resume else runner.run_search
                summary = start(args.search, name=args.name, address=args.address, storage=args.storage)
        elif args.search_command == "status":
            return _status(args.name)
        else:
            from comod_platform.search_state import known_searches

            print("\n".join(known_searches()) or "no searches yet")
            return 0
    except KeyboardInterrupt:  # a signal before the search's trials started: nothing ran yet
        name = getattr(args, "name", None)
        again = f"comod search resume {name}" if name and _exists(name) else "the same command again"
        print(f"comod: interrupted before any trial ran; start it with {again}", file=sys.stderr, flush=True)
        return EXIT_CODES.get(requested(), 130)
    except OSError as err:
        import errno

        if err.errno not in (errno.ENOSPC, errno.EACCES, errno.EPERM, errno.EROFS, errno.EDQUOT):
            raise
        raise UserError(disk_message(err, runs_home(), "COMOD_HOME (the runs folder)"), EXIT_FAILED) from None
    except Exception as err:
        errors = _user_errors()  # imported here, not before: a search starts Ray while torch loads
        if not isinstance(err, errors):
            raise
        code = EXIT_USAGE if isinstance(err, errors[:USAGE_ERRORS]) else EXIT_FAILED
        raise UserError(str(err), code) from None
    if getattr(args, "json", False):
        print(json.dumps(summary, indent=2))
    else:
        print(format_summary(summary), flush=True)
    if summary.get("stopped_by"):
        print(f"interrupted: continue with comod search resume {summary['name']}", file=sys.stderr, flush=True)
        return EXIT_CODES.get(getattr(signal, summary["stopped_by"]), 130)
    if summary[COMPLETED] == 0:
        print("comod: no trial completed; see `comod search status` and the failed runs in the UI",
              file=sys.stderr)
        return EXIT_FAILED
    return 0


SUMMARY_COLUMNS = (("test/mean_f1", "test F1"), ("test/mean_recall", "test recall"),
                   ("test/mean_precision", "test precision"))


def _table(rows: list[list[str]], indent: str = "  ") -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [(indent + "  ".join(cell.ljust(w) for cell, w in zip(row, widths))).rstrip() for row in rows]


def _number(value) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) and value == value else "-"


def _exists(name: str) -> bool:
    from comod_platform.search_state import BadName, SearchPaths

    with suppress(BadName):
        return SearchPaths(name).exists()
    return False


def format_summary(summary: dict) -> str:
    """The end of ``comod search run`` / ``resume``: trials by state, the best of each kind, errors, next commands."""
    name, metric = summary.get("name") or "SEARCH", summary.get("metric", "val/mean_f1")
    states = [f"{summary.get(COMPLETED, 0)} completed", f"{summary.get(PRUNED, 0)} stopped early",
              f"{summary.get(FAILED, 0)} failed"]
    if summary.get("stopped_by") or summary.get(INTERRUPTED):
        states.insert(2, f"{summary.get(INTERRUPTED, 0)} interrupted")
    others = summary.get("trials", 0) - sum(summary.get(k, 0) for k in (COMPLETED, PRUNED, FAILED, INTERRUPTED))
    if others > 0:
        states.append(f"{others} not finished")
    lines = [f"search {name}: {summary.get('trials', 0)} trials: {', '.join(states)}"]
    per_kind = summary.get("best_per_kind") or {}
    if per_kind:
        lines += ["", f"best trial of each kind, by {metric} (the search metric):"]
        rows = [["kind", "trial", metric] + [label for _, label in SUMMARY_COLUMNS]]
        for kind, top in per_kind.items():
            if top is None:
                rows.append([kind, "none completed", "-"] + ["-"] * len(SUMMARY_COLUMNS))
            else:
                rows.append([kind, str(top.get("trial_id")), _number(top.get("value"))]
                            + [_number(top.get(key)) for key, _ in SUMMARY_COLUMNS])
        lines += _table(rows)
    elif summary.get("best"):
        lines += ["", f"best {metric}: {_number(summary['best']['value'])} (trial {summary['best']['trial_id']})"]
    failures = summary.get("failures") or []
    if failures:
        lines += ["", "failed trials (the error's last line; the whole one is in the trial's MLflow run):"]
        lines += [f"  {f.get('trial_id')}: {f.get('error')}" for f in failures]
    lines += ["", "next:"]
    lines += _table([[f"comod ui {name} --open", f"the runs in MLflow's UI (experiment search/{name})"],
                     [f"comod search status {name}", "the table of trials"],
                     [f"comod export best {name} --out best.yaml", "the best trial's config, for comod train"],
                     [f"comod compare {name}", "stochastic vs deterministic vs none, and what mattered"],
                     [f"comod dashboard {name}", "the Optuna study in optuna-dashboard"]])
    return "\n".join(lines)


def _status(name: str) -> int:
    from comod_platform.results import load_results

    results = load_results(name)
    metric, searched = results.metric, list(results.search.space)
    table = [["trial", "state", "epochs", metric, f"best {metric}"] + searched]
    for t in results.trials:
        final, best = t.value(metric), t.best
        table.append([t.trial_id, t.state, str(t.epochs), f"{final:.4f}" if final is not None else "-",
                      f"{best:.4f}" if best is not None else "-"]
                     # a conditional setting the trial did not sample (its `when` fails) is blank, not the base value
                     + [_short(t.flat.get(p)) if results.search.space[p].active(t.flat) else "" for p in searched])
    print("\n".join(_table(table, indent="")))
    counts = ", ".join(f"{n} {state}" for state, n in results.counts().items() if n)
    print(f"{len(results.trials)} trials of {results.search.search.num_trials}: {counts or 'none yet'}")
    return 0


JOB_COMMANDS = ("submit", "logs", "stop")


def _add_job_commands(ssub) -> None:
    """``comod search submit|logs|stop``: searches as Ray jobs on a cluster (see :mod:`comod_platform.jobs`)."""
    submit = ssub.add_parser("submit", help="submit a search to a Ray cluster as a Ray job")
    submit.add_argument("search", help=SEARCH_HELP)
    submit.add_argument("--address", help=_ADDRESS_HELP)
    submit.add_argument("--name", help="unique name of this search (default: file name and time); submitting the "
                                       "same name again continues that search")
    submit.add_argument("--storage", metavar="URI",
                        help="shared storage for trial checkpoints (s3://BUCKET/PREFIX, or a path every node "
                             "mounts); needed on a cluster of several nodes (default: $COMOD_STORAGE)")
    submit.add_argument("--ship", choices=("wheel", "image"), default="wheel",
                        help="wheel: build this project's wheel and ship it with the job (default); "
                             "image: ship nothing, the cluster's image has comod")
    submit.add_argument("--env", dest="env", action="append", default=[], metavar="KEY=VALUE",
                        help="an environment variable of the job, e.g. --env COMOD_HOME=/shared/comod-runs; "
                             "MLFLOW_TRACKING_URI, COMOD_OPTUNA_STORAGE and COMOD_STORAGE are passed on when set")
    logs = ssub.add_parser("logs", help="the logs of a search's latest job on a Ray cluster")
    stop = ssub.add_parser("stop", help="stop a search's running job on a Ray cluster")
    for command in (logs, stop):
        command.add_argument("name")
        command.add_argument("--address", help=_ADDRESS_HELP)
    logs.add_argument("--follow", action="store_true", help="follow the logs until the job ends")


def _job_command(args) -> int:
    from comod.config import ConfigError
    from comod_platform import jobs

    try:
        if args.search_command == "submit":
            sub = jobs.submit(args.search, address=args.address, name=args.name, storage=args.storage,
                              ship=args.ship, env_pairs=args.env)
            for note in sub.notes:
                print(f"comod: note: {note}", file=sys.stderr)
            where = f"--address {sub.address}"
            print(f"name: {sub.name}\nsubmission id: {sub.submission_id}\nentrypoint: {sub.entrypoint}\n"
                  f"follow it:  comod search logs {sub.name} {where} --follow\n"
                  f"status:     comod search status {sub.name} {where}\n"
                  f"stop it:    comod search stop {sub.name} {where}\n"
                  f"continue:   comod search submit {args.search} --name {sub.name} {where} (resumes where it "
                  f"stopped)")
            return 0
        if args.search_command == "status":
            s = jobs.status(args.address, args.name)
            print(f"search {s['name']}: {s['status']}\n  job        {s['submission_id']} on {s['address']}\n"
                  f"  started    {s['start_time']}\n  ended      {s['end_time']}")
            if s["message"]:
                print(f"  message    {s['message']}")
            print(f"  progress   {s['progress'] or '(no progress line yet)'}")
            return 0
        if args.search_command == "logs":
            submission_id = jobs.logs(args.address, args.name, follow=args.follow)
            if args.follow:
                final = jobs.status(args.address, args.name)
                print(f"comod: job {submission_id} is {final['status']}", file=sys.stderr)
            return 0
        done = jobs.stop(args.address, args.name)
        where = f"--address {done['address']}"
        if not done["stopped"]:
            print(f"job {done['submission_id']} of search {done['name']} had ended already ({done['status']}); "
                  f"nothing to stop")
        elif done["status"] in jobs.TERMINAL:
            print(f"stopped job {done['submission_id']} of search {done['name']}: {done['status']}")
        else:
            print(f"asked job {done['submission_id']} of search {done['name']} to stop; it is still "
                  f"{done['status']}: see `comod search status {done['name']} {where}`")
        print(f"continue it later: comod search submit SEARCH --name {done['name']} {where} (the same search file; "
              f"it resumes), or comod search resume {done['name']} on the cluster", file=sys.stderr)
        return 0
    except ConfigError as err:
        raise UserError(str(err), EXIT_USAGE) from None
    except jobs.JobsError as err:
        raise UserError(str(err), err.code) from None


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value)


def cmd_export(args) -> int:
    from comod_platform.export import ExportError, export_best, export_trials

    with user_errors(ExportError, *_user_errors()):
        if args.export_command == "trials":
            print(f"wrote {export_trials(args.name, args.out)}")
            return 0
        chosen = export_best(args.name, args.out, top_k=args.top_k, reeval_seeds=args.seeds,
                             overrides=args.overrides, progress=lambda line: print(line, file=sys.stderr))
    print(f"wrote {chosen['path']}: trial {chosen['trial_id']} ({chosen['metric']}={chosen['value']:.4f}); "
          f"run it with: comod train {chosen['path']}")
    return 0


def cmd_compare(args) -> int:
    import yaml

    from comod_platform.compare import CompareError, compare

    where = {}
    for item in args.where:
        path, sep, text = item.partition("=")
        if not sep or not path.strip():
            raise UserError(f"--where {item!r}: expected PATH=VALUE, e.g. pretrain.modulation_kind=none")
        where[path.strip()] = yaml.safe_load(text) if text.strip() else text
    with user_errors(CompareError, *_user_errors()):
        result = compare(args.name, metric=args.metric, out_dir=args.out, where=where)
    report = next((f for f in result.get("files", []) if f.endswith(".md")), None)
    if report:
        print(Path(report).read_text())
        print(f"written: {', '.join(result['files'])}", file=sys.stderr)
    return 0


def cmd_dashboard(args) -> int:
    from comod_platform.search_state import SearchNotFound

    if not 0 < args.port < 65536:
        raise UserError(f"--port {args.port}: expected a port number from 1 to 65535", EXIT_USAGE)
    with user_errors(SearchNotFound, DashboardError):
        return serve(args.name, args.port)
