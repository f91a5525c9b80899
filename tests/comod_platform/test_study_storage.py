"""The write-behind study: Optuna answered from memory, every write in a real SQLite database."""
from __future__ import annotations

import pickle
import sqlite3
import threading
import time

import optuna
import pytest
from optuna.trial import TrialState

from comod_platform.study_storage import WriteBehindStorage, flush_all

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _objective(trial: optuna.Trial) -> float:
    kind = trial.suggest_categorical("kind", ["none", "deterministic", "stochastic"])
    lr = trial.suggest_float("lr", 1e-4, 1e-1, log=True)
    if kind == "stochastic":
        trial.suggest_float("noise", 0.05, 1.0)
    for step in range(3):
        trial.report(lr * (step + 1), step)
    trial.set_user_attr("seen", trial.number)
    if trial.number == 3:
        raise optuna.TrialPruned()
    if trial.number == 4:
        raise ValueError("a failing trial")
    return lr


def _rows(storage, name: str) -> list[tuple]:
    study = optuna.load_study(study_name=name, storage=storage)
    return [(t.number, t.state, t.params, t.values, t.intermediate_values, t.user_attrs)
            for t in study.get_trials(deepcopy=False)]


@pytest.fixture
def database(tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    optuna.create_study(study_name="s", storage=url, direction="maximize").set_user_attr("comod.search_id", "abc")
    return url


def test_the_database_gets_every_write_in_order(database):
    storage = WriteBehindStorage(optuna.storages.RDBStorage(database), "s", ["maximize"])
    study = optuna.create_study(study_name="s", storage=storage, load_if_exists=True,
                                sampler=optuna.samplers.RandomSampler(seed=0))
    assert study.user_attrs == {"comod.search_id": "abc"}  # copied from the database
    study.enqueue_trial({"kind": "stochastic", "lr": 0.01, "noise": 0.5})
    study.optimize(_objective, n_trials=8, catch=(ValueError,))
    assert storage.flush(30)
    rows = _rows(database, "s")
    assert rows == _rows(storage, "s")
    assert [r[0] for r in rows] == list(range(8))
    states = [r[1] for r in rows]
    assert states.count(TrialState.PRUNED) == 1 and states.count(TrialState.FAIL) == 1
    assert rows[0][2] == {"kind": "stochastic", "lr": 0.01, "noise": 0.5}  # the enqueued point, as trial 0


def test_a_snapshot_reloads_from_the_database_and_numbering_goes_on(database):
    storage = WriteBehindStorage(optuna.storages.RDBStorage(database), "s", ["maximize"])
    study = optuna.create_study(study_name="s", storage=storage, load_if_exists=True)
    study.optimize(_objective, n_trials=2)
    running = study.ask()  # asked, not told: a trial the driver was running at the snapshot
    restored = pickle.loads(pickle.dumps(storage))  # the pickle waits for the database, the copy reads it
    assert _rows(restored, "s") == _rows(database, "s")
    again = optuna.create_study(study_name="s", storage=restored, load_if_exists=True)
    again.tell(running.number, 0.5)
    again.optimize(lambda t: t.suggest_float("lr", 1e-4, 1e-1, log=True), n_trials=2)
    assert flush_all(30)
    rows = _rows(database, "s")
    assert [r[0] for r in rows] == [0, 1, 2, 3, 4]
    assert rows[2][1] == TrialState.COMPLETE and rows[2][3] == [0.5]


def test_a_locked_database_does_not_hold_up_the_search(database):
    """While another connection holds SQLite's write lock, asking and telling answer from memory; the
    writes wait in order and reach the database once the lock goes."""
    storage = WriteBehindStorage(optuna.storages.RDBStorage(database), "s", ["maximize"])
    study = optuna.create_study(study_name="s", storage=storage, load_if_exists=True)
    blocker = sqlite3.connect(database.removeprefix("sqlite:///"), isolation_level=None, check_same_thread=False)
    blocker.execute("BEGIN EXCLUSIVE")
    release = threading.Timer(2.0, lambda: blocker.execute("COMMIT"))
    release.start()
    try:
        started = time.perf_counter()
        for _ in range(3):
            trial = study.ask()
            trial.suggest_float("lr", 1e-4, 1e-1, log=True)
            study.tell(trial, 0.1)
        assert time.perf_counter() - started < 1.0, "the search waited for the locked database"
        assert storage.pending() > 0
    finally:
        release.join()
        blocker.close()
    assert storage.flush(60)
    assert [r[1] for r in _rows(database, "s")] == [TrialState.COMPLETE] * 3


def test_a_parameter_of_another_distribution_is_refused_at_once(database):
    """As the database refuses it: the caller learns it, the writer never drops it."""
    storage = WriteBehindStorage(optuna.storages.RDBStorage(database), "s", ["maximize"])
    study = optuna.create_study(study_name="s", storage=storage, load_if_exists=True)
    study.optimize(lambda t: t.suggest_float("lr", 1e-4, 1e-1, log=True), n_trials=1)
    trial = study.ask()
    with pytest.raises(ValueError, match="log"):
        trial.suggest_float("lr", 1e-4, 1e-1)
    assert storage.flush(30) and storage.writer.dropped == 0


def test_only_its_own_study(database):
    storage = WriteBehindStorage(optuna.storages.RDBStorage(database), "s", ["maximize"])
    with pytest.raises(optuna.exceptions.DuplicatedStudyError):
        storage.create_new_study([optuna.study.StudyDirection.MAXIMIZE], "s")
    with pytest.raises(NotImplementedError):
        storage.create_new_study([optuna.study.StudyDirection.MAXIMIZE], "other")
    with pytest.raises(KeyError):
        storage.set_study_user_attr(storage.get_study_id_from_name("s") + 1, "k", "v")


def test_a_missing_study_is_created_in_the_database(tmp_path):
    url = f"sqlite:///{tmp_path / 'new.db'}"
    storage = WriteBehindStorage(optuna.storages.RDBStorage(url), "fresh", ["minimize"])
    study = optuna.create_study(study_name="fresh", storage=storage, load_if_exists=True, direction="minimize")
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    assert storage.flush(30)
    loaded = optuna.load_study(study_name="fresh", storage=url)
    assert loaded.direction == optuna.study.StudyDirection.MINIMIZE and len(loaded.trials) == 2


def test_the_studys_writes_run_below_the_trials_priority(database):
    """The study's writer thread runs at the lowest CPU priority, below Ray's workers (nice 15), so the
    trials come first where they take every core; the driver's own threads keep theirs."""
    import os
    import threading

    from comod_platform.writer import BACKGROUND_NICE

    storage = WriteBehindStorage(optuna.storages.RDBStorage(database), "s", ["maximize"])
    seen = []
    storage.writer.submit(lambda: seen.append((os.getpriority(os.PRIO_PROCESS, threading.get_native_id()),
                                               os.sched_getscheduler(0))))
    assert storage.flush(30)
    # not SCHED_IDLE: Ray Tune's snapshot waits for this writer, which must not wait for an idle core
    assert BACKGROUND_NICE > 15 and seen == [(19, os.SCHED_OTHER)]
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == os.getpriority(os.PRIO_PROCESS, 0)
