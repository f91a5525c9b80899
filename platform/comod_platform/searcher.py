"""The search's Optuna study behind Ray Tune's ``Searcher`` interface, by Optuna's ask-and-tell.

Each Ray trial asks the study for one Optuna trial (which records the Ray trial's id) and tells it how the
Ray trial ended: complete only when its last report carries the final flag, pruned when the scheduler (ASHA)
stopped it before (Optuna keeps its intermediate values), failed when it raised or its loss diverged. The
study's database is the authority across a lost driver: a Ray trial restored from an older snapshot finds
its Optuna trial there, one Optuna already closed stays closed, and one a stopped search closed as
interrupted goes on as a new trial of the same parameters."""
from __future__ import annotations

import logging
import pickle
from typing import Callable

import optuna
from optuna.trial import TrialState
from ray.tune.search import Searcher

from comod_platform.conventions import DIVERGED_FLAG, EPOCH, FINAL_FLAG, REASON, TAG_TRIAL_ID

log = logging.getLogger(__name__)

# user attributes of Optuna trials
INTERRUPTED_ATTR = "comod.interrupted"  # "1": closed as failed because its search was stopped
CONTINUES_ATTR = "comod.continues"      # the number of the interrupted trial this one continues
CLOSED_ATTR = "comod.closed"            # why it was closed as failed with no Ray trial to run it

SAMPLERS = {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler,
            "cmaes": optuna.samplers.CmaEsSampler, "qmc": optuna.samplers.QMCSampler,
            # a grid's points are enqueued in the study (grid_points); the sampler is never asked for a value
            "grid": optuna.samplers.RandomSampler}


def create_sampler(search_file) -> optuna.samplers.BaseSampler:
    """The search's Optuna sampler."""
    return SAMPLERS[search_file.search.sampler](seed=search_file.search.seed)


def points_to_evaluate(search_file) -> list[dict] | None:
    """Trials enqueued before any is sampled: every grid point, in order, for ``sampler: grid``
    (conditional paths only where their condition holds, which Optuna's GridSampler cannot express)."""
    return search_file.grid_points() if search_file.search.sampler == "grid" else None


