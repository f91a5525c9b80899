"""A trial's end, whatever the scheduler or the clock says (real local Ray, Optuna, MLflow): a trial past
``search.trial_timeout_s`` is failed with that reason and not retried; a trial that trains to its last
epoch records its test metrics even when an ASHA rung falls on that epoch."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import optuna
import yaml
from mlflow.tracking import MlflowClient

from comod_platform.conventions import PROTOCOL_KEYS, TAG_ERROR, TAG_ROLE, TAG_STATE, TAG_STOPPED_EPOCH, report_metrics
from comod_platform.trial_runs import RAY_KEYS

REPO = Path(__file__).resolve().parents[2]
TINY = yaml.safe_load((REPO / "search_spaces" / "tiny.yaml").read_text())


def _run(tmp_path: Path, ray_tmp: str, name: str, experiment: dict, search: dict):
    import subprocess

    raw = json.loads(json.dumps(TINY))
    raw["experiment"].update(experiment)
    raw["search"].update(search)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    home = tmp_path / "runs"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_") and k != "RAY_ADDRESS"}
    env.update(COMOD_HOME=str(home), COMOD_DOWNLOAD="0", RAY_TMPDIR=ray_tmp, PYTHONUNBUFFERED="1")
    done = subprocess.run([sys.executable, "-m", "comod_platform.cli", "search", "run", str(path), "--name", name,
                           "--json"], env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    experiment_id = client.get_experiment_by_name(f"search/{name}").experiment_id
    children = [r for r in client.search_runs([experiment_id]) if r.data.tags.get(TAG_ROLE) == "trial"]
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{home / 'searches' / name / 'optuna.db'}")
    return done, children, study


def test_a_trial_past_its_time_limit_fails_with_the_reason_and_is_not_retried(tmp_path, ray_tmp):
    done, children, study = _run(tmp_path, ray_tmp, "timed", {"pretrain": {"epochs": 200, "steps_per_epoch": 60,
                                                                           "batch_size": 16}},
                                 {"num_trials": 2, "scheduler": {"type": "fifo"}, "trial_timeout_s": 10,
                                  "max_retries": 2})
    assert done.returncode == 1, done.stderr[-3000:]  # no trial completed
    summary = json.loads(done.stdout[done.stdout.index("{"):])
    assert summary["failed"] == 2 and all("over search.trial_timeout_s (10)" in f["error"]
                                          for f in summary["failures"])
    assert len(children) == 2
    for child in children:
        assert child.info.status == "FAILED" and child.data.tags[TAG_STATE] == "failed"
        assert child.data.tags[TAG_ERROR].startswith("timed out: the trial ran")
        assert "comod.retries" not in child.data.tags  # a recorded end: not restarted
    assert all(t.state == optuna.trial.TrialState.FAIL for t in study.trials)
    assert all("timed out" in t.user_attrs.get("comod.reason", "") for t in study.trials)


def test_a_rung_on_the_last_epoch_never_costs_a_trained_trial_its_test_metrics(tmp_path, ray_tmp):
    """4 + 2 epochs, grace 3, reduction factor 2: ASHA's rungs are at epochs 3 and 6, the last (the kind
    without couplings has no fine-tuning: its last epoch is 4). The last epoch's report is the final one,
    so ASHA never decides between a trial's training and its test metrics."""
    done, children, study = _run(tmp_path, ray_tmp, "lastrung", {
        "pretrain": {"epochs": 4, "steps_per_epoch": 3, "batch_size": 16},
        "finetune": {"epochs": 2, "steps_per_epoch": 3, "batch_size": 16}},
        {"num_trials": 8, "max_concurrent": 2, "scheduler": {"type": "asha", "grace_period": 3,
                                                             "reduction_factor": 2}})
    assert done.returncode == 0, done.stderr[-3000:]
    natural = {child.data.tags["comod.ray_trial_id"]: 4 if child.data.tags["comod.modulation_kind"] == "none"
               else 6 for child in children}
    assert 6 in natural.values()
    # what Ray Tune's scheduler saw, report by report: no report of a last epoch without the final metrics
    results = list((tmp_path / "runs" / "searches" / "lastrung" / "ray" / "lastrung").glob("run_trial_*/result.json"))
    assert len(results) == len(children)
    for path in results:
        trial_id = path.parent.name.split("_")[2]
        seen = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        # Ray Tune sees the search's metric and the protocol's keys as numbers, the other metrics as one text
        for r in seen:
            numbers = {k for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            assert numbers <= PROTOCOL_KEYS | {"val/mean_f1"} | RAY_KEYS, sorted(numbers - PROTOCOL_KEYS - RAY_KEYS)
        reports = [report_metrics(r) for r in seen]
        at_end = [r for r in reports if r.get("comod/epoch") == natural[trial_id]]
        assert all(r.get("comod/final") == 1 and "test/mean_f1" in r for r in at_end), (trial_id, at_end)
    for child in children:
        state, epoch = child.data.tags[TAG_STATE], int(child.data.tags[TAG_STOPPED_EPOCH])
        if epoch == natural[child.data.tags["comod.ray_trial_id"]]:  # trained to the end: completed, with test
            assert state == "completed" and "test/mean_f1" in child.data.metrics, (state, epoch)
        else:
            assert state == "pruned" and epoch == 3, (state, epoch)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == len([c for c in children if c.data.tags[TAG_STATE] == "completed"])
