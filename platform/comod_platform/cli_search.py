"""The search commands, ``comod search|export|compare|dashboard``; each handler turns the platform's errors
into one-line :class:`UserError` messages (docs/guides/searches.md)."""
from __future__ import annotations

import errno
import json
import os
import signal
import sys
from pathlib import Path

from comod_platform.conventions import COMPLETED, FAILED, INTERRUPTED, PRUNED
from comod_platform.dashboard import DEFAULT_PORT, DashboardError, serve
from comod_platform.errors import EXIT_FAILED, EXIT_USAGE, UserError, user_errors
from comod_platform.interrupts import EXIT_CODES, requested
from comod_platform.paths import disk_message, runs_home
from comod_platform.search_state import BadName, SearchBusy, SearchNotFound, known_searches

SEARCH_HELP = "search file (search_spaces/NAME.yaml) or the NAME of one in search_spaces/"
RAY_HELP = "Ray cluster address (default: $RAY_ADDRESS, else a local Ray)"
JOB_HELP = "the Ray dashboard of the cluster's head node, http://HEAD:8265 (default: $RAY_ADDRESS when a URL)"
NAME_HELP = "unique name of this search (default: file name and time)"


def _command(sub, command: str, help: str, first: str = "name", address: str | None = None):
    """A subcommand whose first argument is ``first`` (a search's ``name``, or a ``search`` file)."""
    parser = sub.add_parser(command, help=help)
    parser.add_argument(first, **({"help": SEARCH_HELP} if first == "search" else {}))
    if address:
        parser.add_argument("--address", help=address)
    return parser


def add_commands(sub) -> dict:
    """Register the commands on ``sub`` (argparse subparsers); returns name -> handler."""
    search = sub.add_parser("search", help="run, resume and inspect hyperparameter searches")
    ssub = search.add_subparsers(dest="search_command", required=True, metavar="SEARCH_COMMAND")
    run = _command(ssub, "run", "run a search on this machine or an existing Ray cluster", "search")
    run.add_argument("--name", help=NAME_HELP)
    run.add_argument("--address", help=RAY_HELP)
    run.add_argument("--storage", metavar="URI",
                     help="where Ray Tune keeps the experiment and trial checkpoints: a folder every node mounts, "
                          "or s3://BUCKET/PREFIX (default: $COMOD_STORAGE, else the search's folder)")
    run.add_argument("--or-resume", action="store_true",
                     help="resume the search named --name when the runs folder has it, else run it "
                          "(the entrypoint of a submitted job: a resubmission continues)")
    resume = _command(ssub, "resume", "continue an interrupted search", address=RAY_HELP)
    for command in (run, resume):
        command.add_argument("--json", action="store_true",
                             help="end with the summary as JSON on stdout (for scripts) instead of the text one")
        command.add_argument("--verbose", action="store_true", help="let a local Ray's own output (its notices, "
                             "log lines, the trials' output) reach the terminal")
    _command(ssub, "status", "a table of a search's trials, or its job's state on a cluster",
             address="a Ray dashboard URL (http://HEAD:8265): show the search's latest job there instead of the "
                     "local table")
    ssub.add_parser("list", help="the searches in the runs folder")
    # searches as Ray jobs on a cluster (comod_platform.jobs)
    submit = _command(ssub, "submit", "submit a search to a Ray cluster as a Ray job", "search", JOB_HELP)
    submit.add_argument("--name", help=f"{NAME_HELP}; submitting the same name again continues that search")
    submit.add_argument("--storage", metavar="URI",
                        help="shared storage for trial checkpoints (s3://BUCKET/PREFIX, or a path every node "
                             "mounts); needed on a cluster of several nodes (default: $COMOD_STORAGE)")
    submit.add_argument("--ship", choices=("wheel", "image"), default="wheel",
                        help="wheel: build this project's wheel and ship it with the job (default); "
                             "image: ship nothing, the cluster's image has comod")
    submit.add_argument("--env", dest="env", action="append", default=[], metavar="KEY=VALUE",
                        help="an environment variable of the job, e.g. --env COMOD_HOME=/shared/comod-runs; "
                             "MLFLOW_TRACKING_URI, COMOD_OPTUNA_STORAGE and COMOD_STORAGE are passed on when set")
    logs = _command(ssub, "logs", "the logs of a search's latest job on a Ray cluster", address=JOB_HELP)
    logs.add_argument("--follow", action="store_true", help="follow the logs until the job ends")
    _command(ssub, "stop", "stop a search's running job on a Ray cluster", address=JOB_HELP)

    export = sub.add_parser("export", help="export a search's best config or its trial table")
    esub = export.add_subparsers(dest="export_command", required=True, metavar="WHAT")
    best = _command(esub, "best", "the best trial's experiment config, ready for comod train")
    best.add_argument("--out", type=Path, required=True)
    best.add_argument("--top-k", type=int, default=1, help="re-evaluate the top K configs over new seeds first")
    best.add_argument("--seeds", type=int, nargs="+", help="new seeds for the re-evaluation")
    best.add_argument("--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE",
                      help="settings for final training, e.g. --set pretrain.epochs=30")
    _command(esub, "trials", "one row per trial as Parquet").add_argument("--out", type=Path, required=True)

    compare = _command(sub, "compare", "stochastic vs deterministic vs none, from a search's trials")
    compare.add_argument("--metric", help="metric to compare (default: the search's)")
    compare.add_argument("--out", type=Path, help="folder for compare.md and plots (default: the search's)")
    compare.add_argument("--where", action="append", default=[], metavar="PATH=VALUE",
                         help="compare only the trials with this setting (repeatable; values as YAML), e.g. "
                              "--where pretrain.modulation_kind=none")
    dash = sub.add_parser("dashboard", help="serve optuna-dashboard on 127.0.0.1 for a search's Optuna study")
    dash.add_argument("name", help="the search (see comod search list)")
    dash.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port on 127.0.0.1 (default {DEFAULT_PORT})")
    return {"search": cmd_search, "export": cmd_export, "compare": cmd_compare, "dashboard": cmd_dashboard}


