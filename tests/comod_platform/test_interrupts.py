"""What a user does to a running search, with the real components (a local Ray, Optuna on SQLite, the
embedded MLflow store): Ctrl-C and SIGTERM, a second driver of the same search, a second Ctrl-C, an
edited search file or another Ray on resume, names already taken in a shared store, and a request no
node can satisfy."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import yaml
from mlflow.tracking import MlflowClient

from comod_platform.conventions import TAG_ROLE, TAG_STATE, TAG_TRIAL_ID
from comod_platform.searcher import CONTINUES_ATTR, INTERRUPTED_ATTR
from searches import run_comod, search_env
from servers import kill_processes_mentioning, processes_mentioning

REPO = Path(__file__).resolve().parents[2]
TINY = yaml.safe_load((REPO / "search_spaces" / "tiny.yaml").read_text())
NATIVE_DUMP = ("*** SIG", "PC: @", "*** Aborted", "Stack trace")


def _slow_search(tmp_path: Path, name: str, trials: int = 2, **search) -> Path:
    """Two trials that take a minute or two each (both at once), so that a signal lands while they run."""
    raw = json.loads(json.dumps(TINY))
    raw["experiment"]["pretrain"] = {"epochs": 40, "steps_per_epoch": 60, "batch_size": 16}
    raw["search"].update(num_trials=trials, scheduler={"type": "fifo"}, **search)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _start(path: Path, name: str, env: dict, log: Path) -> subprocess.Popen:
    """The driver in a session of its own, as a terminal's foreground job is (Ctrl-C reaches its group)."""
    return subprocess.Popen([sys.executable, "-m", "comod_platform.cli", "search", "run", str(path), "--name", name],
                            env=env, cwd=REPO, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _wait_until_trials_run(proc: subprocess.Popen, log: Path, home: Path, name: str, timeout: float = 300):
    """Until a trial has reported an epoch (its MLflow run holds a metric)."""
    deadline = time.time() + timeout
    db = home / "mlflow.db"
    while time.time() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        if db.exists() and "2 running" in log.read_text():
            client = MlflowClient(f"sqlite:///{db}")
            experiment = client.get_experiment_by_name(f"search/{name}")
            if experiment and any(r.data.metrics for r in client.search_runs([experiment.experiment_id])
                                  if r.data.tags.get(TAG_ROLE) == "trial"):
                return
        time.sleep(0.5)
    raise AssertionError("no trial reported in time:\n" + log.read_text()[-3000:])


def _finish(proc: subprocess.Popen, log: Path, timeout: float = 300) -> tuple[int, str]:
    try:
        code = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError("the driver did not stop:\n" + log.read_text()[-3000:])
    return code, log.read_text()


@contextlib.contextmanager
def _cleaned_up(proc: subprocess.Popen, ray_tmp: str):
    """Whatever the test asserts: the driver's whole session, and every Ray process it started, end."""
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        kill_processes_mentioning(ray_tmp)


def _records(home: Path, name: str):
    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(f"search/{name}")
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get(TAG_ROLE) == "search"]
    children = [r for r in runs if r.data.tags.get(TAG_ROLE) == "trial"]
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{home / 'searches' / name / 'optuna.db'}")
    return parent, children, study


def _assert_stopped_cleanly(home: Path, name: str):
    parent, children, study = _records(home, name)
    assert parent.info.status == "KILLED"
    assert not [c for c in children if c.info.status == "RUNNING"], [(c.data.tags, c.info.status) for c in children]
    interrupted = [c for c in children if c.data.tags.get(TAG_STATE) == "interrupted"]
    assert interrupted and all(c.info.status == "KILLED" for c in interrupted)
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
    closed = [t for t in study.trials if t.user_attrs.get(INTERRUPTED_ATTR) == "1"]
    assert closed and all(t.state == optuna.trial.TrialState.FAIL for t in closed)
    return interrupted


