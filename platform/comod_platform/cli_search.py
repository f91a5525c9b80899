"""``comod search ...``, ``comod export ...`` and ``comod compare``: the search commands."""
from __future__ import annotations

import json
import sys
from pathlib import Path


def add_commands(sub) -> dict:
    """Register the commands on ``sub`` (argparse subparsers); returns name -> handler."""
    search = sub.add_parser("search", help="run, resume and inspect hyperparameter searches")
    ssub = search.add_subparsers(dest="search_command", required=True, metavar="SEARCH_COMMAND")
    run = ssub.add_parser("run", help="run a search on this machine or an existing Ray cluster")
    run.add_argument("search", help="search file (search_spaces/NAME.yaml) or the NAME of one in search_spaces/")
    run.add_argument("--name", help="unique name of this search (default: file name and time)")
    run.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    resume = ssub.add_parser("resume", help="continue an interrupted search")
    resume.add_argument("name")
    resume.add_argument("--address")
    status = ssub.add_parser("status", help="a table of a search's trials")
    status.add_argument("name")
    ssub.add_parser("list", help="the searches in the runs folder")

    export = sub.add_parser("export", help="export a search's best config or its trial table")
    esub = export.add_subparsers(dest="export_command", required=True, metavar="WHAT")
    best = esub.add_parser("best", help="the best trial's experiment config, ready for comod train")
    best.add_argument("name")
    best.add_argument("--out", type=Path, required=True)
    best.add_argument("--top-k", type=int, default=1, help="re-evaluate the top K configs over new seeds first")
    best.add_argument("--seeds", type=int, nargs="+", help="new seeds for the re-evaluation")
    best.add_argument("--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE",
                      help="settings for final training, e.g. --set pretrain.epochs=30")
    trials = esub.add_parser("trials", help="one row per trial as Parquet")
    trials.add_argument("name")
    trials.add_argument("--out", type=Path, required=True)

    compare = sub.add_parser("compare", help="stochastic vs deterministic vs none, from a search's trials")
    compare.add_argument("name")
    compare.add_argument("--metric", help="metric to compare (default: the search's)")
    compare.add_argument("--out", type=Path, help="folder for compare.md and plots (default: the search's)")
    return {"search": cmd_search, "export": cmd_export, "compare": cmd_compare}


def _user_errors():
    from comod.config import ConfigError
    from comod.data.taskdata import DatasetNotFoundError
    from comod_platform.results import ResultsError
    from comod_platform.runner import SearchError
    from comod_platform.search_state import SearchNotFound
    from comod_platform.tracking import TrackingError

    return ConfigError, DatasetNotFoundError, SearchError, SearchNotFound, TrackingError, ResultsError


def cmd_search(args) -> int:
    from comod_platform.errors import EXIT_FAILED, EXIT_USAGE, UserError

    errors = _user_errors()
    try:
        if args.search_command == "run":
            from comod_platform.runner import run_search

            summary = run_search(args.search, name=args.name, address=args.address)
        elif args.search_command == "resume":
            from comod_platform.runner import resume_search

            summary = resume_search(args.name, address=args.address)
        elif args.search_command == "status":
            return _status(args.name)
        else:
            from comod_platform.search_state import known_searches

            print("\n".join(known_searches()) or "no searches yet")
            return 0
    except errors as err:
        code = EXIT_USAGE if isinstance(err, errors[0]) else EXIT_FAILED
        raise UserError(str(err), code) from None
    print(json.dumps(summary, indent=2))
    name = summary.get("name")
    if name:
        print(f"browse it: comod ui (experiment search/{name}); table: comod search status {name}; "
              f"best config: comod export best {name} --out best.yaml; mechanisms: comod compare {name}",
              file=sys.stderr)
    if summary["completed"] == 0:
        print("comod: no trial completed; see `comod search status` and the failed runs in the UI",
              file=sys.stderr)
        return EXIT_FAILED
    return 0


def _status(name: str) -> int:
    from comod_platform.results import load_results

    results = load_results(name)
    metric, searched = results.metric, list(results.search.space)
    header = ["trial", "state", "epochs", metric, f"best {metric}"] + searched
    table = [header]
    for t in results.trials:
        final, best = t.value(metric), t.best
        table.append([t.trial_id, t.state, str(t.epochs), f"{final:.4f}" if final is not None else "-",
                      f"{best:.4f}" if best is not None else "-"] + [_short(t.flat.get(p)) for p in searched])
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)))
    counts = ", ".join(f"{n} {state}" for state, n in results.counts().items() if n)
    print(f"{len(results.trials)} trials of {results.search.search.num_trials}: {counts or 'none yet'}")
    return 0


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value)


def cmd_export(args) -> int:
    from comod_platform.errors import EXIT_FAILED, UserError
    from comod_platform.export import ExportError, export_best, export_trials

    try:
        if args.export_command == "trials":
            print(f"wrote {export_trials(args.name, args.out)}")
            return 0
        chosen = export_best(args.name, args.out, top_k=args.top_k, reeval_seeds=args.seeds,
                             overrides=args.overrides, progress=lambda line: print(line, file=sys.stderr))
    except (ExportError, *_user_errors()) as err:
        raise UserError(str(err), EXIT_FAILED) from None
    print(f"wrote {chosen['path']}: trial {chosen['trial_id']} ({chosen['metric']}={chosen['value']:.4f}); "
          f"run it with: comod train {chosen['path']}")
    return 0


def cmd_compare(args) -> int:
    from comod_platform.errors import EXIT_FAILED, UserError
    from comod_platform.compare import compare

    from comod_platform.compare import CompareError

    try:
        result = compare(args.name, metric=args.metric, out_dir=args.out)
    except (CompareError, *_user_errors()) as err:
        raise UserError(str(err), EXIT_FAILED) from None
    report = next((f for f in result.get("files", []) if f.endswith(".md")), None)
    if report:
        print(Path(report).read_text())
        print(f"written: {', '.join(result['files'])}", file=sys.stderr)
    return 0
