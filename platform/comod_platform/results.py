"""A search's trials read back from MLflow as typed records.

One :class:`TrialRecord` per child run of the search's parent run, whatever its state, with the config
rebuilt with real types. MLflow is the source; a trial folder's ``metrics.json`` only fills final
metrics that MLflow lacks.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import types
import typing
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache, partial
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from comod.config import ConfigError, ExperimentConfig, flatten, parse_config, set_path
from comod_platform.conventions import (COMPLETED, STATES, TAG_EPOCHS, TAG_ERROR, TAG_KIND, TAG_PARENT,
                                        TAG_REPORTS, TAG_ROLE, TAG_STOPPED_EPOCH, TAG_TRIAL_ID, WALL, best_of,
                                        param_value, recorded_state, sort_key)
from comod_platform.search_state import SearchMeta, SearchPaths
from comod_platform.searchfile import SearchFile, parse_search
from comod_platform.tracking import all_runs

log = logging.getLogger(__name__)

_PER_EPOCH = re.compile(r"^(pretrain|finetune)/(train_loss$|val/)|^comod/")
"""Metric names reported every epoch (the rest of a completed trial's metrics are its final ones)."""
CURVE_METRICS = ("val/mean_f1", "val/mean_recall", "val/mean_precision", "val/mean_ece")
"""Validation metrics whose fine-tuning curves a completed trial's record holds, besides the search metric's."""


class ResultsError(RuntimeError):
    """A search's results cannot be read; the message says why."""


def unwrap_optional(tp: Any) -> Any:
    """``X | None`` -> X; anything else as it is."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if typing.get_origin(tp) in (Union, types.UnionType) and len(args) == 1 else tp


@lru_cache(maxsize=1)
def config_fields() -> dict[str, Any]:
    """Every setting of :class:`ExperimentConfig` as ``{dotted.path: annotation}``, in schema order."""
    def walk(cls, prefix: str) -> dict[str, Any]:
        hints, out = typing.get_type_hints(cls), {}
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            out.update(walk(tp, f"{prefix}{f.name}.") if dataclasses.is_dataclass(tp) else {f"{prefix}{f.name}": tp})
        return out
    return walk(ExperimentConfig, "")


def typed_param(path: str, text: str) -> Any:
    """One MLflow param back to its value. YAML reads ``yes``, ``no``, ``on``, ``123`` as bool/int, so a
    setting that takes a string keeps the text."""
    value = param_value(text)
    tp = unwrap_optional(config_fields().get(path))
    takes_str = tp is str or (typing.get_origin(tp) is Literal and any(isinstance(a, str) for a in typing.get_args(tp)))
    return text if takes_str and isinstance(value, (bool, int, float)) else value


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


@dataclass
class TrialRecord:
    trial_id: str
    run_id: str
    state: str  # conventions.STATES
    kind: str | None
    stopped_epoch: int | None  # epochs reported when the trial ended (its rung if pruned)
    config: ExperimentConfig | None  # None only when the params no longer load (config_error says why)
    flat: dict[str, Any]  # the config as {dotted.path: typed value}
    final: dict[str, float] = field(default_factory=dict)  # final metrics; empty unless completed
    best: float | None = None  # best per-epoch value of the search metric (by the search's mode)
    epochs: int | None = None  # highest epoch reported, pretraining and fine-tuning together
    reports: int = 0  # reports made to Ray Tune (ASHA's time unit)
    wall_seconds: float | None = None  # the trial's own wall time when it completed, else the run's duration
    start_time: float | None = None  # MLflow run start, seconds since the epoch
    error: str | None = None
    config_error: str | None = None
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    """Completed trials only: ``finetune/<metric>`` -> [(fine-tuning step, value)], step 0 the pretrained
    model, for the search metric and :data:`CURVE_METRICS`; ``pretrain/<metric>`` -> [(pretraining step,
    value)] for the search metric."""

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
        return {**dict.fromkeys(STATES, 0), **Counter(t.state for t in self.trials)}

    def ranked(self) -> list[TrialRecord]:
        """Completed trials that have the search metric, best first; ties keep start order."""
        done = [t for t in self.trials if t.completed and t.value(self.metric) is not None]
        return sorted(done, key=lambda t: sort_key(t.value(self.metric), self.mode))


def guess_mode(metric: str) -> str:
    """Error and calibration error are better low; everything else reported is better high."""
    return "min" if re.search(r"(error|ece|loss|wall_seconds)$", metric) else "max"


def load_results(name: str, home: Path | None = None) -> SearchResults:
    """Every trial of search ``name`` as a :class:`TrialRecord`, in start order."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    paths = SearchPaths(name, home)
    meta = paths.read_meta()
    if not paths.search_file.is_file():
        raise ResultsError(f"search {name!r} has no search file at {paths.search_file}; its folder is incomplete")
    sf = parse_search(yaml.safe_load(paths.search_file.read_text()), name)
    client = MlflowClient(tracking_uri=meta.tracking_uri)
    query = f"tags.`{TAG_PARENT}` = '{meta.parent_run_id}' AND tags.`{TAG_ROLE}` = 'trial'"
    try:
        trials = [_record(client, run, sf.search.metric, sf.search.mode, paths)
                  for run in all_runs(client, meta.experiment_id, query)]
    except MlflowException as err:
        raise ResultsError(f"cannot read search {name!r} from MLflow at {meta.tracking_uri}: "
                           f"{str(err).splitlines()[0]}") from None
    trials.sort(key=lambda t: (t.start_time or 0.0, t.trial_id))
    return SearchResults(name=name, paths=paths, meta=meta, search=sf, trials=trials)


def log_to_parent(results: SearchResults, files: list, folder: str) -> list[str]:
    """Log ``files`` to the search's parent MLflow run under ``folder``; a warning per file that failed."""
    from mlflow.tracking import MlflowClient

    client, failed = MlflowClient(tracking_uri=results.meta.tracking_uri), []
    for path in map(str, files):
        try:
            client.log_artifact(results.meta.parent_run_id, path, folder)
        except Exception as err:  # noqa: BLE001 - any failure of the tracking server
            log.warning("could not log %s to the search's MLflow run: %s", path, err)
            failed.append(f"not logged to MLflow: {Path(path).name} ({err})")
    return failed


def _by_step(points) -> list[tuple[int, float]]:
    """MLflow metric history as (step, value) sorted by step; a step logged twice keeps its last value."""
    return sorted({int(m.step): float(m.value) for m in sorted(points, key=lambda m: (m.step, m.timestamp))}.items())


def fine_tuning_curve(points) -> list[tuple[int, float]]:
    """MLflow metric history -> [(fine-tuning step, value)] without NaN, the lowest step (pretrained model) 0."""
    steps = _by_step(points)
    return [(s - steps[0][0], v) for s, v in steps if not math.isnan(v)]


def _int(text) -> int | None:
    try:
        return int(text)
    except (TypeError, ValueError):
        return None


def _saved_metrics(path: Path) -> dict[str, float]:
    """The numbers of a trial folder's ``metrics.json``; none when it is missing or unreadable."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {k: float(v) for k, v in saved.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _record(client, run, metric: str, mode: str, paths: SearchPaths) -> TrialRecord:
    tags, metrics, run_id = run.data.tags, run.data.metrics, run.info.run_id
    history = partial(client.get_metric_history, run_id)
    trial_id = tags.get(TAG_TRIAL_ID, run_id)
    cfg, flat, config_error = config_from_params(dict(run.data.params))
    state = recorded_state(tags, metrics)
    final: dict[str, float] = {}
    curves: dict[str, list[tuple[int, float]]] = {}
    tuned, pretrained = history(f"finetune/{metric}"), history(f"pretrain/{metric}")
    if state == COMPLETED:
        final = {k: float(v) for k, v in metrics.items() if not _PER_EPOCH.search(k)}
        for k, v in _saved_metrics(paths.trial_dir(trial_id) / "metrics.json").items():
            final.setdefault(k, v)  # fills what the run lacks (e.g. wall_seconds); MLflow's values win
        for key in dict.fromkeys([f"finetune/{metric}"] + [f"finetune/{m}" for m in CURVE_METRICS]):
            points = tuned if key == f"finetune/{metric}" else history(key) if key in metrics else []
            if curve := fine_tuning_curve(points):
                curves[key] = curve
        if pretrained:  # the pretraining's validation curve, at its optimisation steps
            curves[f"pretrain/{metric}"] = [(s, v) for s, v in _by_step(pretrained) if not math.isnan(v)]
    series = [m.value for m in pretrained + tuned] or ([m.value for m in history(metric)] if metric in metrics else [])
    series = [v for v in series if not math.isnan(v)]
    wall = final.get(WALL)
    if wall is None and run.info.end_time and run.info.start_time:
        wall = (run.info.end_time - run.info.start_time) / 1000.0
    return TrialRecord(trial_id=trial_id, run_id=run_id, state=state, config=cfg, flat=flat, final=final, curves=curves,
                       kind=tags.get(TAG_KIND) or flat.get("modulation.kind"), error=tags.get(TAG_ERROR),
                       stopped_epoch=_int(tags.get(TAG_STOPPED_EPOCH)), epochs=_int(tags.get(TAG_EPOCHS)),
                       reports=_int(tags.get(TAG_REPORTS)) or 0, best=best_of(series, mode) if series else None,
                       wall_seconds=wall, start_time=(run.info.start_time or 0) / 1000.0, config_error=config_error)
