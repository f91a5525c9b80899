"""StudySearcher on a real Optuna study in SQLite, called as Ray Tune calls it: what each Ray trial's end
tells Optuna, and what a driver lost or stopped at any point leaves for the resumed search."""
from __future__ import annotations

import pickle

import optuna
import pytest
from optuna.trial import TrialState

from comod_platform.conventions import DIVERGED_FLAG, EPOCH, FINAL_FLAG, REASON, TAG_TRIAL_ID
from comod_platform.searcher import CLOSED_ATTR, CONTINUES_ATTR, INTERRUPTED_ATTR, StudySearcher, close_running

optuna.logging.set_verbosity(optuna.logging.WARNING)
METRIC = "val/mean_f1"


def space(trial) -> dict:
    return {"kind": trial.suggest_categorical("kind", ["deterministic", "stochastic"]),
            "lr": trial.suggest_float("lr", 1e-4, 1e-1, log=True)}


@pytest.fixture
def url(tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    optuna.create_study(study_name="s", storage=url, direction="maximize")
    return url


def _searcher(url, **kwargs) -> StudySearcher:
    return StudySearcher(space, METRIC, "max", url, "s", optuna.samplers.RandomSampler(seed=0), **kwargs)


def _epochs(searcher, trial_id, *values):
    for epoch, value in enumerate(values, 1):
        searcher.on_trial_result(trial_id, {METRIC: value, EPOCH: epoch, "training_iteration": epoch})


def _trials(url):
    return optuna.load_study(study_name="s", storage=url).get_trials()


def test_grid_points_in_order_and_how_each_end_is_told(url):
    points = [{"kind": "stochastic", "lr": 0.01}, {"kind": "deterministic", "lr": 0.001}]
    searcher = _searcher(url, points=points)
    configs = [searcher.suggest(f"t{i}") for i in range(5)]
    assert configs[:2] == points  # enqueued first, in order
    _epochs(searcher, "t0", 0.5, 0.6)
    searcher.on_trial_complete("t0", {METRIC: 0.7, FINAL_FLAG: 1, EPOCH: 3})
    _epochs(searcher, "t1", 0.2)
    searcher.on_trial_complete("t1", {METRIC: 0.2, EPOCH: 1})  # stopped by the scheduler: no final flag
    searcher.on_trial_complete("t2", None, error=True)
    searcher.on_trial_complete("t3", {METRIC: float("nan"), DIVERGED_FLAG: 1, REASON: "the loss diverged at step 3"})
    trials = _trials(url)
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.FAIL,
                                         TrialState.RUNNING]
    assert trials[0].value == 0.7 and trials[0].intermediate_values == {1: 0.5, 2: 0.6}
    assert trials[1].intermediate_values == {1: 0.2}  # a pruned trial keeps its curve
    assert trials[3].user_attrs["comod.reason"] == "the loss diverged at step 3"
    assert [t.user_attrs[TAG_TRIAL_ID] for t in trials] == [f"t{i}" for i in range(5)]
    quiet = _searcher(url, report_intermediate=False)  # FIFO: no intermediate values
    quiet.suggest("q")
    _epochs(quiet, "q", 0.1)
    assert _trials(url)[-1].intermediate_values == {}


def test_a_lost_driver_neither_duplicates_nor_reopens_what_optuna_closed(url, tmp_path):
    """The driver is lost after telling a trial but before Ray Tune's next snapshot, and after asking one
    that no snapshot names: the restored search runs the told trial again and tells Optuna nothing new,
    goes on with the sampler where the snapshot left it, and the unrun trial is closed at its end."""
    searcher = _searcher(url)
    created = pickle.dumps(searcher)  # what the Tuner keeps of the searcher it was given
    searcher.suggest("a")
    searcher.suggest("b")
    _epochs(searcher, "a", 0.3)
    snapshot = tmp_path / "searcher.pkl"
    searcher.save(str(snapshot))
    expected = searcher.suggest("next")  # what the sampler gives after the snapshot
    searcher.on_trial_complete("a", {METRIC: 0.9, FINAL_FLAG: 1})  # told, then the driver is lost

    restored = pickle.loads(created)
    restored.restore(str(snapshot))
    assert restored.suggest("next-again") == expected
    _epochs(restored, "a", 0.1, 0.2)  # Ray Tune runs the trial again from its checkpoint
    restored.on_trial_complete("a", {METRIC: 0.8, FINAL_FLAG: 1})
    _epochs(restored, "b", 0.4)
    restored.on_trial_complete("b", {METRIC: 0.5, FINAL_FLAG: 1})
    restored.on_trial_complete("next-again", {METRIC: 0.6, FINAL_FLAG: 1})
    close_running(url, "s", interrupted=False)
    trials = _trials(url)
    assert [(t.user_attrs[TAG_TRIAL_ID], t.state, t.value) for t in trials] == [
        ("a", TrialState.COMPLETE, 0.9), ("b", TrialState.COMPLETE, 0.5), ("next", TrialState.FAIL, None),
        ("next-again", TrialState.COMPLETE, 0.6)]
    assert trials[0].intermediate_values == {1: 0.3}
    assert "never run" in trials[2].user_attrs[CLOSED_ATTR]


def test_a_trial_ray_knows_but_the_searchers_snapshot_does_not_is_found_in_the_study(url, tmp_path):
    searcher = _searcher(url)
    snapshot = tmp_path / "searcher.pkl"
    searcher.save(str(snapshot))  # before the trial was asked
    searcher.suggest("late")
    restored = pickle.loads(pickle.dumps(searcher))
    restored.restore(str(snapshot))
    restored.on_trial_complete("late", {METRIC: 0.4, FINAL_FLAG: 1})
    assert [(t.state, t.value) for t in _trials(url)] == [(TrialState.COMPLETE, 0.4)]


def test_a_stopped_search_s_trials_go_on_as_new_trials_of_the_same_parameters(url, tmp_path):
    searcher = _searcher(url)
    config = searcher.suggest("a")
    _epochs(searcher, "a", 0.3, 0.4)
    searcher.save(str(tmp_path / "searcher.pkl"))
    close_running(url, "s", interrupted=True)  # Ctrl-C: nothing stays RUNNING while no driver runs it
    (closed,) = _trials(url)
    assert closed.state == TrialState.FAIL and closed.user_attrs[INTERRUPTED_ATTR] == "1"

    restored = pickle.loads(pickle.dumps(searcher))
    restored.restore(str(tmp_path / "searcher.pkl"))
    _epochs(restored, "a", 0.3, 0.4, 0.5)
    restored.on_trial_complete("a", {METRIC: 0.6, FINAL_FLAG: 1})
    first, second = _trials(url)
    assert first.state == TrialState.FAIL and first.user_attrs[INTERRUPTED_ATTR] == "1"
    assert second.state == TrialState.COMPLETE and second.value == 0.6 and second.params == config
    assert second.user_attrs[CONTINUES_ATTR] == first.number and INTERRUPTED_ATTR not in second.user_attrs
    assert second.intermediate_values == {1: 0.3, 2: 0.4, 3: 0.5}
