"""The search's Optuna study, kept in the driver's memory and written behind to its database.

Ray Tune asks the searcher for the next trial in its scheduling loop, while
a trial slot waits: with the study on SQLite (or a team PostgreSQL) every
``suggest_*`` of the space, every ``ask`` and every ``tell`` is a database
commit, about 60 ms a trial here. :class:`WriteBehindStorage` answers Optuna
from an :class:`optuna.storages.InMemoryStorage` copy of the study (the
sampler reads the trials from memory too) and replays every write, in order,
to the real storage on a thread of its own (:class:`writer.Writer`: a
database that is locked or away is waited for, nothing is dropped silently).

The copy is made from the database when the storage is created or unpickled
(a resumed search), so trial numbers, and with one study in memory also
trial ids, are the database's. That holds because a search's study has one
writer: the search's driver (its driver lock). Pickling (Ray Tune's
experiment snapshot) and :func:`flush_all` (the end of a search) wait until
the database has every write, so a snapshot never names a trial the
database lacks.
"""
from __future__ import annotations

import copy
import logging
import weakref
from typing import Any, Container, Sequence

import optuna
from optuna.storages import BaseStorage, InMemoryStorage
from optuna.trial import FrozenTrial, TrialState

from comod_platform.writer import BACKGROUND_NICE, Writer

log = logging.getLogger(__name__)
_LIVE: "weakref.WeakSet[WriteBehindStorage]" = weakref.WeakSet()
FLUSH_TIMEOUT_S = 900.0