def test_ctrl_c_stops_cleanly_a_second_driver_is_refused_and_resume_checks_what_changed(tmp_path, ray_tmp):
    name, home = "stopped", tmp_path / "runs"
    env = search_env(home, ray_tmp)
    path = _slow_search(tmp_path, name)
    log = tmp_path / "driver.log"
    driver = _start(path, name, env, log)
    with _cleaned_up(driver, ray_tmp):
        _wait_until_trials_run(driver, log, home, name)
        # a second driver of the same search, while the first runs: refused, naming it
        seconds = [subprocess.Popen([sys.executable, "-m", "comod_platform.cli", *args], env=env, cwd=REPO,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                   for args in (["search", "resume", name], ["search", "run", str(path), "--name", name])]
        for second in seconds:
            _, err = second.communicate(timeout=300)
            assert second.returncode == 1, err[-2000:]
            assert f"is being driven by pid {driver.pid}" in err and "Traceback" not in err
        assert driver.poll() is None, "the search ended before the second drivers were refused"
        os.killpg(driver.pid, signal.SIGINT)  # Ctrl-C in the terminal: the whole foreground group
        code, out = _finish(driver, log)
    assert code == 130, out[-3000:]
    assert f"interrupted: continue with comod search resume {name}" in out
    assert "interrupted" in out.split(f"search {name}:", 1)[1].splitlines()[0]  # counted as such, not pruned
    assert not any(sign in out for sign in NATIVE_DUMP) and "Traceback" not in out, out[-3000:]
    interrupted = _assert_stopped_cleanly(home, name)

    # resume refuses an edited search file, naming the setting; and another Ray, naming the versions
    folder = home / "searches" / name
    original = (folder / "search.yaml").read_text()
    edited = yaml.safe_load(original)
    edited["search"]["num_trials"] = 5
    (folder / "search.yaml").write_text(yaml.safe_dump(edited, sort_keys=False))
    refused = run_comod(["search", "resume", name], env, timeout=300)
    assert refused.returncode == 1 and "search.num_trials: 2 when the search started, 5 now" in refused.stderr
    (folder / "search.yaml").write_text(original)
    meta = json.loads((folder / "meta.json").read_text())
    (folder / "meta.json").write_text(json.dumps({**meta, "versions": {**meta["versions"], "ray": "2.0.0"}}))
    refused = run_comod(["search", "resume", name], env, timeout=300)
    assert refused.returncode == 1 and "started with ray 2.0.0" in refused.stderr and "Traceback" not in refused.stderr
    # another comod (plain files and versioned databases): resumed, with a note
    (folder / "meta.json").write_text(json.dumps({**meta, "versions": {**meta["versions"], "comod": "0.0.1"}}))

    done = run_comod(["search", "resume", name, "--json"], env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "other versions than it started with (comod 0.0.1 ->" in done.stderr
    summary = json.loads(done.stdout[done.stdout.index("{"):])
    assert summary["completed"] == 2 and summary["interrupted"] == 0
    parent, children, study = _records(home, name)
    assert parent.info.status == "FINISHED"
    ids = [c.data.tags[TAG_TRIAL_ID] for c in children]
    assert len(ids) == len(set(ids)) == 2
    assert all(c.info.status == "FINISHED" and c.data.tags[TAG_STATE] == "completed" for c in children)
    # the interrupted trials went on in their own runs, and their Optuna trials were continued
    assert {c.data.tags[TAG_TRIAL_ID] for c in interrupted} <= set(ids)
    assert len([t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]) == 2
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
    closed = [t.number for t in study.trials if t.user_attrs.get(INTERRUPTED_ATTR) == "1"]
    continued = [t for t in study.trials if CONTINUES_ATTR in t.user_attrs]
    assert closed and sorted(t.user_attrs[CONTINUES_ATTR] for t in continued) == sorted(closed)
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in continued)


def test_sigterm_stops_cleanly_and_a_second_signal_ends_at_once(tmp_path, ray_tmp):
    name, home = "termed", tmp_path / "runs"
    env = search_env(home, ray_tmp)
    log = tmp_path / "driver.log"
    driver = _start(_slow_search(tmp_path, name), name, env, log)
    with _cleaned_up(driver, ray_tmp):
        _wait_until_trials_run(driver, log, home, name)
        driver.send_signal(signal.SIGTERM)  # what `kill`, `comod search stop` and Kubernetes send: the driver only
        code, out = _finish(driver, log)
    assert code == 143, out[-3000:]
    assert f"interrupted: continue with comod search resume {name}" in out
    assert not any(sign in out for sign in NATIVE_DUMP) and "Traceback" not in out, out[-3000:]
    _assert_stopped_cleanly(home, name)

    # the impatient user: Ctrl-C twice ends at once, says what may be left, and resume repairs it
    log2 = tmp_path / "driver2.log"
    again = subprocess.Popen([sys.executable, "-m", "comod_platform.cli", "search", "resume", name], env=env,
                             cwd=REPO, stdout=open(log2, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    with _cleaned_up(again, ray_tmp):
        deadline = time.time() + 300
        while "running" not in log2.read_text() and time.time() < deadline:
            assert again.poll() is None, log2.read_text()[-3000:]
            time.sleep(0.5)
        os.killpg(again.pid, signal.SIGINT)
        time.sleep(0.3)
        os.killpg(again.pid, signal.SIGINT)
        code, out = _finish(again, log2, timeout=60)
    assert code == 130 and "second SIGINT: ending at once" in out and f"comod search resume {name}" in out
    done = run_comod(["search", "resume", name, "--json"], env)
    assert done.returncode == 0, done.stderr[-3000:]
    parent, children, study = _records(home, name)
    assert parent.info.status == "FINISHED" and not [c for c in children if c.info.status == "RUNNING"]
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]


def test_names_taken_in_a_shared_store_and_impossible_resources_are_refused_before_anything_is_made(
        tmp_path, ray_tmp, empty_store):
    import shutil

    home = tmp_path / "runs"
    home.mkdir()
    shutil.copy(empty_store, home / "mlflow.db")
    env = search_env(home, ray_tmp)
    path = _slow_search(tmp_path, "shared", trials=1)
    # a name that is not a folder name: refused before Ray starts
    bad = run_comod(["search", "run", str(path), "--name", "../escape"], env, timeout=120)
    assert bad.returncode == 2 and "a search's name is letters" in bad.stderr
    assert not (tmp_path / "escape").exists() and not list(Path(ray_tmp).rglob("session_*"))
    # a colleague's search of the same name in the team's tracking store
    MlflowClient(f"sqlite:///{home / 'mlflow.db'}").create_experiment("search/celeba-1")
    taken = run_comod(["search", "run", str(path), "--name", "celeba-1"], env, timeout=300)
    assert taken.returncode == 1 and "has an experiment 'search/celeba-1' already" in taken.stderr
    assert not (home / "searches" / "celeba-1").exists()
    # ... and in the team's Optuna database
    team_db = f"sqlite:///{tmp_path / 'team-optuna.db'}"
    optuna.create_study(study_name="celeba-2", storage=team_db)
    taken = run_comod(["search", "run", str(path), "--name", "celeba-2"], {**env, "COMOD_OPTUNA_STORAGE": team_db},
                   timeout=300)
    assert taken.returncode == 1 and "has a study 'celeba-2' already" in taken.stderr
    assert not (home / "searches" / "celeba-2").exists()
    assert [s.study_name for s in optuna.get_all_study_summaries(team_db)] == ["celeba-2"]
    # 64 GPUs per trial, which no node here has: refused in seconds, not waited for
    gpu = _slow_search(tmp_path, "gpu", trials=1, resources={"cpu": 1, "gpu": 64})
    started = time.monotonic()
    refused = run_comod(["search", "run", str(gpu), "--name", "needs-gpu"], env, timeout=300)
    assert refused.returncode == 1 and "no node can run a trial: it asks 1 CPU and 64 GPU" in refused.stderr
    assert "this machine's Ray has" in refused.stderr and time.monotonic() - started < 120
    assert not (home / "searches" / "needs-gpu").exists()


def test_sigterm_to_the_driver_s_process_group_stops_as_sigterm_to_the_driver_alone(tmp_path, ray_tmp):
    """What Slurm's scancel and time limit, ``kill -- -PGID``, systemctl and GNU ``timeout`` send: SIGTERM to
    every process of the group. The search's own Ray is out of the group's reach, so the driver stops it
    cleanly; GNU ``timeout`` signals the driver and then its group, which is still one stop, not two."""
    name, home = "grouped", tmp_path / "runs"
    env = search_env(home, ray_tmp)
    log = tmp_path / "driver.log"
    driver = _start(_slow_search(tmp_path, name), name, env, log)
    with _cleaned_up(driver, ray_tmp):
        _wait_until_trials_run(driver, log, home, name)
        group = os.getpgid(driver.pid)
        # the local Ray runs outside the driver's group: a signal to the group cannot reach it
        ray_pids = processes_mentioning(ray_tmp)
        assert ray_pids and not [pid for pid in ray_pids if _pgid(pid) == group]
        driver.send_signal(signal.SIGTERM)
        os.killpg(group, signal.SIGTERM)
        code, out = _finish(driver, log)
    assert code == 143, out[-3000:]
    assert "second SIGTERM" not in out and f"interrupted: continue with comod search resume {name}" in out
    assert "Failed to connect to GCS" not in out and "Traceback" not in out, out[-3000:]
    interrupted = _assert_stopped_cleanly(home, name)
    done = run_comod(["search", "resume", name, "--json"], env)
    assert done.returncode == 0, done.stderr[-3000:]
    parent, children, study = _records(home, name)
    assert parent.info.status == "FINISHED" and not [c for c in children if c.info.status == "RUNNING"]
    ids = [c.data.tags[TAG_TRIAL_ID] for c in children]
    assert len(ids) == len(set(ids)) == 2 and {c.data.tags[TAG_TRIAL_ID] for c in interrupted} <= set(ids)
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None
