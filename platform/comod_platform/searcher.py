"""Optuna through Ray Tune, with early-stopped trials told as pruned.

Ray's OptunaSearch tells Optuna that a trial stopped by the scheduler (ASHA)
is COMPLETE with its last, partial score, which teaches the sampler that a
one-epoch score is final. Here only a trial whose last report carries the
final flag is complete; one stopped before is PRUNED (Optuna keeps its
intermediate values), one that raised or whose loss diverged is FAIL.
"""
from __future__ import annotations

import optuna
from optuna.trial import TrialState
from ray.tune.search.optuna import OptunaSearch

from comod_platform.conventions import DIVERGED_FLAG, EPOCH, FINAL_FLAG, REASON

INTERRUPTED_ATTR = "comod.interrupted"
"""User attribute ("1") of an Optuna trial closed as failed because its search was stopped."""
CONTINUES_ATTR = "comod.continues"
"""User attribute of the trial a resume opened for an interrupted one: that trial's number."""

SAMPLERS = {
    "tpe": lambda seed: optuna.samplers.TPESampler(seed=seed),
    "random": lambda seed: optuna.samplers.RandomSampler(seed=seed),
    "cmaes": lambda seed: optuna.samplers.CmaEsSampler(seed=seed),
    "qmc": lambda seed: optuna.samplers.QMCSampler(seed=seed),
    # a grid's points are enqueued in the study (grid_points); the sampler is never asked for a value
    "grid": lambda seed: optuna.samplers.RandomSampler(seed=seed),
}


def create_sampler(search_file) -> optuna.samplers.BaseSampler:
    """The search's Optuna sampler."""
    s = search_file.search
    if s.sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {s.sampler!r}; choose one of {', '.join(SAMPLERS)}")
    return SAMPLERS[s.sampler](s.seed)


def points_to_evaluate(search_file) -> list[dict] | None:
    """Trials enqueued before any is sampled: every grid point, in order, for ``sampler: grid``
    (conditional paths only where their condition holds, which Optuna's GridSampler cannot express)."""
    return search_file.grid_points() if search_file.search.sampler == "grid" else None


class PruneAwareOptunaSearch(OptunaSearch):
    """Also safe across a driver lost mid-search: after a restore, a trial that
    Optuna already closed (it finished after the last snapshot) is left closed,
    and study trials asked after that snapshot, which no Ray trial will ever
    finish, are closed as failed instead of staying RUNNING forever."""

    def __init__(self, *args, report_intermediate: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.report_intermediate = report_intermediate
        self._restored_ids: set[str] = set()

    def _closed_in_storage(self, trial_id: str) -> bool:
        # only trials restored from a snapshot can have been closed behind the searcher's back
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is None or trial_id not in self._restored_ids:
            return False
        if self._ot_study._storage.get_trial(ot_trial._trial_id).state.is_finished():
            self._completed_trials.add(trial_id)
            return True
        return False

    def on_trial_result(self, trial_id: str, result: dict):
        if not self.report_intermediate or result.get(FINAL_FLAG) or trial_id in self._completed_trials \
                or self._closed_in_storage(trial_id) or trial_id not in self._ot_trials:
            return
        # the trial's epoch, not Ray's iteration count (which restarts when a trial is restored)
        self._ot_trials[trial_id].report(result[self.metric], int(result.get(EPOCH, result["training_iteration"])))

    def restore(self, checkpoint_path: str):
        super().restore(checkpoint_path)
        try:
            self._reopen_interrupted()
        except Exception as exc:  # noqa: BLE001 - Ray would start the whole search over on a restore error
            optuna.logging.get_logger(__name__).warning(f"interrupted Optuna trials not continued: {exc}")
        self._restored_ids = set(self._ot_trials)
        known = {t._trial_id for t in self._ot_trials.values()}
        for frozen in self._ot_study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if frozen._trial_id not in known:
                self._ot_study._storage.set_trial_user_attr(frozen._trial_id, "comod.closed",
                                                            "asked before the driver was lost; never run")
                self._ot_study.tell(frozen.number, state=TrialState.FAIL)

    def _reopen_interrupted(self) -> None:
        """A stopped search closed its running Optuna trials as failed, marked interrupted (no trial stays
        RUNNING while no driver runs it). The Ray trials go on after a restore: each gets a new RUNNING
        Optuna trial with the same parameters and intermediate values, and the closed one says which."""
        storage = self._ot_study._storage
        for trial_id, ot_trial in list(self._ot_trials.items()):
            frozen = storage.get_trial(ot_trial._trial_id)
            if frozen.state != TrialState.FAIL or frozen.user_attrs.get(INTERRUPTED_ATTR) != "1":
                continue
            attrs = {k: v for k, v in frozen.user_attrs.items() if k != INTERRUPTED_ATTR}
            template = optuna.trial.FrozenTrial(
                number=-1, state=TrialState.RUNNING, value=None, values=None, datetime_start=None,
                datetime_complete=None, params=frozen.params, distributions=frozen.distributions,
                user_attrs={**attrs, CONTINUES_ATTR: frozen.number}, system_attrs={},
                intermediate_values=frozen.intermediate_values, trial_id=-1)
            new_id = storage.create_new_trial(self._ot_study._study_id, template_trial=template)
            self._ot_trials[trial_id] = optuna.trial.Trial(self._ot_study, new_id)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        if trial_id in self._completed_trials or trial_id not in self._ot_trials \
                or self._closed_in_storage(trial_id):
            return
        if error or not result or not result.get(FINAL_FLAG):
            diverged = bool((result or {}).get(DIVERGED_FLAG))
            state = TrialState.FAIL if error or diverged else TrialState.PRUNED
            try:
                if diverged:
                    self._ot_study._storage.set_trial_user_attr(self._ot_trials[trial_id]._trial_id, "comod.reason",
                                                                str(result.get(REASON, "diverged"))[:500])
                self._ot_study.tell(self._ot_trials[trial_id], state=state)
            except Exception as exc:  # noqa: BLE001 - a trial Optuna already closed stays closed
                optuna.logging.get_logger(__name__).warning(str(exc))
            self._completed_trials.add(trial_id)
            return
        super().on_trial_complete(trial_id, result, error)
