"""Optuna through Ray Tune, with early-stopped trials told as pruned.

Ray's OptunaSearch tells Optuna that a trial stopped by the scheduler (ASHA)
is COMPLETE with its last, partial score, which teaches the sampler that a
one-epoch score is final. Here only a trial whose last report carries the
final flag is complete; one stopped before is PRUNED (Optuna keeps its
intermediate values), one that raised is FAIL.
"""
from __future__ import annotations

import optuna
from optuna.trial import TrialState
from ray.tune.search.optuna import OptunaSearch

from comod_platform.conventions import FINAL_FLAG

SAMPLERS = {
    "tpe": lambda seed: optuna.samplers.TPESampler(seed=seed),
    "random": lambda seed: optuna.samplers.RandomSampler(seed=seed),
    "cmaes": lambda seed: optuna.samplers.CmaEsSampler(seed=seed),
    "qmc": lambda seed: optuna.samplers.QMCSampler(seed=seed),
}


def create_sampler(name: str, seed: int) -> optuna.samplers.BaseSampler:
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name](seed)


class PruneAwareOptunaSearch(OptunaSearch):
    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        if error or not result or not result.get(FINAL_FLAG):
            state = TrialState.FAIL if error else TrialState.PRUNED
            try:
                self._ot_study.tell(self._ot_trials[trial_id], state=state)
            except Exception as exc:  # noqa: BLE001 - a trial Optuna already closed stays closed
                optuna.logging.get_logger(__name__).warning(str(exc))
            self._completed_trials.add(trial_id)
            return
        super().on_trial_complete(trial_id, result, error)
