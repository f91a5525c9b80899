"""The search driver's MLflow bookkeeping on a real (SQLite) tracking store."""
from __future__ import annotations

import os
import time

from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient

from comod_platform import runner
from comod_platform.conventions import TAG_PARENT, TAG_ROLE, TAG_STATE, TAG_TRIAL_ID
from comod_platform.searchfile import load_search
from comod_platform.tune_callbacks import MlflowTrialCallback
from searches import REPO


def _search_store(tmp_path, name: str):
    """A real SQLite tracking store holding a search's experiment and parent run: (uri, client, experiment
    id, parent run id)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment(f"search/{name}", artifact_location=(tmp_path / "art").as_uri())
    return uri, client, experiment, client.create_run(experiment, tags={TAG_ROLE: "search"}).info.run_id


def test_a_resume_drops_the_runs_of_trials_the_lost_driver_never_snapshotted(tmp_path):
    uri, client, experiment, parent = _search_store(tmp_path, "lost")
    other_parent = client.create_run(experiment, tags={TAG_ROLE: "search"}).info.run_id
    runs = {}
    for trial_id, parent_id in (("kept", parent), ("done", parent), ("lost", parent), ("elsewhere", other_parent)):
        runs[trial_id] = client.create_run(experiment, tags={TAG_PARENT: parent_id, TAG_ROLE: "trial",
                                                            TAG_TRIAL_ID: trial_id, TAG_STATE: "running"}).info.run_id
    client.set_terminated(runs["done"], status="FINISHED")

    callback = MlflowTrialCallback(load_search(REPO / "search_spaces" / "tiny.yaml"), "lost", uri, experiment,
                                   parent)
    callback.runs.drop_lost_runs({"kept", "done"})  # the trials the restored experiment knows
    assert callback.runs.flush(30)

    active = {r.data.tags[TAG_TRIAL_ID] for r in client.search_runs([experiment]) if TAG_TRIAL_ID in r.data.tags}
    assert active == {"kept", "done", "elsewhere"}  # another search's runs are not this one's to drop
    lost = client.get_run(runs["lost"])
    assert lost.info.lifecycle_stage == "deleted" and lost.info.status == "KILLED"
    assert lost.data.tags[TAG_STATE] == "lost"
    deleted = client.search_runs([experiment], run_view_type=ViewType.DELETED_ONLY)
    assert [r.info.run_id for r in deleted] == [runs["lost"]]
    assert client.get_run(runs["done"]).info.status == "FINISHED"


def test_a_search_sends_no_usage_reports_unless_told_to(monkeypatch):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_DISABLE_TELEMETRY"}
    env["RAY_USAGE_STATS_ENABLED"] = "1"  # a user's own choice is kept
    monkeypatch.setattr(os, "environ", env)  # this process's environment stays as it was
    runner._service_defaults()
    assert env["MLFLOW_DISABLE_TELEMETRY"] == "true"
    assert env["RAY_USAGE_STATS_ENABLED"] == "1"


def test_a_run_found_again_gets_the_params_it_lost(tmp_path):
    """The server went away between a child run's creation and its params: the writer's retry finds the
    run by its trial id and logs the params it lacks, instead of leaving them out."""
    from types import SimpleNamespace

    from comod.config import flatten
    from comod_platform.conventions import param_value

    uri, client, experiment, parent = _search_store(tmp_path, "p")
    search = load_search(REPO / "search_spaces" / "tiny.yaml")
    trial = SimpleNamespace(trial_id="t1", config={"modulation.kind": "deterministic",
                                                    "finetune.lr.controller": 0.01})
    created = client.create_run(experiment, tags={TAG_PARENT: parent, TAG_ROLE: "trial", TAG_TRIAL_ID: "t1",
                                                  TAG_STATE: "running"}).info.run_id

    callback = MlflowTrialCallback(search, "p", uri, experiment, parent)
    assert callback.runs.run_id(trial) == created
    params = {k: param_value(v) for k, v in client.get_run(created).data.params.items()}
    assert params == flatten(search.config_for(trial.config))
    assert params["finetune.lr.controller"] == 0.01


def test_the_runs_of_earlier_drivers_are_read_in_one_search(tmp_path):
    """A driver finds the trial runs an earlier driver of the search made (more than a page of them) in one
    search, on first use, then re-attaches each to its trial and creates the rest: no query per trial."""
    from types import SimpleNamespace

    from comod_platform.trial_runs import TrialRuns

    uri, client, experiment, parent = _search_store(tmp_path, "e")
    earlier = {f"t{i}": client.create_run(experiment, tags={TAG_PARENT: parent, TAG_ROLE: "trial",
                                                             TAG_TRIAL_ID: f"t{i}", TAG_STATE: "running"}).info.run_id
               for i in range(1, 4)}
    searches = []

    class Counting:  # the real client, with its search_runs calls counted
        def __getattr__(self, name):
            return getattr(client, name)

        def search_runs(self, *args, **kwargs):
            searches.append(kwargs.get("page_token"))
            return client.search_runs(*args, **{**kwargs, "max_results": 2})  # pages of 2: three runs, two pages

    runs = TrialRuns(load_search(REPO / "search_spaces" / "tiny.yaml"), "e", uri, experiment, parent)
    runs._client = Counting()
    config = {"modulation.kind": "deterministic", "finetune.lr.controller": 0.01}
    ids = {f"t{i}": runs.run_id(SimpleNamespace(trial_id=f"t{i}", config=config)) for i in range(6)}
    assert len(searches) == 2 and searches[0] is None  # the first page, then the second, once
    assert all(ids[t] == run_id for t, run_id in earlier.items())
    fresh = {ids["t0"], ids["t4"], ids["t5"]}  # new trials: new runs, under the parent
    assert len(fresh) == 3 and not fresh & set(earlier.values())
    for run_id in fresh:
        tags = client.get_run(run_id).data.tags
        assert tags[TAG_PARENT] == parent and tags[TAG_STATE] == "running"


class CountingBatches:
    """The real client, with each log_batch call's entity counts appended to ``batches``."""

    def __init__(self, client, batches: list):
        self._client, self._batches = client, batches

    def __getattr__(self, name):
        return getattr(self._client, name)

    def log_batch(self, run_id, **entities):
        self._batches.append({k: len(v or ()) for k, v in entities.items()})
        return self._client.log_batch(run_id, **entities)


