"""Optuna's parameter importances of a search, per modulation kind, read from its Optuna study: how
much of the search metric's variation each searched setting explains among a kind's completed trials
(fANOVA, a random forest of scikit-learn, which MLflow brings), normalised to sum to 1."""
from __future__ import annotations

import json
import math
from typing import Any

from comod.names import KINDS
from comod_platform.conventions import direction

IMPORTANCE_MIN_TRIALS = 4
"""Completed trials a kind needs before its parameter importances are computed."""
IMPORTANCE_SEED = 0
IMPORTANCES_FILE = "importances.json"


def param_importances(trials: list, min_trials: int = IMPORTANCE_MIN_TRIALS, seed: int = IMPORTANCE_SEED,
                      direction: str = "maximize") -> dict:
    """Importances over the completed Optuna ``FrozenTrial``s, of the parameters all have that varied:
    ``{"trials": n, "params": {name: importance} largest first, or None, "note": why None}``."""
    import optuna
    from optuna.trial import TrialState

    done = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None and math.isfinite(t.value)]
    out: dict[str, Any] = {"trials": len(done), "params": None, "note": None}
    if len(done) < min_trials:
        return {**out, "note": f"{len(done)} completed trial(s); importances need at least {min_trials}"}
    varied = [p for p in done[0].params if all(p in t.params for t in done)
              and len({json.dumps(t.params[p], sort_keys=True, default=str) for t in done}) > 1]
    if not varied:
        return {**out, "note": "no searched setting took more than one value among the completed trials"}
    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.create_study(direction=direction)  # in memory: only these trials
        study.add_trials(done)
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=seed)
        found = optuna.importance.get_param_importances(study, evaluator=evaluator, params=varied)
        out["params"] = {p: float(v) for p, v in sorted(found.items(), key=lambda kv: -kv[1])}
    except Exception as err:  # noqa: BLE001 - e.g. a metric equal in every trial (zero variance)
        out["note"] = f"no importances: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
    finally:
        optuna.logging.set_verbosity(level)
    return out


def importances(results, metric: str | None = None, min_trials: int = IMPORTANCE_MIN_TRIALS,
                seed: int = IMPORTANCE_SEED) -> dict:
    """The importances of the search metric per kind and, with several kinds, over all of them (the kind
    a parameter). Never raises: a study that cannot be read is a note."""
    from comod_platform.dashboard import open_study_storage

    meta = results.meta
    out: dict[str, Any] = {"metric": results.metric, "study": getattr(meta, "study_name", None),
                           "evaluator": f"fANOVA (optuna.importance.FanovaImportanceEvaluator, seed {seed})",
                           "min_trials": min_trials, "kinds": {}, "all": None, "notes": []}
    if metric is not None and metric != results.metric:
        out["notes"].append(f"Importances are of `{results.metric}`, the search metric that Optuna's study was "
                            f"told, not of `{metric}`.")
    try:
        storage, study_id = open_study_storage(meta.optuna_storage, meta.study_name, meta.name)
        try:
            trials = storage.get_all_trials(study_id, deepcopy=False)
        finally:
            storage.engine.dispose()
        base_kind = results.search.base_config().modulation.kind
    except Exception as err:  # noqa: BLE001 - the rest of the report stands without them
        out["notes"].append(f"The search's Optuna study cannot be read, so no importances: {err}")
        return out
    objective = direction(results.mode)
    by_kind: dict[str, list] = {}
    for t in trials:
        by_kind.setdefault(str(t.params.get("modulation.kind", base_kind)), []).append(t)
    for kind in [k for k in KINDS if k in by_kind] + sorted(k for k in by_kind if k not in KINDS):
        out["kinds"][kind] = param_importances(by_kind[kind], min_trials, seed, objective)
    if len(by_kind) > 1:
        out["all"] = param_importances(trials, min_trials, seed, objective)
    if not trials:
        out["notes"].append("The search's Optuna study has no trial yet.")
    return out
