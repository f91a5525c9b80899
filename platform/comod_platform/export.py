"""Export a search: its trial table as Parquet, its best config as an experiment YAML.

The table has a row per trial: a typed column per setting, the final metrics, the best per-epoch
value, progress, wall time, state and ids. The best config runs with ``comod train`` as it is.
"""
from __future__ import annotations

import json
import math
import statistics
import time
import typing
from pathlib import Path
from typing import Any, Callable, Literal

from comod.config import ConfigError, apply_overrides, config_to_dict, parse_config, save_config
from comod_platform.conventions import FAILED, PRUNED, RUNNING, WALL, sort_key
from comod_platform.results import (SearchResults, TrialRecord, config_fields, load_results, log_to_parent,
                                    unwrap_optional)
from comod_platform.report import fmt, grid

DEFAULT_REEVAL_SEEDS = 3
"""New seeds a top-k re-evaluation uses when none are given."""
ARTIFACT_PATH = "export"


class ExportError(RuntimeError):
    """The export cannot be made; the one-line message says why and what to do."""


def _arrow_type(tp: Any):
    import pyarrow as pa

    tp = unwrap_optional(tp)
    if typing.get_origin(tp) is list:
        return pa.list_(_arrow_type(typing.get_args(tp)[0]))
    if typing.get_origin(tp) is Literal:
        kinds = {type(a) for a in typing.get_args(tp)}
        tp = kinds.pop() if len(kinds) == 1 else str
    return {bool: pa.bool_(), int: pa.int64(), float: pa.float64(), str: pa.string()}.get(tp, pa.string())


def _cell(value: Any, arrow_type) -> Any:
    """A config value as the column's type wants it (dicts and unknowns as JSON text)."""
    import pyarrow as pa

    if value is None:
        return None
    if pa.types.is_list(arrow_type):
        return [_cell(v, arrow_type.value_type) for v in (value if isinstance(value, (list, tuple)) else [value])]
    cast = {pa.float64(): float, pa.int64(): int, pa.bool_(): bool}.get(arrow_type)
    return cast(value) if cast else value if isinstance(value, str) else json.dumps(value)


def trials_table(search: str | SearchResults, home: Path | None = None):
    """The search's trials as a ``pyarrow.Table`` with an explicit schema (see the module docstring)."""
    import pyarrow as pa

    results = search if isinstance(search, SearchResults) else load_results(search, home)
    trials = results.trials
    best_column = f"best/{results.metric}"
    meta = [("trial_id", pa.string(), lambda t: t.trial_id), ("run_id", pa.string(), lambda t: t.run_id),
            ("state", pa.string(), lambda t: t.state), ("stopped_epoch", pa.int64(), lambda t: t.stopped_epoch),
            ("epochs", pa.int64(), lambda t: t.epochs), ("reports", pa.int64(), lambda t: t.reports),
            (WALL, pa.float64(), lambda t: t.wall_seconds), (best_column, pa.float64(), lambda t: t.best),
            ("error", pa.string(), lambda t: t.error or t.config_error)]
    fields = [pa.field(name, tp, nullable=name not in ("trial_id", "run_id", "state")) for name, tp, _ in meta]
    columns = {name: [get(t) for t in trials] for name, _, get in meta}
    schema_paths = config_fields()
    settings = [*schema_paths, *sorted({p for t in trials for p in t.flat} - set(schema_paths))]  # + older ones
    for path in settings:
        arrow_type = _arrow_type(schema_paths[path]) if path in schema_paths else pa.string()
        fields.append(pa.field(path, arrow_type))
        columns[path] = [_cell(t.flat.get(path), arrow_type) for t in trials]
    metric_names = sorted({k for t in trials for k in t.final} - set(columns))
    for name in metric_names:
        fields.append(pa.field(name, pa.float64()))
        columns[name] = [t.final.get(name) for t in trials]
    metadata = {"comod.search": results.name, "comod.metric": results.metric, "comod.mode": results.mode,
                "comod.best_column": best_column, "comod.metric_columns": json.dumps(metric_names),
                "comod.config_columns": json.dumps(settings)}
    return pa.Table.from_pydict(columns, schema=pa.schema(fields, metadata=metadata))


