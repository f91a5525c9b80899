"""What keeps a search's state its own: names, the driver lock, the recorded versions and settings, and
credentials kept out of files and messages, unwritable folders and damaged files. The end-to-end cases (a
second driver, a taken name in a shared store, an edited search file on resume) run real searches in
test_interrupts.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from comod_platform import credentials, jobs
from comod_platform.search_state import (BadName, SearchBusy, SearchMeta, SearchPaths, check_name, default_name,
                                         first_difference, search_hash)


@pytest.mark.parametrize("bad", ["../x", "a/b", "x/../../etc", "..", "a\x00b", "tab\there", "new\nline", "",
                                 "-leading-dash", ".hidden", "x" * 101])
def test_a_name_that_is_not_a_plain_folder_name_is_refused(bad):
    with pytest.raises(BadName, match="letters, digits"):
        check_name(bad)


def test_good_names_and_default_names():
    assert check_name("tiny-lr.sweep_2") == "tiny-lr.sweep_2"
    made = {default_name("quick start/../x") for _ in range(50)}  # the same second, 50 times
    assert len(made) == 50
    for name in made:
        assert check_name(name) == name and name.startswith("quick-start-.-x-20")


def _hold_lock(paths: SearchPaths) -> subprocess.Popen:
    """Another process that takes the search's driver lock and keeps it until killed."""
    code = (f"import sys, time; sys.path[:0] = {sys.path!r}\n"
            f"from pathlib import Path\nfrom comod_platform.search_state import SearchPaths\n"
            f"lock = SearchPaths({paths.name!r}, Path({str(paths.root.parent.parent)!r})).lock('comod search run x')\n"
            f"print('held', flush=True)\ntime.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_the_driver_lock_names_its_holder_and_dies_with_it(tmp_path):
    paths = SearchPaths("busy", tmp_path)
    holder = _hold_lock(paths)
    try:
        with pytest.raises(SearchBusy) as refused:
            paths.lock("comod search resume busy")
        message = str(refused.value)
        assert f"pid {holder.pid} on host" in message and "comod search run x" in message
        assert "comod search resume busy" in message
        with pytest.raises(SearchBusy):
            paths.check_not_busy()
    finally:
        holder.kill()  # SIGKILL: no clean-up code runs; the kernel releases the lock
        holder.wait()
    paths.check_not_busy()
    with paths.lock("comod search resume busy") as lock:
        assert json.loads(paths.holder_file.read_text())["command"] == "comod search resume busy"
        assert lock.held is not None
    assert lock.held is None


def test_check_not_busy_creates_nothing(tmp_path):
    paths = SearchPaths("untouched", tmp_path)
    paths.root.mkdir(parents=True)
    paths.check_not_busy()
    assert list(paths.root.iterdir()) == []


def test_meta_keeps_no_password_and_gets_it_back_from_the_environment(tmp_path, monkeypatch):
    url = "postgresql+psycopg2://optuna:s3cr3t-pw@db.internal:5432/optuna"
    tracking = "https://alice:tr4ck-pw@mlflow.internal"
    paths = SearchPaths("secret", tmp_path)
    paths.write_meta(SearchMeta(name="secret", study_name="secret", optuna_storage=url, tracking_uri=tracking,
                                experiment_id="1", parent_run_id="r", ray_storage="/x", created=time.time()))
    on_disk = paths.meta_file.read_text()
    assert "s3cr3t-pw" not in on_disk and "tr4ck-pw" not in on_disk
    assert "optuna:***@db.internal" in on_disk and "alice:***@mlflow.internal" in on_disk
    monkeypatch.delenv("COMOD_OPTUNA_STORAGE", raising=False)
    assert paths.read_meta().optuna_storage == "postgresql+psycopg2://optuna:***@db.internal:5432/optuna"
    monkeypatch.setenv("COMOD_OPTUNA_STORAGE", url)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking)
    meta = paths.read_meta()
    assert meta.optuna_storage == url and meta.tracking_uri == tracking
    # another database's password is not taken for this one
    monkeypatch.setenv("COMOD_OPTUNA_STORAGE", url.replace("db.internal", "other"))
    assert "***" in paths.read_meta().optuna_storage


def test_an_older_or_newer_meta_file_still_reads(tmp_path):
    paths = SearchPaths("old", tmp_path)
    paths.root.mkdir(parents=True)
    old = {"name": "old", "study_name": "old", "optuna_storage": "sqlite://", "tracking_uri": "sqlite://",
           "experiment_id": "1", "parent_run_id": "r", "ray_storage": "/x", "created": 1.0,
           "a_field_of_a_later_version": 3}
    paths.meta_file.write_text(json.dumps(old))
    meta = paths.read_meta()
    assert meta.versions == {} and meta.search_id is None and meta.search_sha256 is None