class StudySearcher(Searcher):
    """Ray Tune's searcher on the study ``study_name`` of the database ``url`` (made by the runner).

    ``space``: define-by-run, the trial's config from an Optuna trial; ``points``: configs enqueued, in
    order; ``report_intermediate``: each epoch's score goes to Optuna (for a scheduler that prunes)."""

    def __init__(self, space: Callable[[optuna.Trial], dict], metric: str, mode: str, url: str, study_name: str,
                 sampler: optuna.samplers.BaseSampler, points: list[dict] | None = None,
                 report_intermediate: bool = True):
        super().__init__(metric=metric, mode=mode)
        self.space, self.url, self.study_name, self.sampler = space, url, study_name, sampler
        self.report_intermediate = report_intermediate
        self._open(numbers={})
        for point in points or ():
            self.study.enqueue_trial(point)

    def _open(self, numbers: dict[str, int] | None = None) -> None:
        self.storage = optuna.storages.RDBStorage(self.url)
        self.study = optuna.load_study(study_name=self.study_name, storage=self.storage, sampler=self.sampler)
        self.study_id = self.storage.get_study_id_from_name(self.study_name)
        self._numbers = numbers  # Ray trial id -> its Optuna trial's number (None: read it)
        self._running: set[str] = set()  # Ray trials whose Optuna trial this driver knows is RUNNING

    def __getstate__(self) -> dict:  # Ray Tune pickles the searcher it was given: the database holds the study
        return {k: self.__dict__[k] for k in ("space", "url", "study_name", "sampler", "report_intermediate",
                                              "_metric", "_mode")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._open()

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump({"sampler": self.sampler}, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.sampler = pickle.load(f)["sampler"]  # its random state goes on where the snapshot left it
        self._open()

    @property
    def numbers(self) -> dict[str, int]:
        if self._numbers is None:  # read from the study (its trials in order): later than any snapshot of Ray Tune's
            self._numbers = {t.user_attrs[TAG_TRIAL_ID]: t.number for t in self.study.get_trials(deepcopy=False)
                             if TAG_TRIAL_ID in t.user_attrs}
        return self._numbers

    def _id(self, number: int) -> int:
        return self.storage.get_trial_id_from_study_id_trial_number(self.study_id, number)

    def suggest(self, trial_id: str) -> dict:
        trial = self.study.ask()
        trial.set_user_attr(TAG_TRIAL_ID, trial_id)
        self.numbers[trial_id] = trial.number
        self._running.add(trial_id)
        return self.space(trial)

    def _live(self, trial_id: str) -> int | None:
        """The number of the RUNNING Optuna trial of Ray trial ``trial_id``, or None: it has none, or Optuna
        closed it already (told before a lost driver's last snapshot), which stays closed."""
        number = self.numbers.get(trial_id)
        if number is None or trial_id in self._running:
            return number
        frozen = self.storage.get_trial(self._id(number))
        if frozen.state == TrialState.FAIL and frozen.user_attrs.get(INTERRUPTED_ATTR) == "1":
            # a new RUNNING trial for the interrupted one, with its parameters and intermediate values
            attrs = {k: v for k, v in frozen.user_attrs.items() if k != INTERRUPTED_ATTR}
            template = optuna.trial.create_trial(
                state=TrialState.RUNNING, params=frozen.params, distributions=frozen.distributions,
                user_attrs={**attrs, CONTINUES_ATTR: frozen.number}, intermediate_values=frozen.intermediate_values)
            number = self.storage.get_trial_number_from_id(self.storage.create_new_trial(self.study_id, template))
            self.numbers[trial_id] = number
        elif frozen.state != TrialState.RUNNING:
            return None
        self._running.add(trial_id)
        return number

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if not self.report_intermediate or result.get(FINAL_FLAG) or result.get(DIVERGED_FLAG):
            return
        number = self._live(trial_id)
        if number is not None:
            # the trial's epoch, not Ray's iteration count (which restarts when a trial is restored)
            step = int(result.get(EPOCH, result["training_iteration"]))
            self.storage.set_trial_intermediate_value(self._id(number), step, float(result[self.metric]))

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        number = self._live(trial_id)
        if number is None:
            return
        self._running.discard(trial_id)
        result = result or {}
        value = result.get(self.metric) if result.get(FINAL_FLAG) else None
        state = TrialState.FAIL if error or result.get(DIVERGED_FLAG) else \
            TrialState.PRUNED if value is None else TrialState.COMPLETE
        if result.get(DIVERGED_FLAG):
            self.storage.set_trial_user_attr(self._id(number), "comod.reason",
                                             str(result.get(REASON, "diverged"))[:500])
        try:
            self.study.tell(number, value if state == TrialState.COMPLETE else None, state=state,
                            skip_if_finished=True)
        except (ValueError, RuntimeError) as exc:  # the search goes on; the end of the search closes it
            log.warning("Optuna trial %d of Ray trial %s not told: %s", number, trial_id, exc)


def close_running(url: str, study_name: str, interrupted: bool) -> None:
    """Close every RUNNING trial of the study as failed: ``interrupted`` (a stopped search's, which a
    resume continues), else never run (asked by a lost driver after its last snapshot)."""
    storage = optuna.storages.RDBStorage(url)
    study_id = storage.get_study_id_from_name(study_name)
    why = (INTERRUPTED_ATTR, "1") if interrupted else (CLOSED_ATTR, "asked before the driver was lost; never run")
    for frozen in storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, frozen.number)
        storage.set_trial_user_attr(trial_id, *why)
        storage.set_trial_state_values(trial_id, TrialState.FAIL)