def test_after_a_flush_no_mlflow_thread_holds_a_trial_or_sends_again(tmp_path):
    """Once the search's flush returns, no MLflow thread keeps a trial (one freed there while Ray shuts
    down would end the driver with status 1), and no send comes after it."""
    import weakref

    from comod_platform.conventions import EPOCH
    from comod_platform.trial_runs import TrialRuns

    uri, client, experiment, parent = _search_store(tmp_path, "h")
    runs = TrialRuns(load_search(REPO / "search_spaces" / "tiny.yaml"), "h", uri, experiment, parent)
    batches: list = []

    class Trial:
        def __init__(self, trial_id, config):
            self.trial_id, self.config = trial_id, config

    runs._client = CountingBatches(client, batches)
    trial = Trial("t1", {"modulation.kind": "deterministic", "finetune.lr.controller": 0.01})
    gone = weakref.ref(trial)
    runs.start(trial)
    runs.queue_metrics(trial, {"pretrain/train_loss": 1.0}, step=10, per_epoch=True)
    runs.end(trial, "completed", None, {EPOCH: 1})
    assert runs.flush(30)
    sent = len(batches)
    del trial
    assert gone() is None
    time.sleep(0.6)
    assert len(batches) == sent and runs.pending() == 0


def _busy(runs):
    """Keeps the runs' writer busy until the returned event is set (as a backlog would)."""
    import threading

    release = threading.Event()
    runs.writer.submit(release.wait, 30)
    return release