def test_redaction_of_messages_and_what_counts_as_a_secret():
    text = "cannot connect to postgresql://u:pw1@h/db, nor to http://v:pw2@m:5000/x; plain http://h:1 is kept"
    shown = credentials.redact_all(text)
    assert "pw1" not in shown and "pw2" not in shown and "u:***@h" in shown and "http://h:1" in shown
    assert credentials.is_secret("AWS_SECRET_ACCESS_KEY") and credentials.is_secret("MLFLOW_TRACKING_PASSWORD")
    assert credentials.is_secret("COMOD_OPTUNA_STORAGE", "postgresql://u:pw@h/db")
    assert not credentials.is_secret("COMOD_OPTUNA_STORAGE", "postgresql://u@h/db")
    assert not credentials.is_secret("AWS_ACCESS_KEY_ID") and not credentials.is_secret("PGPASSFILE")


def test_a_job_environment_holds_no_secret(monkeypatch):
    monkeypatch.setenv("COMOD_OPTUNA_STORAGE", "postgresql+psycopg2://optuna:pw9@db:5432/optuna")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    notes: list[str] = []
    env = jobs.job_env(jobs.parse_env(["COMOD_HOME=/shared/runs"]), storage=None, notes=notes)
    assert "COMOD_OPTUNA_STORAGE" not in env and env["MLFLOW_TRACKING_URI"] == "http://mlflow.internal:5000"
    assert any("COMOD_OPTUNA_STORAGE" in n and "pw9" not in n and "cluster's own" in n for n in notes)
    for pair in ("AWS_SECRET_ACCESS_KEY=abc", "MLFLOW_TRACKING_PASSWORD=abc", "X_URL=postgresql://u:abc@h/d"):
        with pytest.raises(jobs.JobsError, match="by reference") as refused:
            jobs.job_env(jobs.parse_env([pair]), storage=None)
        assert "abc" not in str(refused.value)


def test_settings_hash_and_first_difference():
    started = {"experiment": {"name": "x", "pretrain": {"epochs": 3}}, "search": {"num_trials": 4}}
    assert search_hash(started) == search_hash(json.loads(json.dumps(started, sort_keys=True)))
    edited = {"experiment": {"name": "x", "pretrain": {"epochs": 5}}, "search": {"num_trials": 4}}
    assert search_hash(edited) != search_hash(started)
    assert first_difference(started, edited) == "experiment.pretrain.epochs: 3 when the search started, 5 now"
    assert first_difference(started, started) is None


def _spin(seconds: float) -> None:
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        pass


def test_the_watchdog_fails_a_stalled_or_overlong_trial_and_spares_one_that_progresses():
    from comod_platform.watchdog import TrialTimeout, Watchdog

    stalled = Watchdog(None, stall_timeout_s=0.5, poll_s=0.05)
    started = time.monotonic()
    with pytest.raises(TrialTimeout):
        with stalled:
            _spin(20)
    assert time.monotonic() - started < 5 and stalled.reason.startswith("stalled: no progress")
    assert "search.stall_timeout_s (0.5)" in stalled.reason

    busy = Watchdog(None, stall_timeout_s=0.5, poll_s=0.05)
    with busy:
        for _ in range(40):  # 2 s of steps, each well within the stall limit
            _spin(0.05)
            busy.alive()
    assert busy.reason is None

    overlong = Watchdog(trial_timeout_s=0.5, stall_timeout_s=None, poll_s=0.05)
    with pytest.raises(TrialTimeout):
        with overlong:
            for _ in range(400):
                _spin(0.05)
                overlong.alive()  # progress does not extend the whole-trial limit
    assert overlong.reason.startswith("timed out: the trial ran")
    assert not Watchdog(None, None).active


def test_unwritable_folders_and_a_full_disk_are_one_line_naming_the_file(tmp_path):
    from comod_platform.paths import disk_message, unwritable

    assert unwritable(tmp_path / "fine" / "deeper", "--out") is None
    refused = unwritable(Path("/sys/comod-cannot-be-here"), "--out")  # not even root may write there
    assert refused.startswith("cannot write /sys/comod-cannot-be-here") and "choose a writable --out" in refused
    with pytest.raises(OSError) as full:  # a real "no space left on device"
        with open("/dev/full", "wb") as device:
            device.write(b"x")
            device.flush()
    message = disk_message(full.value, tmp_path / "run", "--out")
    assert "no space left on the disk writing" in message and "resumes from the last checkpoint" in message


def test_train_refuses_an_unwritable_out_and_a_damaged_checkpoint_in_one_line(tmp_path):
    repo = Path(__file__).resolve().parents[2]
    base = [sys.executable, "-m", "comod_platform.cli", "train", str(repo / "configs" / "tiny.yaml")]
    env = {**os.environ, "COMOD_HOME": str(tmp_path / "runs"), "COMOD_DOWNLOAD": "0"}
    env.pop("MLFLOW_TRACKING_URI", None)
    done = subprocess.run([*base, "--out", "/sys/comod-cannot-be-here"], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("comod: error: cannot write /sys/comod-cannot-be-here")
    out = tmp_path / "damaged"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"\x80\x02 cut short")
    done = subprocess.run([*base, "--out", str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert f"{out / 'checkpoint.pt'} is damaged" in done.stderr and "--restart" in done.stderr


def test_the_write_probe_leaves_no_folder_behind(tmp_path):
    from comod_platform.paths import unwritable

    assert unwritable(tmp_path / "a" / "b" / "c", "--out") is None
    assert list(tmp_path.iterdir()) == []
