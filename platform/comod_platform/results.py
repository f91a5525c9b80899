"""A search's trials read back from MLflow as typed records.

One :class:`TrialRecord` per child run of the search's parent run (see
:mod:`conventions`): its Ray trial id, MLflow run id, state, the epoch it
stopped at, the modulation kind, the experiment config rebuilt with real
types (params -> :func:`conventions.param_value` -> ``set_path`` ->
``parse_config``), its final metrics (empty unless it completed), the best
per-epoch value of the search metric, its fine-tuning curves (completed
trials) and the wall time. Pruned, failed and still-running trials are
records too, with what they reported.

MLflow is the source; a trial folder's ``metrics.json`` (embedded default,
or shared storage) only fills final metrics that MLflow lacks.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import types
import typing
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from comod.config import ConfigError, ExperimentConfig, flatten, parse_config, set_path
from comod.names import KINDS
from comod_platform.conventions import (COMPLETED, EPOCH, STATES, TAG_EPOCHS, TAG_ERROR, TAG_KIND, TAG_PARENT,
                                        TAG_REPORTS, TAG_ROLE, TAG_STOPPED_EPOCH, TAG_TRIAL_ID, WALL, best_of,
                                        param_value, recorded_state, sort_key)
from comod_platform.search_state import SearchMeta, SearchPaths
from comod_platform.searchfile import SearchFile, parse_search

log = logging.getLogger(__name__)

_PER_EPOCH = re.compile(r"^(pretrain|finetune)/(train_loss$|val/)|^comod/")
"""Metric names reported every epoch (the rest of a completed trial's metrics are its final ones)."""
CURVE_METRICS = ("val/mean_f1", "val/mean_recall", "val/mean_precision", "val/mean_ece")
"""Validation metrics whose fine-tuning curves (``finetune/<metric>``) a completed trial's record holds,
besides the search metric's."""


class ResultsError(RuntimeError):
    """A search's results cannot be read; the message says why."""


# ----------------------------------------------------------------- config types

def unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """``X | None`` -> (X, True); anything else -> (tp, False)."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], len(args) < len(typing.get_args(tp))
    return tp, False


@lru_cache(maxsize=1)
def config_fields() -> dict[str, Any]:
    """Every setting of :class:`ExperimentConfig` as ``{dotted.path: annotation}``, in schema order."""
    out: dict[str, Any] = {}

    def walk(cls, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp):
                walk(tp, f"{prefix}{f.name}.")
            else:
                out[f"{prefix}{f.name}"] = tp
    walk(ExperimentConfig, "")
    return out


def _accepts_str(tp: Any) -> bool:
    tp, _ = unwrap_optional(tp)
    if tp is str:
        return True
    if typing.get_origin(tp) is Literal:
        return any(isinstance(a, str) for a in typing.get_args(tp))
    return False


def typed_param(path: str, text: str) -> Any:
    """One MLflow param back to its value. YAML reads ``yes``, ``no``, ``on``,
    ``123`` as bool/int, so a setting that takes a string keeps the text."""
    value = param_value(text)
    tp = config_fields().get(path)
    if tp is not None and _accepts_str(tp) and isinstance(value, (bool, int, float)):
        return text
    return value


def config_from_params(params: dict[str, str]) -> tuple[ExperimentConfig | None, dict[str, Any], str | None]:
    """(typed config or None, typed flat values, the config error if it does not load)."""
    raw: dict = {}
    values = {path: typed_param(path, text) for path, text in params.items()}
    try:
        for path, value in values.items():
            set_path(raw, path, value)
        cfg = parse_config(raw, "params")
    except ConfigError as err:
        return None, values, str(err)
    return cfg, flatten(cfg), None


# ----------------------------------------------------------------- records

@dataclass
class TrialRecord:
    trial_id: str
    run_id: str
    state: str
    """completed, pruned, interrupted, failed or running (conventions.STATES)."""
    kind: str | None
    stopped_epoch: int | None
    """Epochs reported when the trial ended (its rung if pruned), from the comod.stopped_epoch tag."""
    config: ExperimentConfig | None
    """None only when the params no longer load (config_error says why)."""
    flat: dict[str, Any]
    """The config as ``{dotted.path: typed value}``."""
    final: dict[str, float] = field(default_factory=dict)
    """Final metrics (val/..., test/..., test/<task>/f1, wall_seconds, steps); empty unless completed."""
    best: float | None = None
    """Best per-epoch value of the search metric (by the search's mode)."""
    epochs: int | None = None
    """Highest epoch reported (pretraining and fine-tuning epochs counted together)."""
    reports: int = 0
    """Reports made to Ray Tune (ASHA's time unit, training_iteration)."""
    wall_seconds: float | None = None
    """The trial's own wall time when it completed, else the run's duration in MLflow."""
    start_time: float | None = None
    """MLflow run start, seconds since the epoch."""
    error: str | None = None
    config_error: str | None = None
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    """Completed trials only: ``finetune/<metric>`` -> [(fine-tuning step, value)], step 0 the pretrained
    model, for the search metric and :data:`CURVE_METRICS` (those the run logged); and
    ``pretrain/<metric>`` -> [(pretraining step, value)], the search metric over pretraining."""

    @property
    def completed(self) -> bool:
        return self.state == COMPLETED

    def value(self, metric: str) -> float | None:
        v = self.final.get(metric)
        return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


@dataclass
class SearchResults:
    name: str
    paths: SearchPaths
    meta: SearchMeta
    search: SearchFile
    trials: list[TrialRecord]

    @property
    def metric(self) -> str:
        return self.search.search.metric

    @property
    def mode(self) -> str:
        return self.search.search.mode

    def counts(self) -> dict[str, int]:
        out = {s: 0 for s in STATES}
        for t in self.trials:
            out[t.state] = out.get(t.state, 0) + 1
        return out

    def ranked(self, metric: str | None = None, mode: str | None = None) -> list[TrialRecord]:
        """Completed trials that have ``metric`` (default: the search's), best first; ties keep start order."""
        metric = metric or self.metric
        mode = mode or (self.mode if metric == self.metric else guess_mode(metric))
        done = [t for t in self.trials if t.completed and t.value(metric) is not None]
        return sorted(done, key=lambda t: sort_key(t.value(metric), mode))


def guess_mode(metric: str) -> str:
    """Error and calibration error are better low; everything else reported is better high."""
    return "min" if re.search(r"(error|ece|loss|wall_seconds)$", metric) else "max"


def open_search(name: str, home: Path | None = None) -> tuple[SearchPaths, SearchMeta, SearchFile]:
    """The search's folder, ids and search file; SearchNotFound names the known searches."""
    paths = SearchPaths(name, home)
    meta = paths.read_meta()
    if not paths.search_file.is_file():
        raise ResultsError(f"search {name!r} has no search file at {paths.search_file}; its folder is incomplete")
    sf = parse_search(yaml.safe_load(paths.search_file.read_text()), name)
    return paths, meta, sf


def load_results(name: str, home: Path | None = None) -> SearchResults:
    """Every trial of search ``name`` as a :class:`TrialRecord`, in start order."""
    paths, meta, sf = open_search(name, home)
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=meta.tracking_uri)
    try:
        runs = _child_runs(client, meta)
        trials = [_record(client, run, sf.search.metric, sf.search.mode, paths) for run in runs]
    except MlflowException as err:
        raise ResultsError(f"cannot read search {name!r} from MLflow at {meta.tracking_uri}: "
                           f"{str(err).splitlines()[0]}") from None
    trials.sort(key=lambda t: (t.start_time or 0.0, t.trial_id))
    return SearchResults(name=name, paths=paths, meta=meta, search=sf, trials=trials)


def _child_runs(client, meta: SearchMeta) -> list:
    query = f"tags.`{TAG_PARENT}` = '{meta.parent_run_id}' AND tags.`{TAG_ROLE}` = 'trial'"
    runs, token = [], None
    while True:
        page = client.search_runs([meta.experiment_id], filter_string=query, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _history(client, run_id: str, key: str) -> list:
    return list(client.get_metric_history(run_id, key))


def fine_tuning_curve(points) -> list[tuple[int, float]]:
    """MLflow metric history -> [(fine-tuning step, value)], sorted by step: the lowest step (the
    pretrained model, logged at the number of pretraining steps) is step 0; a step logged twice keeps its
    last value; NaN values are left out."""
    by_step: dict[int, float] = {}
    for m in sorted(points, key=lambda m: (m.step, m.timestamp)):
        by_step[int(m.step)] = float(m.value)
    if not by_step:
        return []
    first = min(by_step)
    return [(s - first, v) for s, v in sorted(by_step.items()) if not math.isnan(v)]


def _int(text) -> int | None:
    try:
        return int(text)
    except (TypeError, ValueError):
        return None


def _record(client, run, metric: str, mode: str, paths: SearchPaths) -> TrialRecord:
    tags, metrics = run.data.tags, run.data.metrics
    run_id = run.info.run_id
    trial_id = tags.get(TAG_TRIAL_ID, run_id)
    cfg, flat, config_error = config_from_params(dict(run.data.params))
    state = recorded_state(tags, metrics)
    final: dict[str, float] = {}
    if state == COMPLETED:
        final = {k: float(v) for k, v in metrics.items() if not _PER_EPOCH.search(k)}
        local = paths.trial_dir(trial_id) / "metrics.json"
        if local.is_file():  # fills what the run lacks (e.g. wall_seconds); MLflow's values win
            try:
                saved = json.loads(local.read_text())
            except (OSError, ValueError):
                saved = {}
            for k, v in saved.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    final.setdefault(k, float(v))
    tuned = _history(client, run_id, f"finetune/{metric}")
    pretrained = _history(client, run_id, f"pretrain/{metric}")
    series = [m.value for m in pretrained + tuned]
    if not series and metric in metrics:
        series = [m.value for m in _history(client, run_id, metric)]
    series = [v for v in series if not math.isnan(v)]
    best = best_of(series, mode) if series else None
    if TAG_EPOCHS in tags:
        epochs, reports = _int(tags[TAG_EPOCHS]), _int(tags.get(TAG_REPORTS)) or 0
    else:  # a store written when the epoch was a metric
        epochs_seen = _history(client, run_id, EPOCH)
        epochs = int(max(m.value for m in epochs_seen)) if epochs_seen else None
        reports = len(epochs_seen)
    stopped = tags.get(TAG_STOPPED_EPOCH)
    try:
        stopped_epoch = int(stopped) if stopped is not None else None
    except ValueError:
        stopped_epoch = None
    wall = final.get(WALL)
    if wall is None and run.info.end_time and run.info.start_time:
        wall = (run.info.end_time - run.info.start_time) / 1000.0
    curves: dict[str, list[tuple[int, float]]] = {}
    if state == COMPLETED:
        for key in dict.fromkeys([f"finetune/{metric}"] + [f"finetune/{m}" for m in CURVE_METRICS]):
            if key == f"finetune/{metric}":
                points = tuned
            elif key in metrics:  # logged at all: one history read
                points = _history(client, run_id, key)
            else:
                continue
            if curve := fine_tuning_curve(points):
                curves[key] = curve
        if pretrained:  # the pretraining's validation curve, at its optimisation steps
            by_step = {int(m.step): float(m.value) for m in sorted(pretrained, key=lambda m: (m.step, m.timestamp))}
            curves[f"pretrain/{metric}"] = [(s, v) for s, v in sorted(by_step.items()) if not math.isnan(v)]
    kind = tags.get(TAG_KIND) or (flat.get("modulation.kind") if flat else None)
    return TrialRecord(trial_id=trial_id, run_id=run_id, state=state, kind=kind, stopped_epoch=stopped_epoch,
                       config=cfg, flat=flat, final=final, best=best, epochs=epochs, reports=reports,
                       wall_seconds=wall, start_time=(run.info.start_time or 0) / 1000.0,
                       error=tags.get(TAG_ERROR), config_error=config_error, curves=curves)


__all__ = ["KINDS", "CURVE_METRICS", "ResultsError", "TrialRecord", "SearchResults", "load_results", "open_search",
           "fine_tuning_curve", "config_fields", "config_from_params", "typed_param", "unwrap_optional", "guess_mode"]