def test_what_piles_up_for_a_trial_while_the_writer_is_busy_goes_out_in_one_write(tmp_path):
    """A short trial's epochs, its node tags, its final metrics and its end tags, queued while the writer
    is busy: one log_batch, one database commit (each its own would be six), and every value arrives."""
    from types import SimpleNamespace

    from comod_platform.conventions import EPOCH, TAG_NODE
    from comod_platform.trial_runs import TrialRuns

    uri, client, experiment, parent = _search_store(tmp_path, "c")
    runs = TrialRuns(load_search(REPO / "search_spaces" / "tiny.yaml"), "c", uri, experiment, parent)
    batches: list = []
    runs._client = CountingBatches(client, batches)
    trial = SimpleNamespace(trial_id="t1", config={"modulation.kind": "deterministic", "finetune.lr.controller": 0.01})
    runs.start(trial)
    assert runs.flush(30)
    batches.clear()  # the run's creation and params
    release = _busy(runs)
    for epoch in (1, 2, 3):
        runs.queue_metrics(trial, {"pretrain/train_loss": 1.0 / epoch}, step=10 * epoch, per_epoch=True)
    runs.queue_tags(trial, {TAG_NODE: "n1"})
    runs.queue_metrics(trial, {"test/mean_f1": 0.5}, step=30)
    runs.end(trial, "completed", None, {EPOCH: 3})
    release.set()
    assert runs.flush(30)
    run = client.get_run(runs.run_id(trial))
    assert [m.value for m in client.get_metric_history(run.info.run_id, "pretrain/train_loss")] == [1.0, 0.5, 1 / 3]
    assert run.data.metrics["test/mean_f1"] == 0.5 and run.data.tags[TAG_NODE] == "n1"
    assert run.data.tags[TAG_STATE] == "completed" and run.info.status == "FINISHED"
    assert len(batches) == 1 and batches[0]["metrics"] == 4 and batches[0]["tags"] == 3, batches


def test_a_tag_written_at_once_is_not_set_back_by_the_batch_still_waiting(tmp_path):
    """A trial's first node tag waits for its batch; the trial moves to another node before that batch
    goes out, and the move is written at once: the waiting batch, sent after it, keeps the new node."""
    from types import SimpleNamespace

    from comod_platform.conventions import TAG_GPUS, TAG_NODE
    from comod_platform.trial_runs import TrialRuns

    uri, client, experiment, parent = _search_store(tmp_path, "m")
    runs = TrialRuns(load_search(REPO / "search_spaces" / "tiny.yaml"), "m", uri, experiment, parent)
    trial = SimpleNamespace(trial_id="t1", config={"modulation.kind": "deterministic", "finetune.lr.controller": 0.01})
    runs.start(trial)
    release = _busy(runs)
    runs.queue_metrics(trial, {"pretrain/train_loss": 1.0}, step=10, per_epoch=True)
    runs.queue_tags(trial, {TAG_NODE: "lost", TAG_GPUS: "1"})
    runs.queue_tags(trial, {TAG_NODE: "survivor", TAG_GPUS: "0"}, now=True)
    release.set()
    assert runs.flush(30)
    run = client.get_run(runs.run_id(trial))
    assert run.data.tags[TAG_NODE] == "survivor" and run.data.tags[TAG_GPUS] == "0"
    assert run.data.metrics["pretrain/train_loss"] == 1.0  # the waiting batch did go out


def test_a_run_whose_creation_failed_part_way_is_completed_not_made_twice(tmp_path):
    """The server goes away after taking a trial's create_run, before its params: the writer's retry finds
    that run and completes it (params, dataset), so the trial still has exactly one run."""
    from types import SimpleNamespace

    from comod_platform.trial_runs import TrialRuns

    uri, client, experiment, parent = _search_store(tmp_path, "p")
    runs = TrialRuns(load_search(REPO / "search_spaces" / "tiny.yaml"), "p", uri, experiment, parent)
    failed = []

    class AwayAfterCreate(CountingBatches):
        def log_batch(self, run_id, **entities):
            if entities.get("params") and not failed:
                failed.append(run_id)
                raise ConnectionError("the tracking server went away")
            return self._client.log_batch(run_id, **entities)

    runs._client = AwayAfterCreate(client, [])
    trial = SimpleNamespace(trial_id="t1", config={"modulation.kind": "deterministic", "finetune.lr.controller": 0.01})
    runs.start(trial)
    assert runs.flush(60)
    made = client.search_runs([experiment], f"tags.`{TAG_TRIAL_ID}` = 't1'", run_view_type=ViewType.ALL)
    assert failed and [r.info.run_id for r in made] == failed == [runs.run_id(trial)]
    assert made[0].data.params["modulation.kind"] == "deterministic" and made[0].inputs.dataset_inputs


