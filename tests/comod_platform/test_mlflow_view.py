"""What a researcher sees in MLflow's UI: experiments tagged as model training
(so the UI opens on the runs table), a saved view of that table with the key
metrics, every run's dataset as an MLflow dataset input, the best trial's
metrics on a search's parent run, and `comod ui NAME`'s URL. On a real SQLite
store, without Ray or a server (the browser test, test_ui_browser.py, opens
the page itself)."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from mlflow.tracking import MlflowClient

from comod.config import load_config
from comod_platform import cli, runner, tracking
from comod_platform import interrupts
from comod_platform.conventions import (EPOCH, FINAL_FLAG, PROTOCOL_KEYS, STEP, TAG_BEST_RUN, TAG_BEST_TRIAL,
                                        TAG_EPOCHS, TAG_REPORTS, TAG_ROLE, TAG_STATE, TAG_TRIAL_ID, recorded_state)
from comod_platform.results import load_results
from comod_platform.search_state import SearchMeta, SearchPaths
from comod_platform.searchfile import load_search
from comod_platform.tune_callbacks import MlflowTrialCallback
from searches import REPO

TINY_SEARCH = REPO / "search_spaces" / "tiny.yaml"


@pytest.fixture(scope="module")
def tiny_data():
    """The tiny search's base dataset, loaded and packed as the search driver holds it."""
    from comod.data import load_data
    from comod_platform.trainable import pack

    search = load_search(TINY_SEARCH)
    return search, pack(load_data(search.base_config()))


def store(home) -> MlflowClient:
    return MlflowClient(f"sqlite:///{home / 'mlflow.db'}")