def _user_errors() -> tuple:
    """The errors a user can fix: the first two are bad input (exit 2), the rest failures (1)."""
    from comod.config import ConfigError
    from comod.data.taskdata import DatasetNotFoundError
    from comod_platform.results import ResultsError
    from comod_platform.runner import SearchError
    from comod_platform.tracking import TrackingError

    return (ConfigError, BadName, DatasetNotFoundError, SearchError, SearchNotFound, SearchBusy, TrackingError,
            ResultsError)


def cmd_search(args) -> int:
    command = args.search_command
    if command in ("submit", "logs", "stop") or (command == "status" and args.address):
        return _job_command(args)
    if command == "run" and args.or_resume and not args.name:
        raise UserError("--or-resume needs the search's --name: the one to resume when it exists, e.g. "
                        "comod search run SEARCH --name N --or-resume")
    if getattr(args, "verbose", False):
        from comod_platform.runner import VERBOSE_ENV

        os.environ[VERBOSE_ENV] = "1"  # also reaches run_or_resume's run or resume
    if command in ("run", "resume") and args.console and not (args.address or os.environ.get("RAY_ADDRESS")):
        from comod_platform import own_session

        own_session.enter()  # a local Ray: the driver and its Ray out of reach of a signal to the caller's group
    try:
        if command == "status":
            return _status(args.name)
        if command == "list":
            print("\n".join(known_searches()) or "no searches yet")
            return 0
        from comod_platform import runner

        if command == "resume":
            summary = runner.resume_search(args.name, address=args.address)
        else:
            start = runner.run_or_resume if args.or_resume else runner.run_search
            summary = start(args.search, name=args.name, address=args.address, storage=args.storage)
    except KeyboardInterrupt:  # a signal before the search's trials started: nothing ran yet
        name = getattr(args, "name", None)
        again = f"comod search resume {name}" if name in known_searches() else "the same command again"
        print(f"comod: interrupted before any trial ran; start it with {again}", file=sys.stderr, flush=True)
        return EXIT_CODES.get(requested(), 130)
    except _user_errors() as err:  # imported only now: a search starts Ray while torch loads
        raise UserError(str(err), EXIT_USAGE if isinstance(err, _user_errors()[:2]) else EXIT_FAILED) from None
    except OSError as err:  # after them: a missing dataset is a FileNotFoundError of its own
        if err.errno not in (errno.ENOSPC, errno.EACCES, errno.EPERM, errno.EROFS, errno.EDQUOT):
            raise
        raise UserError(disk_message(err, runs_home(), "COMOD_HOME (the runs folder)"), EXIT_FAILED) from None
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary), flush=True)
    if summary.get("stopped_by"):
        print(f"interrupted: continue with comod search resume {summary['name']}", file=sys.stderr, flush=True)
        return EXIT_CODES.get(getattr(signal, summary["stopped_by"]), 130)
    if summary[COMPLETED] == 0:
        print("comod: no trial completed; see `comod search status` and the failed runs in the UI",
              file=sys.stderr)
        return EXIT_FAILED
    return 0