def test_an_epoch_reported_again_before_its_first_report_went_out_is_logged_once(tmp_path):
    """A trial restarted from an older checkpoint reports an epoch again; when both reports wait in the
    same batch (the writer busy), the epoch's step is still logged once, with the first report's value."""
    from types import SimpleNamespace

    from comod_platform.trial_runs import TrialRuns

    uri, client, experiment, parent = _search_store(tmp_path, "r")
    runs = TrialRuns(load_search(REPO / "search_spaces" / "tiny.yaml"), "r", uri, experiment, parent)
    trial = SimpleNamespace(trial_id="t1", config={"modulation.kind": "deterministic", "finetune.lr.controller": 0.01})
    runs.start(trial)
    release = _busy(runs)
    for value in (0.5, 0.4):  # epoch 1, then epoch 1 again after the restart, then epoch 2
        runs.queue_metrics(trial, {"finetune/val/mean_f1": value}, step=8, per_epoch=True)
    runs.queue_metrics(trial, {"finetune/val/mean_f1": 0.6}, step=16, per_epoch=True)
    release.set()
    assert runs.flush(30)
    history = client.get_metric_history(runs.run_id(trial), "finetune/val/mean_f1")
    assert [(m.step, m.value) for m in history] == [(8, 0.5), (16, 0.6)]


def test_a_trials_artifacts_go_out_with_its_end(tmp_path):
    """A trial's end logs its config, final metrics and plots, and a kept checkpoint its checkpoint.pt, as
    artifacts of its run, in the artifact location of its experiment."""
    from contextlib import contextmanager
    from types import SimpleNamespace

    from comod_platform.conventions import EPOCH
    from comod_platform.trial_runs import TrialRuns

    uri, client, experiment, parent = _search_store(tmp_path, "a")
    runs = TrialRuns(load_search(REPO / "search_spaces" / "tiny.yaml"), "a", uri, experiment, parent)
    folder = tmp_path / "checkpoint"
    (folder / "plots").mkdir(parents=True)
    for name, text in (("config.yaml", "seed: 1\n"), ("metrics.json", "{}"), ("checkpoint.pt", "x"),
                       ("plots/gains.png", "png")):
        (folder / name).write_text(text)

    @contextmanager
    def as_directory():
        yield str(folder)

    checkpoint = SimpleNamespace(as_directory=as_directory)
    trial = SimpleNamespace(trial_id="t1", config={"modulation.kind": "deterministic", "finetune.lr.controller": 0.01})
    runs.start(trial)
    runs.end(trial, "completed", None, {EPOCH: 4}, checkpoint)
    runs.log_checkpoint(trial, checkpoint)
    assert runs.flush(30)
    run_id = runs.run_id(trial)
    listed = {a.path for a in client.list_artifacts(run_id)} | {a.path for a in client.list_artifacts(run_id, "plots")}
    assert listed == {"config.yaml", "metrics.json", "checkpoint.pt", "plots", "plots/gains.png"}
    assert (tmp_path / "art").as_uri() in client.get_run(run_id).info.artifact_uri
    assert client.get_run(run_id).info.status == "FINISHED"


def test_a_final_report_without_a_number_for_the_metric_is_no_best():
    """The best trial for the parent run is chosen among finals whose metric is a number: None or text is
    passed over (as NaN), never raised on."""
    from types import SimpleNamespace

    from comod_platform.conventions import FINAL_FLAG

    callback = MlflowTrialCallback.__new__(MlflowTrialCallback)
    callback.metric, callback.mode = "val/mean_f1", "min"
    assert callback._signed({"val/mean_f1": 0.25}) == -0.25
    for value in (None, "n/a", float("nan")):
        assert callback._signed({"val/mean_f1": value}) != callback._signed({"val/mean_f1": value})  # NaN
    trial = SimpleNamespace(trial_id="t", last_result={FINAL_FLAG: 1, "val/mean_f1": None})
    callback._consider_best([trial])  # nothing to record: returns before any write