class WriteBehindStorage(BaseStorage):
    """One study of ``backend`` (created there if missing), served from memory, written behind."""

    def __init__(self, backend: BaseStorage, study_name: str, directions: Sequence = ("maximize",)):
        self.backend, self.study_name = backend, study_name
        self._directions = [optuna.study.StudyDirection[d.upper()] if isinstance(d, str) else d for d in directions]
        self._load()

    # -- copy from the database, write behind --------------------------------
    def _load(self) -> None:
        backend = self.backend
        try:
            self._backend_study = backend.get_study_id_from_name(self.study_name)
        except KeyError:
            self._backend_study = backend.create_new_study(self._directions, self.study_name)
        self.memory = InMemoryStorage()
        optuna_log = logging.getLogger("optuna")
        level = optuna_log.level
        optuna_log.setLevel(max(level, logging.WARNING))  # the copy in memory is ours, not news to the user
        try:
            self._study = self.memory.create_new_study(backend.get_study_directions(self._backend_study),
                                                       self.study_name)
        finally:
            optuna_log.setLevel(level)
        for key, value in backend.get_study_user_attrs(self._backend_study).items():
            self.memory.set_study_user_attr(self._study, key, value)
        for key, value in backend.get_study_system_attrs(self._backend_study).items():
            self.memory.set_study_system_attr(self._study, key, value)
        self._distributions: dict = {}  # param name -> its distribution in this study (the database's check)
        for frozen in sorted(backend.get_all_trials(self._backend_study), key=lambda t: t.number):
            self.memory.create_new_trial(self._study, template_trial=frozen)
            self._distributions.update(frozen.distributions)
        self._ids: dict[int, int] = {}  # memory trial id -> database trial id, filled as writes go out
        self.writer = Writer(describe=f"the Optuna study {self.study_name!r}", name="comod-optuna-writer",
                             nice=BACKGROUND_NICE)
        _LIVE.add(self)

    def _backend_trial(self, trial_id: int) -> int:
        if trial_id not in self._ids:
            number = self.memory.get_trial_number_from_id(trial_id)
            self._ids[trial_id] = self.backend.get_trial_id_from_study_id_trial_number(self._backend_study, number)
        return self._ids[trial_id]

    def _behind(self, method: str, trial_id: int | None, *args) -> None:
        def write():
            target = getattr(self.backend, method)
            if trial_id is None:
                target(self._backend_study, *args)
            else:
                target(self._backend_trial(trial_id), *args)

        write.__name__ = method
        self.writer.submit(write)

    def _create_behind(self, trial_id: int, template: FrozenTrial) -> None:
        def create_new_trial():
            self._ids[trial_id] = self.backend.create_new_trial(self._backend_study, template_trial=template)

        self.writer.submit(create_new_trial)

    def flush(self, timeout: float | None = FLUSH_TIMEOUT_S) -> bool:
        """Wait until the database has every write (True), or ``timeout`` s passed (False)."""
        return self.writer.flush(timeout)

    def pending(self) -> int:
        return self.writer.pending()

    def __getstate__(self) -> dict:  # Ray Tune's snapshot of the searcher: the database holds the study
        if not self.flush():
            log.warning("the Optuna study %r: %d writes not yet in its database at this snapshot",
                        self.study_name, self.pending())
        return {"backend": self.backend, "study_name": self.study_name, "_directions": self._directions}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._load()

    def _own(self, study_id: int) -> None:
        if study_id != self._study:
            raise KeyError(f"study {study_id} is not the study {self.study_name!r} this storage holds")

    # -- studies ----------------------------------------------------------------
    def create_new_study(self, directions, study_name: str | None = None) -> int:
        if study_name == self.study_name:
            raise optuna.exceptions.DuplicatedStudyError(f"study {study_name!r} exists")
        raise NotImplementedError(f"this storage holds the study {self.study_name!r} only")

    def delete_study(self, study_id: int) -> None:
        raise NotImplementedError("a search's study is deleted in its database, not through its driver")

    def set_study_user_attr(self, study_id: int, key: str, value: Any) -> None:
        self._own(study_id)
        self.memory.set_study_user_attr(study_id, key, value)
        self._behind("set_study_user_attr", None, key, value)

    def set_study_system_attr(self, study_id: int, key: str, value: Any) -> None:
        self._own(study_id)
        self.memory.set_study_system_attr(study_id, key, value)
        self._behind("set_study_system_attr", None, key, value)

    def get_study_id_from_name(self, study_name: str) -> int:
        return self.memory.get_study_id_from_name(study_name)

    def get_study_name_from_id(self, study_id: int) -> str:
        return self.memory.get_study_name_from_id(study_id)

    def get_study_directions(self, study_id: int):
        return self.memory.get_study_directions(study_id)

    def get_study_user_attrs(self, study_id: int) -> dict[str, Any]:
        return self.memory.get_study_user_attrs(study_id)

    def get_study_system_attrs(self, study_id: int) -> dict[str, Any]:
        return self.memory.get_study_system_attrs(study_id)

    def get_all_studies(self):
        return self.memory.get_all_studies()

    # -- trials -----------------------------------------------------------------
    def create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> int:
        self._own(study_id)
        trial_id = self.memory.create_new_trial(study_id, template_trial=template_trial)
        self._create_behind(trial_id, copy.deepcopy(self.memory.get_trial(trial_id)))
        return trial_id

    def set_trial_param(self, trial_id: int, param_name: str, param_value_internal: float, distribution) -> None:
        # refused here, as the database would refuse it, not dropped later by the writer
        if param_name in self._distributions:
            optuna.distributions.check_distribution_compatibility(self._distributions[param_name], distribution)
        self.memory.set_trial_param(trial_id, param_name, param_value_internal, distribution)
        self._distributions[param_name] = distribution
        self._behind("set_trial_param", trial_id, param_name, param_value_internal, distribution)

    def set_trial_state_values(self, trial_id: int, state: TrialState, values: Sequence[float] | None = None) -> bool:
        changed = self.memory.set_trial_state_values(trial_id, state, values)
        if changed:
            self._behind("set_trial_state_values", trial_id, state, values)
        return changed

    def set_trial_intermediate_value(self, trial_id: int, step: int, intermediate_value: float) -> None:
        self.memory.set_trial_intermediate_value(trial_id, step, intermediate_value)
        self._behind("set_trial_intermediate_value", trial_id, step, intermediate_value)

    def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        self.memory.set_trial_user_attr(trial_id, key, value)
        self._behind("set_trial_user_attr", trial_id, key, value)

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        self.memory.set_trial_system_attr(trial_id, key, value)
        self._behind("set_trial_system_attr", trial_id, key, value)

    def get_trial_id_from_study_id_trial_number(self, study_id: int, trial_number: int) -> int:
        return self.memory.get_trial_id_from_study_id_trial_number(study_id, trial_number)

    def get_trial_number_from_id(self, trial_id: int) -> int:
        return self.memory.get_trial_number_from_id(trial_id)

    def get_trial(self, trial_id: int) -> FrozenTrial:
        return self.memory.get_trial(trial_id)

    def get_all_trials(self, study_id: int, deepcopy: bool = True,
                       states: Container[TrialState] | None = None) -> list[FrozenTrial]:
        return self.memory.get_all_trials(study_id, deepcopy=deepcopy, states=states)


def flush_all(timeout: float = FLUSH_TIMEOUT_S) -> bool:
    """Wait until every live write-behind study of this process is in its database (False: timed out)."""
    done = True
    for storage in list(_LIVE):
        if not storage.flush(timeout):
            log.warning("the Optuna study %r: %d writes not in its database", storage.study_name, storage.pending())
            done = False
    return done