def _table(rows: list[list[str]], indent: str = "  ") -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [(indent + "  ".join(cell.ljust(w) for cell, w in zip(row, widths))).rstrip() for row in rows]


def _number(value) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) and value == value else "-"


def format_summary(summary: dict) -> str:
    """The end of ``comod search run`` / ``resume``: trials by state, the best of each kind, errors, next commands."""
    name, metric = summary.get("name") or "SEARCH", summary.get("metric", "val/mean_f1")
    labels = {COMPLETED: "completed", PRUNED: "stopped early", INTERRUPTED: "interrupted", FAILED: "failed"}
    counts = {state: summary.get(state, 0) for state in labels}
    states = [f"{n} {labels[state]}" for state, n in counts.items()
              if state != INTERRUPTED or n or summary.get("stopped_by")]
    if (others := summary.get("trials", 0) - sum(counts.values())) > 0:
        states.append(f"{others} not finished")
    lines = [f"search {name}: {summary.get('trials', 0)} trials: {', '.join(states)}"]
    if per_kind := summary.get("best_per_kind"):
        lines += ["", f"best trial of each kind, by {metric} (the search metric):"]
        columns = {"test/mean_f1": "test F1", "test/mean_recall": "test recall",
                   "test/mean_precision": "test precision"}
        rows = [["kind", "trial", metric, *columns.values()]]
        for kind, top in per_kind.items():
            top = top or {"trial_id": "none completed"}
            rows.append([kind, str(top.get("trial_id")), *(_number(top.get(key)) for key in ("value", *columns))])
        lines += _table(rows)
    elif summary.get("best"):
        lines += ["", f"best {metric}: {_number(summary['best']['value'])} (trial {summary['best']['trial_id']})"]
    if summary.get("failures"):
        lines += ["", "failed trials (the error's last line; the whole one is in the trial's MLflow run):"]
        lines += [f"  {f.get('trial_id')}: {f.get('error')}" for f in summary["failures"]]
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
        table.append([t.trial_id, t.state, str(t.epochs), _number(t.value(metric)), _number(t.best)]
                     # a conditional setting the trial did not sample (its `when` fails) is blank, not the base value
                     + [_short(t.flat.get(p)) if results.search.space[p].active(t.flat, {}) else "" for p in searched])
    print("\n".join(_table(table, indent="")))
    counts = ", ".join(f"{n} {state}" for state, n in results.counts().items() if n)
    print(f"{len(results.trials)} trials of {results.search.search.num_trials}: {counts or 'none yet'}")
    return 0


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def _job_command(args) -> int:
    from comod.config import ConfigError
    from comod_platform import jobs

    with user_errors(ConfigError, BadName, code=EXIT_USAGE), user_errors(jobs.JobsError):
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
        elif args.search_command == "status":
            s = jobs.status(args.address, args.name)
            print(f"search {s['name']}: {s['status']}\n  job        {s['submission_id']} on {s['address']}\n"
                  f"  started    {s['start_time']}\n  ended      {s['end_time']}")
            if s["message"]:
                print(f"  message    {s['message']}")
            print(f"  progress   {s['progress'] or '(no progress line yet)'}")
        elif args.search_command == "logs":
            submission_id = jobs.logs(args.address, args.name, follow=args.follow)
            if args.follow:
                print(f"comod: job {submission_id} is {jobs.status(args.address, args.name)['status']}",
                      file=sys.stderr)
        else:
            done = jobs.stop(args.address, args.name)
            where, job = f"--address {done['address']}", f"job {done['submission_id']} of search {done['name']}"
            if not done["stopped"]:
                print(f"{job} had ended already ({done['status']}); nothing to stop")
            elif done["status"] in jobs.TERMINAL:
                print(f"stopped {job}: {done['status']}")
            else:
                print(f"asked {job} to stop; it is still {done['status']}: see `comod search status {done['name']} "
                      f"{where}`")
            print(f"continue it later: comod search submit SEARCH --name {done['name']} {where} (the same search "
                  f"file; it resumes), or comod search resume {done['name']} on the cluster", file=sys.stderr)
    return 0


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
    if report := next((f for f in result.get("files", []) if f.endswith(".md")), None):
        print(Path(report).read_text())
        print(f"written: {', '.join(result['files'])}", file=sys.stderr)
    return 0


def cmd_dashboard(args) -> int:
    if not 0 < args.port < 65536:
        raise UserError(f"--port {args.port}: expected a port number from 1 to 65535", EXIT_USAGE)
    with user_errors(SearchNotFound, DashboardError):
        return serve(args.name, args.port)