def test_a_new_runs_folder_s_store_is_made_by_mlflow_without_its_info_lines(tmp_path):
    """`make quickstart` on a fresh machine: MLflow makes the runs folder's store (its migrations log each
    step at INFO); none of that reaches the terminal (a fresh interpreter, as the command is one: MLflow
    sets its logger's level at its import)."""
    import subprocess
    import sys

    env = {"COMOD_HOME": str(tmp_path / "runs"), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", "from comod_platform.tracking import open_store; open_store()"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "INFO" not in done.stderr + done.stdout and "Creating initial" not in done.stderr, done.stderr[-2000:]
    client = store(tmp_path / "runs")
    run = client.create_run(client.create_experiment("x", artifact_location=(tmp_path / "art").as_uri()))
    client.log_metric(run.info.run_id, "m", 0.5, step=1)
    assert client.get_run(run.info.run_id).data.metrics == {"m": 0.5}


def view_of(experiment) -> dict:
    envelope = json.loads(experiment.tags[tracking.VIEW_TAG])
    assert envelope["name"] == tracking.VIEW_NAME and isinstance(envelope["createdAt"], int)
    return json.loads(envelope["state"])


# ------------------------------------------------------------------ experiments

def test_experiments_are_tagged_as_model_training_with_the_comod_view(home):
    experiment_id = tracking.setup("comod-train")
    experiment = store(home).get_experiment(experiment_id)
    assert experiment.tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    view = view_of(experiment)
    assert view["selectedColumns"] == ["attributes.`Dataset`", "params.`modulation.kind`", "tags.`comod.state`",
                                       "metrics.`val/mean_f1`", "metrics.`test/mean_f1`",
                                       "metrics.`test/mean_recall`", "metrics.`test/mean_precision`"]
    assert "orderByKey" not in view  # single runs: newest first, as MLflow lists them

    searched = store(home).get_experiment(tracking.setup("search/s", metric="val/mean_error", mode="min"))
    view = view_of(searched)
    assert view["orderByKey"] == "metrics.`val/mean_error`" and view["orderByAsc"] is True
    assert view["selectedColumns"][3] == "metrics.`val/mean_error`"


def test_an_experiment_made_before_gets_the_tags_once(home):
    client = store(home)
    old = client.create_experiment("comod-train", artifact_location=(home / "artifacts").as_uri())
    assert tracking.EXPERIMENT_KIND_TAG not in client.get_experiment(old).tags
    assert tracking.setup("comod-train") == old
    tags = client.get_experiment(old).tags
    assert tags[tracking.EXPERIMENT_KIND_TAG] == tracking.EXPERIMENT_KIND
    # found again with both: nothing is rewritten
    assert tracking.setup("comod-train") == old
    assert client.get_experiment(old).tags[tracking.VIEW_TAG] == tags[tracking.VIEW_TAG]


def test_the_runs_page_url():
    assert (tracking.runs_url("http://127.0.0.1:5000/", "7")
            == "http://127.0.0.1:5000/#/experiments/7/runs?viewStateShareKey=comod&workflowType=machine_learning")
    assert (tracking.runs_url("http://h:1", "7", view=False)
            == "http://h:1/#/experiments/7/runs?workflowType=machine_learning")


# ------------------------------------------------------------------ datasets

def test_a_dataset_description_is_stable_and_says_what_the_run_saw(tiny_data):
    search, packed = tiny_data
    cfg = search.base_config()
    dataset = tracking.describe_dataset(cfg, packed)
    assert dataset.name == "synthetic/attributes"
    assert tracking.describe_dataset(cfg, packed).digest == dataset.digest
    profile = dataset.profile
    assert profile["tasks"] == [t.name for t in packed["tasks"]]
    assert (profile["train_size"], profile["test_size"]) == (128, 64)
    assert profile["val_size"] == len(packed["splits"]["val"]["labels"])
    assert [c.name for c in dataset.schema.inputs] == ["image", *profile["tasks"]]
    entry = tracking.dataset_input(dataset)
    assert entry.dataset.source_type == "code" and "comod.data.synthetic" in entry.dataset.source
    assert json.loads(entry.dataset.profile) == profile
    # another split seed is another dataset; where it lies (root) or which device holds it is not
    other = load_config(REPO / "configs" / "tiny.yaml", ["data.split_seed=1"])
    assert tracking.describe_dataset(other).digest != tracking.describe_dataset(cfg).digest
    moved = load_config(REPO / "configs" / "tiny.yaml", ["data.on_device='yes'"])
    assert tracking.describe_dataset(moved).digest == tracking.describe_dataset(
        load_config(REPO / "configs" / "tiny.yaml")).digest


def test_a_data_folder_is_the_dataset_source(tmp_path):
    cfg = load_config(REPO / "configs" / "tiny.yaml", ["data.dataset=fashion_mnist", f"data.root={tmp_path}"])
    entry = tracking.dataset_input(tracking.describe_dataset(cfg))
    assert entry.dataset.name == "fashion_mnist/attributes"
    assert entry.dataset.source_type == "local" and json.loads(entry.dataset.source)["uri"] == str(tmp_path)


def _search(home, tiny_data, name="v"):
    search, packed = tiny_data
    uri, experiment_id, parent = runner._start_tracking(search, name, packed)
    callback = MlflowTrialCallback(search, name, uri, experiment_id, parent)
    return search, packed, uri, experiment_id, parent, callback


def _trial(trial_id, **config):
    return SimpleNamespace(trial_id=trial_id, config={"modulation.kind": "deterministic",
                                                      "finetune.lr.controller": 0.01, **config},
                           last_result=None, status="RUNNING", checkpoint=None)


def test_every_run_of_a_search_records_its_dataset(home, tiny_data):
    search, packed, uri, experiment_id, parent, callback = _search(home, tiny_data)
    client = store(home)
    (parent_input,) = client.get_run(parent).inputs.dataset_inputs
    expected = tracking.describe_dataset(search.base_config(), packed)
    assert (parent_input.dataset.name, parent_input.dataset.digest) == ("synthetic/attributes", expected.digest)
    assert parent_input.tags[0].key == "mlflow.data.context"

    same = client.get_run(callback.runs.run_id(_trial("same")))
    (entry,) = same.inputs.dataset_inputs
    assert (entry.dataset.name, entry.dataset.digest) == (expected.name, expected.digest)
    assert json.loads(entry.dataset.profile)["train_size"] == 128
    assert same.data.params["modulation.kind"] == "deterministic"  # the kind, also as a param

    # data settings of its own: described from its config, not as the base's dataset
    smaller = client.get_run(callback.runs.run_id(_trial("smaller", **{"data.train_limit": 64})))
    (entry,) = smaller.inputs.dataset_inputs
    assert entry.dataset.name == "synthetic/attributes" and entry.dataset.digest != expected.digest
    assert json.loads(entry.dataset.profile)["train_limit"] == 64
    assert entry.dataset.source == parent_input.dataset.source  # the same generator

    # the experiment's runs filter by dataset (the UI's Dataset filter, and search_runs)
    found = client.search_runs([experiment_id], filter_string=f"dataset.digest = '{expected.digest}'")
    assert {r.info.run_id for r in found} == {parent, same.info.run_id}


def test_a_run_found_again_without_a_dataset_gets_it(home, tiny_data):
    search, packed, uri, experiment_id, parent, callback = _search(home, tiny_data)
    client = store(home)
    created = client.create_run(experiment_id, tags={TAG_ROLE: "trial", TAG_TRIAL_ID: "t1"}).info.run_id
    assert callback.runs.run_id(_trial("t1")) == created
    assert client.get_run(created).inputs.dataset_inputs[0].dataset.digest == (
        client.get_run(parent).inputs.dataset_inputs[0].dataset.digest)


def _final(trial, value, **more):
    result = {FINAL_FLAG: 1, STEP: 12, "val/mean_f1": value, "test/mean_f1": value - 0.1,
              "test/mean_recall": value - 0.2, "test/mean_precision": value - 0.3, "pretrained/test/mean_f1": 0.0,
              **more}
    trial.last_result = result
    return result


def test_the_parent_run_carries_the_best_trials_metrics(home, tiny_data):
    _, _, _, _, parent, callback = _search(home, tiny_data)
    client = store(home)
    a, b, c = _trial("a"), _trial("b", **{"modulation.kind": "stochastic"}), _trial("c")
    trials = [a, b, c]
    for trial in trials:
        callback.on_trial_start(0, trials, trial)
    callback.on_trial_result(0, trials, a, _final(a, 0.6))
    callback.on_trial_result(0, trials, b, _final(b, 0.8))
    callback.on_trial_result(0, trials, c, _final(c, 0.7))  # not better: the parent keeps b's
    callback.runs.flush()
    run = client.get_run(parent)
    assert run.data.tags[TAG_BEST_TRIAL] == "b"
    assert run.data.tags[TAG_BEST_RUN] == callback.runs.run_id(b)
    assert run.data.metrics == pytest.approx({"val/mean_f1": 0.8, "test/mean_f1": 0.7, "test/mean_recall": 0.6,
                                              "test/mean_precision": 0.5})
    # the parent's history: the best after each completion that changed it
    assert [(m.step, m.value) for m in client.get_metric_history(parent, "val/mean_f1")] == [(1, 0.6), (2, 0.8)]
    # every child holds its own final metrics, the key ones among them
    for trial, value in ((a, 0.6), (b, 0.8), (c, 0.7)):
        metrics = client.get_run(callback.runs.run_id(trial)).data.metrics
        assert {k: metrics[k] for k in tracking.KEY_METRICS} == pytest.approx(
            {"val/mean_f1": value, "test/mean_f1": value - 0.1, "test/mean_recall": value - 0.2,
             "test/mean_precision": value - 0.3})

    # a restored driver that hears of no new result still gives the parent the best, once
    again = MlflowTrialCallback(callback.runs.search, "v", callback.runs.tracking_uri, callback.runs.experiment_id,
                                parent)
    again.on_experiment_end(trials)
    assert len(client.get_metric_history(parent, "val/mean_f1")) == 2


def _epoch(trial, epoch: int, value: float) -> dict:
    result = {EPOCH: epoch, STEP: 6 * epoch, "training_iteration": epoch, "val/mean_f1": value,
              "pretrain/val/mean_f1": value, "pretrain/train_loss": 1.0 / epoch}
    trial.last_result = result
    return result


def test_trial_runs_read_at_a_glance_pruned_ends_finished_and_bookkeeping_is_no_metric(home, tiny_data,
                                                                                        monkeypatch):
    """Rows that differ in their first characters (kind, trial id); a trial ASHA stopped early ends FINISHED,
    tagged pruned (no red cross, as for a failure), one a stopped search left unfinished KILLED, tagged
    interrupted; the epoch, the step and the final flag are tags and steps, not charts."""
    _, _, _, experiment_id, parent, callback = _search(home, tiny_data, name="a-long-search-name-20261205-1843")
    client = store(home)
    done, pruned, cut = (_trial("924cd492", **{"modulation.kind": "stochastic"}), _trial("0b1c2d3e"),
                         _trial("5f6a7b8c", **{"modulation.kind": "none"}))
    trials = [done, pruned, cut]
    for trial in trials:
        callback.on_trial_start(0, trials, trial)
        callback.on_trial_result(0, trials, trial, _epoch(trial, 1, 0.5))
    callback.on_trial_result(0, trials, done, _epoch(done, 2, 0.6))
    callback.on_trial_result(0, trials, done, _final(done, 0.7, **{EPOCH: 2, "training_iteration": 3}))
    for trial in (done, pruned):  # ASHA stops `pruned` after its first epoch: TERMINATED with no final report
        trial.status = "TERMINATED"
        callback.on_trial_complete(0, trials, trial)
    monkeypatch.setattr(interrupts, "_requested", [15])  # the search is stopped while `cut` runs
    callback.on_experiment_end(trials)

    runs = {r.data.tags[TAG_TRIAL_ID]: r
            for r in client.search_runs([experiment_id], f"tags.`{TAG_ROLE}` = 'trial'")}
    assert {t: r.info.run_name for t, r in runs.items()} == {
        "924cd492": "stochastic-924cd492", "0b1c2d3e": "deterministic-0b1c2d3e", "5f6a7b8c": "none-5f6a7b8c"}
    assert {t: (r.info.status, r.data.tags[TAG_STATE]) for t, r in runs.items()} == {
        "924cd492": ("FINISHED", "completed"), "0b1c2d3e": ("FINISHED", "pruned"),
        "5f6a7b8c": ("KILLED", "interrupted")}
    for run in runs.values():
        assert not PROTOCOL_KEYS & set(run.data.metrics), sorted(run.data.metrics)  # no comod/epoch, step, final
    assert (runs["924cd492"].data.tags[TAG_EPOCHS], runs["924cd492"].data.tags[TAG_REPORTS]) == ("2", "3")
    assert runs["0b1c2d3e"].data.tags[TAG_EPOCHS] == "1"
    # the steps are the metrics' own
    history = client.get_metric_history(runs["924cd492"].info.run_id, "pretrain/train_loss")
    assert [(m.step, m.value) for m in history] == [(6, 1.0), (12, 0.5)]
    # read back: states and epochs from the tags, a completed trial known by its test metrics alone
    name = "a-long-search-name-20261205-1843"
    paths = SearchPaths(name)
    paths.write_meta(SearchMeta(name=name, study_name=name, optuna_storage="sqlite://", experiment_id=experiment_id,
                                tracking_uri=f"sqlite:///{home / 'mlflow.db'}", parent_run_id=parent,
                                ray_storage=str(home / "ray"), created=0.0))
    paths.search_file.write_text(TINY_SEARCH.read_text())
    records = {t.trial_id: t for t in load_results(name).trials}
    assert {t: (r.state, r.epochs, r.reports) for t, r in records.items()} == {
        "924cd492": ("completed", 2, 3), "0b1c2d3e": ("pruned", 1, 1), "5f6a7b8c": ("interrupted", 1, 1)}
    assert recorded_state({}, {"test/mean_f1": 0.5}) == "completed"  # its end tags lost, its final report there
    assert recorded_state({}, {"pretrain/val/mean_f1": 0.5}) == "running"


# ------------------------------------------------------------------ comod ui NAME

def _recorded_search(home, tiny_data, name="shown"):
    search, packed = tiny_data
    uri, experiment_id, parent = runner._start_tracking(search, name, packed)
    SearchPaths(name).write_meta(SearchMeta(name=name, study_name=name, optuna_storage="sqlite://",
                                            tracking_uri=uri, experiment_id=experiment_id, parent_run_id=parent,
                                            ray_storage=str(home / "ray"), created=0.0))
    return uri, experiment_id


class FakeServer:
    """Stands in for the `mlflow server` process (started for real in test_ui_browser.py)."""

    started: list = []

    pid = 2 ** 22 + 1  # above Linux's largest pid: a process group that does not exist

    def __init__(self, command, env=None, **kwargs):
        self.command, self.env, self.returncode, self.kwargs = command, env, None, kwargs
        FakeServer.started.append(self)

    def poll(self):
        return self.returncode

    def wait(self, timeout=None):
        self.returncode = 0
        return 0

    def terminate(self):
        self.returncode = -15

    kill = terminate


def test_ui_name_prints_and_opens_the_searchs_runs_page_with_telemetry_off(home, tiny_data, monkeypatch, capsys):
    uri, experiment_id = _recorded_search(home, tiny_data)
    client = store(home)
    client.delete_experiment_tag(experiment_id, tracking.EXPERIMENT_KIND_TAG)  # a search from before the tag
    client.delete_experiment_tag(experiment_id, tracking.VIEW_TAG)
    opened = []
    monkeypatch.setattr("webbrowser.open", lambda url: opened.append(url) or True)
    monkeypatch.setattr(cli.subprocess, "Popen", FakeServer)
    monkeypatch.setattr(cli, "_wait_until_serving", lambda url, proc, timeout=300.0: True)
    FakeServer.started.clear()
    assert cli.main(["ui", "shown", "--port", "5123", "--open"]) == 0
    out = capsys.readouterr().out
    url = (f"http://127.0.0.1:5123/#/experiments/{experiment_id}/runs"
           f"?viewStateShareKey=comod&workflowType=machine_learning")
    assert f"shown: {url}" in out and opened == [url]
    (server,) = FakeServer.started
    assert server.command[1:4] == ["-m", "mlflow", "server"] and uri in server.command
    assert server.env["MLFLOW_DISABLE_TELEMETRY"] == "true" and server.env["DO_NOT_TRACK"] == "true"
    assert server.kwargs.get("start_new_session") is True  # its workers are one group, stopped together
    experiment = client.get_experiment(experiment_id)
    assert experiment.tags[tracking.EXPERIMENT_KIND_TAG] == tracking.EXPERIMENT_KIND
    assert view_of(experiment)["orderByKey"] == "metrics.`val/mean_f1`"  # the search's metric, from its parent


def test_ui_names_an_experiment_too_and_refuses_an_unknown_name(home, monkeypatch, capsys):
    experiment_id = store(home).create_experiment("comod-train")
    monkeypatch.setattr(cli.subprocess, "Popen", FakeServer)
    monkeypatch.setattr(cli, "_wait_until_serving", lambda url, proc, timeout=300.0: True)
    assert cli.main(["ui", "comod-train"]) == 0
    assert f"comod-train: http://127.0.0.1:5000/#/experiments/{experiment_id}/runs" in capsys.readouterr().out
    assert cli.main(["ui", "nobody"]) == 1
    err = capsys.readouterr().err
    assert "no search or MLflow experiment named 'nobody'" in err and "Traceback" not in err


def test_ui_name_with_a_tracking_server_prints_its_page(home, tiny_data, monkeypatch, capsys):
    _, experiment_id = _recorded_search(home, tiny_data)
    meta_file = SearchPaths("shown").meta_file
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({**meta, "tracking_uri": "http://127.0.0.1:1"}))
    code = cli.main(["ui", "shown"])  # a server that does not answer: one clear message
    assert code == 1 and "unreachable" in capsys.readouterr().err
