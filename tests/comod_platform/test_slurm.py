"""cluster/slurm/comod-search.sbatch on a real single-node Slurm (slurm_cluster.py: Debian's slurm-wlm and
munge started here on 127.0.0.1): a search submitted with sbatch runs on the Ray the script starts under
srun, a cut (``scancel --batch --signal=TERM``, what the time limit's warning sends) stops it cleanly, and
the same sbatch again resumes it to its end with no duplicate run; Ray is stopped with each job. Skipped,
with the reason, where Slurm cannot start (not installed: ``make slurm``; not root)."""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from filelock import FileLock
from mlflow.tracking import MlflowClient

from comod_platform.conventions import TAG_STATE, TAG_TRIAL_ID
from searches import TINY, search_env, search_runs, search_study
from servers import kill_processes_mentioning, processes_mentioning
from slurm_cluster import SingleNodeSlurm, SlurmUnavailable

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "cluster" / "slurm" / "comod-search.sbatch"


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    cluster = SingleNodeSlurm(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except SlurmUnavailable as err:
        pytest.skip(f"no single-node Slurm here: {err}")
    yield cluster
    cluster.stop()


def _search(tmp_path: Path) -> Path:
    """Two trials of a few dozen seconds each (both at once), so that the cut lands while they run."""
    raw = json.loads(json.dumps(TINY))
    raw["experiment"]["pretrain"] = {"epochs": 8, "steps_per_epoch": 40, "batch_size": 16}
    raw["search"].update(num_trials=2, scheduler={"type": "fifo"})
    path = tmp_path / "slurm-search.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _wait_for(predicate, timeout: float, what: str, log: Path):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(1)
    raise AssertionError(f"{what} within {timeout:.0f} s:\n" + (log.read_text()[-3000:] if log.exists() else ""))


def _trial_reported(home: Path, name: str) -> bool:
    db = home / "mlflow.db"
    if not home.is_dir():
        return False
    with FileLock(str(home / "mlflow.db.lock")):  # the search makes its new store under this lock
        if not db.exists():
            return False
        client = MlflowClient(f"sqlite:///{db}")
    if client.get_experiment_by_name(f"search/{name}") is None:
        return False
    return any(c.data.metrics for c in search_runs(client, name)[1])


def test_sbatch_runs_a_search_a_cut_stops_it_cleanly_and_sbatch_again_resumes_it(slurm, tmp_path, ray_tmp):
    name, home = "slurmed", tmp_path / "runs"
    env = search_env(home, ray_tmp, COMOD_SEARCH=str(_search(tmp_path)), COMOD_SEARCH_NAME=name,
                     COMOD_RAY_TMPDIR=f"{ray_tmp}/r", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    first_log, second_log = tmp_path / "job1.out", tmp_path / "job2.out"
    args = ("--cpus-per-task=2", f"--chdir={tmp_path}")
    try:
        job = slurm.sbatch(SCRIPT, *args, f"--output={first_log}", env=env)
        _wait_for(lambda: _trial_reported(home, name), 300, "no trial reported", first_log)
        cut = slurm.run("scancel", "--batch", "--signal=TERM", job)
        assert cut.returncode == 0, cut.stderr
        slurm.wait_gone(job, 300)
        out = first_log.read_text()
        assert "SIGTERM: stopping the search" in out and f"interrupted: continue with comod search resume {name}" in out
        assert "Traceback" not in out and "Failed to connect to GCS" not in out, out[-3000:]
        assert not processes_mentioning(ray_tmp), "Ray outlived its job"
        client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
        (parent,), children = search_runs(client, name)
        assert parent.info.status == "KILLED" and not [c for c in children if c.info.status == "RUNNING"]
        assert [c.data.tags[TAG_STATE] for c in children].count("interrupted") >= 1
        assert not [t for t in search_study(home, name).trials if t.state == optuna.trial.TrialState.RUNNING]

        # the same sbatch again: resumed to its end
        job = slurm.sbatch(SCRIPT, *args, f"--output={second_log}", env=env)
        slurm.wait_gone(job, 600)
        out = second_log.read_text()
        assert f"search {name}: 2 trials: 2 completed" in out, out[-3000:]
        assert not processes_mentioning(ray_tmp), "Ray outlived its job"
        (parent,), children = search_runs(client, name)
        assert parent.info.status == "FINISHED"
        ids = [c.data.tags[TAG_TRIAL_ID] for c in children]
        assert len(ids) == len(set(ids)) == 2  # no duplicate run
        assert all((c.info.status, c.data.tags[TAG_STATE]) == ("FINISHED", "completed") for c in children)
        study = search_study(home, name)
        assert len([t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]) == 2
    finally:
        slurm.run("scancel", "--full", "-u", "root")
        kill_processes_mentioning(ray_tmp)
