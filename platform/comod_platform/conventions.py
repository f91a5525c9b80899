"""Names shared by the search runner, the trials, tracking, export and compare, and the helpers that read
them (the MLflow conventions: docs/guides/tracking.md)."""
from __future__ import annotations

import json
from typing import Any

import yaml

TAG_SEARCH = "comod.search"
TAG_ROLE = "comod.role"                # "search" (parent) or "trial" (child)
TAG_TRIAL_ID = "comod.ray_trial_id"
TAG_KIND = "comod.modulation_kind"
TAG_STATE = "comod.state"              # running, completed, pruned, interrupted, failed
TAG_STOPPED_EPOCH = "comod.stopped_epoch"  # epochs reported when the trial ended (its rung if pruned)
TAG_EPOCHS = "comod.epochs"            # epochs reported so far (ASHA's clock): bookkeeping, a tag, not a metric
TAG_REPORTS = "comod.reports"          # reports made to Ray Tune so far (its training_iteration)
TAG_ERROR = "comod.error"
TAG_NODE = "comod.node"                # the Ray node the trial runs (ran) on
TAG_GPUS = "comod.gpu_ids"             # the GPU ids Ray assigned to it (a fraction shares one)
TAG_RETRIES = "comod.retries"          # times the trial was restarted from its last checkpoint
TAG_PARENT = "mlflow.parentRunId"
TAG_SEARCH_ID = "comod.search_id"      # the search folder that made an experiment and (user attr.) a study
TAG_BEST_TRIAL = "comod.best_trial"    # on the parent run: the Ray trial id of the best completed trial so far
TAG_BEST_RUN = "comod.best_run_id"     # on the parent run: the MLflow run id of that trial

RUNNING = "running"
COMPLETED = "completed"
PRUNED = "pruned"                      # stopped early by the scheduler
INTERRUPTED = "interrupted"            # left unfinished by a stopped search; a resume continues it
FAILED = "failed"
STATES = (COMPLETED, PRUNED, INTERRUPTED, FAILED, RUNNING)  # in the order reports count them
ENDED = (COMPLETED, PRUNED, FAILED)    # the states whose end-of-trial tags were written

# The keys of a trial's report to Ray Tune
FINAL_FLAG = "comod/final"             # 1 only in the last report, which carries the final metrics
DIVERGED_FLAG = "comod/diverged"       # 1 in the last report of a recorded failure (diverged, timed out,
REASON = "comod/reason"                # stalled; REASON says which): Ray does not retry such a trial
NODE = "comod/node"                    # the Ray node id of the trial's worker
GPUS = "comod/gpus"                    # its assigned GPU ids
CURVE = "comod/curve"                  # JSON [[global_step, {metric: value}], ...]: curve points since the last report
STEP = "comod/step"
EPOCH = "comod/epoch"
WALL = "wall_seconds"
METRICS = "comod/metrics"
"""JSON text of the report's other metrics: Ray Tune keeps statistics of every number of every report in
each experiment snapshot, so only :data:`PROTOCOL_KEYS` and the search's metric stay numbers of their own."""
PROTOCOL_KEYS = frozenset({FINAL_FLAG, DIVERGED_FLAG, REASON, NODE, GPUS, CURVE, STEP, EPOCH})
"""The keys Ray Tune and the driver's loop read as they are (with the search's metric)."""


def pack_report(row: dict, metric: str) -> dict:
    """A trial's report to Ray Tune: the protocol's keys and ``metric`` as they are, the rest as :data:`METRICS`."""
    kept = {k: v for k, v in row.items() if k in PROTOCOL_KEYS or k == metric}
    rest = {k: v for k, v in row.items() if k not in kept}
    if rest:
        kept[METRICS] = json.dumps(rest, default=float)
    return kept


def report_metrics(result: dict | None) -> dict:
    """A report as the trial made it: the metrics of :data:`METRICS` unpacked in its place."""
    result = dict(result or {})
    packed = result.pop(METRICS, None)
    if isinstance(packed, str):
        result.update(json.loads(packed))
    return result


def experiment_name(search: str) -> str:
    return f"search/{search}"


def param_text(value: Any) -> str:
    """A config value as an MLflow param: strings as they are, the rest as JSON."""
    return value if isinstance(value, str) else json.dumps(value)


def param_value(text: str) -> Any:
    """Inverse of :func:`param_text` (YAML reads JSON and plain strings alike)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def better(a: float, b: float, mode: str) -> bool:
    return a > b if mode == "max" else a < b


def sort_key(value: float, mode: str) -> float:
    """A key that sorts values of a metric of ``mode`` best first (``sorted`` keeps ties in order)."""
    return -value if mode == "max" else value


def best_of(values, mode: str, key=None):
    return (max if mode == "max" else min)(values, key=key)


def reaches(value: float, target: float, mode: str) -> bool:
    return value >= target if mode == "max" else value <= target


def direction(mode: str) -> str:
    return "maximize" if mode == "max" else "minimize"


def outcome(last: dict, errored: bool = False) -> str:
    """A trial's state from its last report: ``failed`` (it raised, or ended with a recorded failure),
    ``completed`` (its last report carries the final flag) or ``pruned`` (stopped before its end)."""
    if errored or last.get(DIVERGED_FLAG):
        return FAILED
    return COMPLETED if last.get(FINAL_FLAG) else PRUNED


def recorded_state(tags: dict, metrics: dict) -> str:
    """A trial's state from its MLflow run: its state tag (``running`` without one), or ``completed`` when
    its final report arrived (test metrics, or in an older store the final flag) but not its end-of-trial tags."""
    state = tags.get(TAG_STATE, RUNNING)
    if state not in ENDED and (metrics.get(FINAL_FLAG) or any(k.startswith("test/") for k in metrics)):
        return COMPLETED
    return state
