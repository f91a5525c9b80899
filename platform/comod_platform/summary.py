"""A finished or stopped search in numbers, from Ray Tune's result grid: what ``comod search run`` and
``resume`` print and return."""
from __future__ import annotations

import re

from comod.names import KINDS
from comod_platform.conventions import COMPLETED, FAILED, INTERRUPTED, PRUNED, REASON, better, outcome, report_metrics


def last_line(text: str, limit: int = 300) -> str:
    """The last non-empty line of ``text`` (an error's message), at most ``limit`` characters."""
    return next((line.strip() for line in reversed(str(text).splitlines()) if line.strip()), "")[:limit]


SUMMARY_METRICS = ("test/mean_f1", "test/mean_recall", "test/mean_precision")
"""Test metrics of each kind's best trial in a search's summary, besides the search metric."""


def summarise_grid(grid, sf, interrupted=()) -> dict:
    """Keys: ``trials``, ``completed``, ``pruned``, ``interrupted`` (``interrupted``: the ids of trials a
    stopped search left unfinished), ``failed``, ``best`` (``{value, trial_id}`` or None), ``metric``,
    ``best_per_kind`` (``{kind: {trial_id, value, *SUMMARY_METRICS} or None}`` for every kind used) and
    ``failures`` (``[{trial_id, error}]``, each error's last line)."""
    counts = dict.fromkeys((COMPLETED, PRUNED, INTERRUPTED, FAILED), 0)
    metric, mode = sf.search.metric, sf.search.mode
    best = None
    base_kind = sf.base_config().modulation.kind
    per_kind: dict[str, dict | None] = {}
    failures = []
    for result in grid:
        metrics = report_metrics(result.metrics)
        kind = (result.config or {}).get("modulation.kind", base_kind)
        per_kind.setdefault(kind, None)
        trial_id = metrics.get("trial_id") or _trial_id_of(result)
        state = outcome(metrics, errored=result.error is not None)
        state = INTERRUPTED if state == PRUNED and trial_id in interrupted else state
        counts[state] += 1
        value = metrics.get(metric)
        if state == FAILED:
            error = result.error if result.error is not None else metrics.get(REASON, "the loss diverged")
            failures.append({"trial_id": trial_id, "error": last_line(str(error)) or type(error).__name__})
        elif state == COMPLETED and value is not None:
            if best is None or better(value, best["value"], mode):
                best = {"value": value, "trial_id": trial_id}
            top = per_kind[kind]
            if top is None or better(value, top["value"], mode):
                per_kind[kind] = {"trial_id": trial_id, "value": value,
                                  **{k: metrics.get(k) for k in SUMMARY_METRICS}}
    order = {k: i for i, k in enumerate(KINDS)}
    per_kind = dict(sorted(per_kind.items(), key=lambda item: (order.get(item[0], len(order)), item[0])))
    return {"trials": len(grid), **counts, "best": best, "metric": metric, "best_per_kind": per_kind,
            "failures": failures}


def _trial_id_of(result) -> str | None:
    """A result without metrics (a trial that failed before its first report): its id from its folder name."""
    folder = str(getattr(result, "path", "") or "").rstrip("/").rsplit("/", 1)[-1]  # run_trial_ID_INDEX_...
    found = re.search(r"_([0-9a-f]{5}_\d{5}|[0-9a-f]{8})_\d+(_|$)", folder)
    return found.group(1) if found else None