def export_trials(name: str, out: str | Path, home: Path | None = None, log_artifact: bool = True) -> Path:
    """Write search ``name``'s trial table to ``out`` (Parquet); also logged to the search's parent run."""
    import pyarrow.parquet as pq

    results = load_results(name, home)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(trials_table(results), out)
    if log_artifact:
        log_to_parent(results, [out], ARTIFACT_PATH)
    return out


def _with(cfg, overrides: list[str]):
    return parse_config(apply_overrides(config_to_dict(cfg), overrides), "exported config")


def _distinct(ranked: list[TrialRecord], k: int) -> list[TrialRecord]:
    """The ``k`` best trials with distinct configs, the seed left out (it is what re-evaluation varies)."""
    found: dict[str, TrialRecord] = {}
    for t in ranked:
        if t.config is not None and len(found) < k:
            found.setdefault(json.dumps({p: v for p, v in t.flat.items() if p != "seed"}, sort_keys=True), t)
    return list(found.values())


def _write_yaml(cfg, path: Path, header: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_config(cfg, path)
    path.write_text("".join(f"# {line}\n" for line in header) + path.read_text())


def export_best(name: str, out: str | Path, top_k: int = 1, reeval_seeds: list[int] | None = None,
                overrides: list[str] | None = None, seeds: list[int] | None = None, home: Path | None = None,
                progress: Callable[[str], None] | None = None, log_artifact: bool = True) -> dict:
    """Write search ``name``'s best config to ``out`` (YAML) with ``overrides`` (``path=value``, not used
    in re-evaluation). ``top_k`` > 1 or ``reeval_seeds``: re-run the K best distinct configs per seed
    (default: 3 unused) in ``<search>/reeval/TRIAL/seedS/``, pick the best mean and report it beside
    ``out`` (``STEM.reeval.md``, ``.json``). ``seeds``: also ``STEM-seedS.yaml`` each. Returns the choice."""
    if int(top_k) < 1:
        raise ExportError(f"top-k: got {top_k}; expected an integer >= 1")
    results = load_results(name, home)
    metric, mode = results.metric, results.mode
    ranked = results.ranked()
    if not ranked:
        c = results.counts()
        raise ExportError(f"search {name!r} has no completed trial with {metric} ({len(results.trials)} trials: "
                          f"{c[PRUNED]} pruned, {c[FAILED]} failed, {c[RUNNING]} running); nothing to "
                          f"export: let it finish or continue it with `comod search resume {name}`")
    candidates = _distinct(ranked, int(top_k))
    if not candidates:
        raise ExportError(f"search {name!r}: no completed trial's params load as a config with this version "
                          f"of comod ({ranked[0].config_error})")
    overrides = list(overrides or [])
    try:
        _with(candidates[0].config, overrides)
    except ConfigError as err:
        raise ExportError(f"override: {err}") from None
    out = Path(out)
    chosen, reeval = candidates[0], None
    if int(top_k) > 1 or reeval_seeds:
        used = {t.flat.get("seed") for t in results.trials}
        seed_list = ([int(s) for s in reeval_seeds] if reeval_seeds else
                     [s for s in range(DEFAULT_REEVAL_SEEDS + len(used)) if s not in used][:DEFAULT_REEVAL_SEEDS])
        reeval = _reevaluate(results, candidates, seed_list, progress)
        chosen = next(t for t in candidates if t.trial_id == reeval["chosen"])
        reeval["report"] = _write_report(results, reeval, out)
    value = chosen.value(metric)
    header = [f"best of search {name} by {metric} ({mode}): trial {chosen.trial_id}, MLflow run {chosen.run_id}",
              f"{metric} = {value:.6g} in the search"
              + (f"; mean {reeval['candidates'][0]['mean']:.6g} over re-evaluation seeds "
                 f"{reeval['seeds']}" if reeval else "")]
    header += ["overrides: " + " ".join(overrides)] if overrides else []
    _write_yaml(_with(chosen.config, overrides), out, header)
    seed_files = []
    for s in seeds or []:
        path = out.with_name(f"{out.stem}-seed{int(s)}{out.suffix or '.yaml'}")
        _write_yaml(_with(chosen.config, [*overrides, f"seed={int(s)}"]), path, [*header, f"seed: {int(s)}"])
        seed_files.append(str(path))
    if log_artifact and reeval:
        log_to_parent(results, [reeval["report"]["md"], reeval["report"]["json"]], ARTIFACT_PATH)
    return {"search": name, "path": str(out), "trial_id": chosen.trial_id, "run_id": chosen.run_id,
            "metric": metric, "mode": mode, "value": value, "reeval": reeval, "seed_files": seed_files}


def _reevaluate(results: SearchResults, candidates: list[TrialRecord], seeds: list[int],
                progress: Callable[[str], None] | None) -> dict:
    """Run every candidate with every seed (resuming runs already in the folder); rank by mean."""
    from comod.data import load_data
    from comod.train import TrainingError, run_experiment

    root, metric, mode = results.paths.root, results.metric, results.mode
    data_cache: dict[str, Any] = {}
    rows, total = [], len(candidates) * len(seeds)
    for trial in candidates:
        runs = []
        for seed in seeds:
            cfg = _with(trial.config, [f"seed={seed}"])
            key = json.dumps(config_to_dict(cfg.data), sort_keys=True)
            if key not in data_cache:
                data_cache = {key: load_data(cfg)}  # keep one dataset in memory
            folder = root / "reeval" / trial.trial_id / f"seed{seed}"
            if progress:
                progress(f"[export] re-evaluating {trial.trial_id} with seed {seed} "
                         f"({len(rows) * len(seeds) + len(runs) + 1}/{total})")
            started = time.perf_counter()
            try:
                metrics = run_experiment(cfg, folder, data=data_cache[key], pretrain_cache=root / "pretrain_cache")
            except (TrainingError, ValueError) as err:
                raise ExportError(f"re-evaluation of trial {trial.trial_id} with seed {seed} failed in "
                                  f"{folder}: {err}") from None
            runs.append({"seed": seed, "folder": str(folder), "value": metrics.get(metric),
                         "test/mean_f1": metrics.get("test/mean_f1"),
                         "seconds": round(time.perf_counter() - started, 3)})
        values = [r["value"] for r in runs if r["value"] is not None and not math.isnan(r["value"])]
        rows.append({"trial_id": trial.trial_id, "run_id": trial.run_id, "kind": trial.kind,
                     "search_value": trial.value(metric), "runs": runs,
                     "mean": statistics.fmean(values) if values else None,
                     "std": statistics.stdev(values) if len(values) > 1 else 0.0 if values else None,
                     "n": len(values)})
    ranked = sorted(rows, key=lambda r: (r["mean"] is None, 0.0 if r["mean"] is None else sort_key(r["mean"], mode)))
    if ranked[0]["mean"] is None:
        raise ExportError(f"re-evaluation reported no {metric} for any candidate; see the runs under {root}/reeval")
    return {"metric": metric, "mode": mode, "seeds": seeds, "chosen": ranked[0]["trial_id"], "candidates": ranked}


def _write_report(results: SearchResults, reeval: dict, out: Path) -> dict:
    md_path, json_path = out.with_name(f"{out.stem}.reeval.md"), out.with_name(f"{out.stem}.reeval.json")
    md_path.parent.mkdir(parents=True, exist_ok=True)
    seeds = reeval["seeds"]
    lines = [f"# Re-evaluation of the top {len(reeval['candidates'])} configs of search {results.name}", "",
             f"Metric: `{reeval['metric']}` ({reeval['mode']}); seeds: {', '.join(map(str, seeds))}. "
             f"Chosen: trial `{reeval['chosen']}` (best mean over seeds).", ""]
    lines += grid(" | ".join(["rank | trial | kind | in search", *(f"seed {s}" for s in seeds), "mean | std"]), [
        [i, f"`{row['trial_id']}`", row["kind"], fmt(row["search_value"]),
         *(fmt({r["seed"]: r["value"] for r in row["runs"]}.get(s)) for s in seeds),
         fmt(row["mean"]), fmt(row["std"])] for i, row in enumerate(reeval["candidates"], 1)])
    lines += ["", "Runs are in the search folder's `reeval/TRIAL/seedS/` (config.yaml, metrics.json, checkpoint.pt)."]
    md_path.write_text("\n".join(lines) + "\n")
    json_path.write_text(json.dumps({"search": results.name, **reeval}, indent=2))
    return {"md": str(md_path), "json": str(json_path)}
