"""`comod train` and `comod ui` end to end: real training on the tiny
synthetic config, the real MLflow stores (embedded SQLite, and a real
`mlflow server`), real interruptions. Bad input must give one clear message,
a non-zero exit and no traceback, and must lose nothing already recorded.

Runs that exercise the process boundary (exit codes, signals, the console
entry point, a server) are subprocesses; the bad-input matrix and the
restart checks call the same ``main`` in-process, which is the same code
path without paying a torch + MLflow import per case.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from comod.config import flatten, load_config
from comod_platform import cli
from servers import free_port, stop_group

EXPERIMENT = "comod-train"
OVERRIDES = ["modulation.kind=deterministic", "modulation.noise_scale=0.2"]
TINY_STEPS = 3  # steps_per_epoch of both phases in configs/tiny.yaml


# ------------------------------------------------------------------ helpers

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny.yaml"
COMMAND = [sys.executable, "-m", "comod_platform.cli"]


def cli_env(home: Path, **extra: str) -> dict[str, str]:
    """The environment of a `comod` subprocess: runs folder ``home``, the
    embedded store (no MLFLOW_TRACKING_URI), no downloads, one thread."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(COMOD_HOME=str(home), COMOD_DOWNLOAD="0", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def run_cli(args: list, env: dict, cwd: Path | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([*COMMAND, *map(str, args)], env=env, cwd=cwd or REPO, capture_output=True,
                          text=True, timeout=timeout)


def start_cli(args: list, env: dict, cwd: Path | None = None, **kwargs) -> subprocess.Popen:
    """`comod ARGS` in its own process group (so a kill reaches its children)."""
    return subprocess.Popen([*COMMAND, *map(str, args)], env=env, cwd=cwd or REPO, start_new_session=True,
                            text=True, **kwargs)


def wait_http(url: str, proc: subprocess.Popen, timeout: float, log: Path | None = None) -> None:
    """Poll ``url`` until it answers 200; fail early when ``proc`` exits."""
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            text = log.read_text() if log and log.exists() else ""
            pytest.fail(f"server exited with {proc.returncode} before answering {url}:\n{text[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.25)
    text = log.read_text() if log and log.exists() else ""
    pytest.fail(f"{url} did not answer within {timeout} s:\n{text[-3000:]}")


def store_uri(home: Path) -> str:
    return f"sqlite:///{home / 'mlflow.db'}"


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def runs_of(c, experiment: str = EXPERIMENT) -> list:
    exp = c.get_experiment_by_name(experiment)
    return [] if exp is None else c.search_runs([exp.experiment_id])


def histories(c, run) -> dict[str, list]:
    """Metric name -> its history as (step, value), in logging order."""
    return {k: [(m.step, m.value) for m in c.get_metric_history(run.info.run_id, k)] for k in run.data.metrics}


def expected_params(cfg) -> dict[str, str]:
    """docs/guides/tracking.md: params are the flattened config, one dotted name per setting,
    values as JSON text (strings as they are), so they parse back to their types."""
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in flatten(cfg).items()}


def snapshot(folder: Path) -> dict[str, tuple[int, str]]:
    """Every file below ``folder`` -> (mtime_ns, sha256)."""
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(folder.rglob("*")) if p.is_file()}


def run_state(c) -> list[tuple]:
    """What the store holds about every run (ids, status, end, metric histories)."""
    return [(r.info.run_id, r.info.status, r.info.end_time, histories(c, r)) for r in runs_of(c)]


def summary_of(stdout: str) -> dict:
    """The JSON summary `comod train` prints before its last line."""
    return json.loads(stdout[:stdout.rindex("}") + 1])


def assert_unique_steps(hist: dict[str, list]) -> None:
    for name, points in hist.items():
        steps = [s for s, _ in points]
        assert len(steps) == len(set(steps)), f"{name} logged twice at a step: {steps}"


def main_in_process(args: list, capsys) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ------------------------------------------------- one run, end to end

@pytest.fixture(scope="module")
def trained(tmp_path_factory, server_process):
    """`comod train configs/tiny.yaml --set ... --out DIR` as a user runs it:
    a fresh runs folder (the store is created by this run) and a working
    directory of its own (nothing may land there).

    (It starts the tracking server of a later test, whose start-up then uses
    the second core while this run uses the first.)"""
    root = tmp_path_factory.mktemp("trained")
    home, out, cwd = root / "runs", root / "out", root / "cwd"
    cwd.mkdir()
    args = ["train", TINY, "--out", out, *[a for o in OVERRIDES for a in ("--set", o)]]
    env = cli_env(home)
    proc = run_cli(args, env, cwd=cwd)
    return SimpleNamespace(home=home, out=out, cwd=cwd, proc=proc, args=args, env=env,
                           cfg=load_config(TINY, OVERRIDES))


def test_train_writes_config_metrics_and_checkpoint(trained):
    proc, out = trained.proc, trained.out
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    # the resolved config, loadable as an experiment config, with the overrides in it
    assert load_config(out / "config.yaml") == trained.cfg
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["modulation"]["kind"] == "deterministic" and saved["modulation"]["noise_scale"] == 0.2
    metrics = json.loads((out / "metrics.json").read_text())
    for name in ("f1", "error", "precision", "recall", "accuracy"):
        assert 0.0 <= metrics[f"test/mean_{name}"] <= 1.0
        assert f"val/mean_{name}" in metrics
    for task in (f"pattern_{i}" for i in range(6)):  # the synthetic attributes task set
        assert 0.0 <= metrics[f"test/{task}/f1"] <= 1.0
    assert metrics["steps"] == 4 * TINY_STEPS
    ckpt = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert ckpt["metrics"] == metrics
    assert summary_of(proc.stdout) == {k: round(v, 4) for k, v in metrics.items() if k.startswith("test/mean_")}
    # the embedded default keeps everything in the runs folder, nothing in the working directory
    assert (trained.home / "mlflow.db").is_file()
    assert list(trained.cwd.iterdir()) == []


def test_train_records_the_mlflow_run(trained):
    assert trained.proc.returncode == 0, trained.proc.stderr
    c = client(store_uri(trained.home))
    (run,) = runs_of(c)
    assert run.info.status == "FINISHED"
    assert run.info.run_id in trained.proc.stdout
    # params: the flattened config under its dotted names, --set overrides included
    assert run.data.params == expected_params(trained.cfg)
    assert run.data.params["modulation.noise_scale"] == "0.2"
    assert run.data.params["modulation.kind"] == "deterministic"
    assert run.data.params["finetune.lr.controller"] == str(trained.cfg.finetune.lr.controller)
    assert run.data.params["modulation.sites"] == '["layer3"]'
    assert run.data.tags["comod.modulation_kind"] == "deterministic"
    # metrics: one point per epoch at the global step, then the final metrics
    hist = histories(c, run)
    assert_unique_steps(hist)
    assert [s for s, _ in hist["pretrain/train_loss"]] == [TINY_STEPS, 2 * TINY_STEPS]
    assert [s for s, _ in hist["pretrain/val/mean_f1"]] == [TINY_STEPS, 2 * TINY_STEPS]
    assert [s for s, _ in hist["finetune/train_loss"]] == [3 * TINY_STEPS, 4 * TINY_STEPS]
    metrics = json.loads((trained.out / "metrics.json").read_text())
    for name in ("test/mean_f1", "test/mean_error", "test/pattern_0/f1", "pretrained/test/mean_f1"):
        assert hist[name] == [(4 * TINY_STEPS, pytest.approx(metrics[name]))]
    # artifacts: in the runs folder's artifact store, the same bytes as the outputs
    names = {a.path for a in c.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "metrics.json", "checkpoint.pt"} <= names
    assert run.info.artifact_uri.startswith((trained.home / "artifacts").as_uri())
    stored = Path(c.download_artifacts(run.info.run_id, "metrics.json", str(trained.cwd.parent)))
    assert json.loads(stored.read_text()) == metrics


def test_two_runs_started_together_on_a_new_runs_folder_both_record(tmp_path):
    """Two `comod train` started at once on a runs folder with no store yet: one makes the store and the
    experiment while the other waits, and both runs are recorded (no migration or tag race)."""
    home = tmp_path / "runs"
    env = cli_env(home)
    procs = [start_cli(["train", TINY, "--out", tmp_path / f"out{i}", "--no-progress"], env,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    c = client(store_uri(home))
    assert len(c.search_experiments(filter_string="name = 'comod-train'")) == 1
    assert sorted(r.info.status for r in runs_of(c, "comod-train")) == ["FINISHED", "FINISHED"]


def test_a_command_waits_for_a_store_another_is_still_making(tmp_path, monkeypatch):
    """A half-made store (the file exists, its maker holds the lock) is not opened until it is made."""
    import threading

    from filelock import FileLock

    from comod_platform import tracking

    monkeypatch.setenv("COMOD_HOME", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    got = []
    with FileLock(str(tmp_path / "mlflow.db.lock")):
        (tmp_path / "mlflow.db").touch()  # the maker has begun
        reader = threading.Thread(target=lambda: got.append(tracking.tracking_uri()))
        reader.start()
        reader.join(timeout=2)
        assert reader.is_alive() and got == []  # waiting for the maker
    reader.join(timeout=60)
    assert got == [tracking.embedded_uri()]


def test_rerun_of_a_finished_run_returns_its_metrics_and_logs_nothing(trained, monkeypatch, capsys):
    assert trained.proc.returncode == 0, trained.proc.stderr
    monkeypatch.setenv("COMOD_HOME", str(trained.home))
    c = client(store_uri(trained.home))
    before, files = run_state(c), snapshot(trained.out)
    started = time.monotonic()
    code, stdout, stderr = main_in_process(trained.args, capsys)
    assert code == 0, stderr
    assert time.monotonic() - started < 10
    assert summary_of(stdout) == summary_of(trained.proc.stdout)
    assert "epoch" not in stderr  # nothing trained again
    assert run_state(c) == before  # the same single run, nothing logged twice
    assert snapshot(trained.out) == files


# ------------------------------------------------------- resume, restart

LONG = ["--set", "pretrain.epochs=5", "--set", "pretrain.steps_per_epoch=4", "--set", "finetune.epochs=2"]
LONG_STEPS = [4 * e for e in range(1, 6)] + [20 + TINY_STEPS * e for e in (1, 2)]


def interrupt_after_next_checkpoint(args: list, env: dict, ckpt: Path, sig: int) -> tuple[int, str]:
    """Start `comod ARGS`, wait for it to write a new checkpoint, send ``sig``;
    returns the exit status and stderr."""
    before = ckpt.stat().st_mtime_ns if ckpt.exists() else None
    log = ckpt.parent.parent / f"stderr-{sig}.txt"  # a file, not a pipe nobody reads while we poll
    with open(log, "w") as sink:
        proc = start_cli(args, env, stdout=subprocess.DEVNULL, stderr=sink)
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline and \
                (not ckpt.exists() or ckpt.stat().st_mtime_ns == before):
            time.sleep(0.02)
        assert proc.poll() is None, f"the run ended before it was interrupted:\n{log.read_text()}"
        proc.send_signal(sig)
        proc.wait(timeout=60)
    finally:
        stop_group(proc)
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["metrics"] is None, "the run finished before it was interrupted"
    return proc.returncode, log.read_text()


def test_interrupted_run_resumes_into_the_same_mlflow_run(home, tmp_path, capsys, one_thread):
    """Ctrl-C, then SIGTERM, then a hard kill of the resumed run (all real processes and
    signals), then the same command again to the end (in-process, to spare
    a third start-up): one MLflow run throughout, every epoch logged once."""
    out = tmp_path / "out"
    args = ["train", TINY, "--out", out, *LONG]
    env = cli_env(home)
    ckpt = out / "checkpoint.pt"
    c = client(store_uri(home))

    code, stderr = interrupt_after_next_checkpoint(args, env, ckpt, signal.SIGINT)
    assert code == 130, stderr  # a clean stop: the run says so, and how to go on
    assert "run the same command again" in stderr and "Traceback" not in stderr
    (run,) = runs_of(c)
    assert run.info.status == "KILLED"

    code, stderr = interrupt_after_next_checkpoint(args, env, ckpt, signal.SIGTERM)  # kill PID, a scheduler
    assert code == 143, stderr  # the same clean stop as Ctrl-C, with SIGTERM's status
    assert "run the same command again" in stderr and "Traceback" not in stderr
    assert [(r.info.run_id, r.info.status) for r in runs_of(c)] == [(run.info.run_id, "KILLED")]

    code, stderr = interrupt_after_next_checkpoint(args, env, ckpt, signal.SIGKILL)
    assert code == -signal.SIGKILL, stderr
    assert "resuming after epoch" in stderr
    assert [(r.info.run_id, r.info.status) for r in runs_of(c)] == [(run.info.run_id, "RUNNING")]

    code, _, stderr = main_in_process(args, capsys)
    assert code == 0, stderr
    assert "resuming after epoch" in stderr
    runs = runs_of(c)
    assert [r.info.run_id for r in runs] == [run.info.run_id]  # no duplicate run
    (run,) = runs
    assert run.info.status == "FINISHED"
    hist = histories(c, run)
    assert_unique_steps(hist)
    # every epoch once, also one stopped between its checkpoint and its logging
    assert [s for s, _ in hist["pretrain/train_loss"]] == LONG_STEPS[:5]
    assert [s for s, _ in hist["pretrain/val/mean_f1"]] == LONG_STEPS[:5]
    assert [s for s, _ in hist["finetune/train_loss"]] == LONG_STEPS[5:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert hist["test/mean_f1"] == [(LONG_STEPS[-1], pytest.approx(metrics["test/mean_f1"]))]
    assert {"config.yaml", "metrics.json", "checkpoint.pt"} <= {a.path for a in c.list_artifacts(run.info.run_id)}


def test_changed_config_in_the_same_out_fails_clearly_and_restart_starts_over(home, tmp_path, capsys,
                                                                              one_thread):
    out = tmp_path / "out"
    code, _, err = main_in_process(["train", TINY, "--out", out, "--no-progress"], capsys)
    assert code == 0, err
    (out / "notes.txt").write_text("the user's own file")
    c = client(store_uri(home))
    before, files = run_state(c), snapshot(out)

    code, _, err = main_in_process(["train", TINY, "--out", out, "--set", "seed=1"], capsys)
    assert code != 0
    assert "seed" in err and "--restart" in err and str(out) in err
    assert run_state(c) == before and snapshot(out) == files  # the finished run is untouched

    code, _, err = main_in_process(["train", TINY, "--out", out, "--set", "seed=1", "--restart",
                                    "--no-progress"], capsys)
    assert code == 0, err
    assert load_config(out / "config.yaml").seed == 1
    assert (out / "notes.txt").read_text() == "the user's own file"  # --restart removes only the run's files
    runs = {r.info.run_id: r for r in runs_of(c)}
    assert len(runs) == 2
    old_id = before[0][0]
    assert runs[old_id].info.status == "FINISHED" and runs[old_id].data.params["seed"] == "0"
    (new,) = [r for i, r in runs.items() if i != old_id]
    assert new.info.status == "FINISHED" and new.data.params["seed"] == "1"
    assert json.loads((out / "mlflow_run.json").read_text())["run_id"] == new.info.run_id


# ------------------------------------------------------ a tracking server

@pytest.fixture(scope="module")
def server_process(tmp_path_factory, empty_store):
    """A real `mlflow server` on 127.0.0.1 (SQLite backend, proxied artifacts),
    started but not waited for: see ``trained``."""
    root = tmp_path_factory.mktemp("server")
    (root / "artifacts").mkdir()
    shutil.copy(empty_store, root / "mlflow.db")
    port, log = free_port(), root / "server.log"
    env = cli_env(root / "unused", MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    with open(log, "w") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port",
                                 str(port), "--workers", "1", "--backend-store-uri",
                                 f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination",
                                 str(root / "artifacts")],
                                env=env, cwd=root, stdout=sink, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        yield SimpleNamespace(proc=proc, url=f"http://127.0.0.1:{port}", root=root, log=log)
    finally:
        stop_group(proc)  # the whole process group: the CLI and its uvicorn worker


@pytest.fixture
def mlflow_server(server_process):
    wait_http(server_process.url + "/health", server_process.proc, timeout=120, log=server_process.log)
    return server_process


def test_train_logs_to_a_tracking_server(mlflow_server, tmp_path):
    home, out = tmp_path / "runs", tmp_path / "out"
    proc = run_cli(["train", TINY, "--out", out], cli_env(home, MLFLOW_TRACKING_URI=mlflow_server.url))
    assert proc.returncode == 0, proc.stderr
    c = client(mlflow_server.url)
    (run,) = runs_of(c)
    assert run.info.status == "FINISHED"
    assert run.data.params == expected_params(load_config(TINY))
    assert [m.step for m in c.get_metric_history(run.info.run_id, "pretrain/train_loss")] == [3, 6]
    assert {"config.yaml", "metrics.json", "checkpoint.pt"} <= {a.path for a in c.list_artifacts(run.info.run_id)}
    fetched = Path(c.download_artifacts(run.info.run_id, "metrics.json", str(tmp_path)))
    assert json.loads(fetched.read_text()) == json.loads((out / "metrics.json").read_text())
    # the server stored the artifacts; the embedded store was not used
    assert list(mlflow_server.root.glob("artifacts/**/checkpoint.pt"))
    assert not (home / "mlflow.db").exists() and not (home / "artifacts").exists()


# ------------------------------------------------------------ bad input

@pytest.fixture(scope="module")
def recorded(tmp_path_factory, empty_store):
    """A finished run that no bad attempt may touch."""
    root = tmp_path_factory.mktemp("recorded")
    home, out = root / "runs", root / "out"
    home.mkdir()
    shutil.copy(empty_store, home / "mlflow.db")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("COMOD_HOME", str(home))
        mp.setenv("COMOD_DOWNLOAD", "0")
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            assert cli.main(["train", str(TINY), "--out", str(out), "--no-progress"]) == 0
        finally:
            torch.set_num_threads(threads)
    return SimpleNamespace(home=home, out=out, root=root)


def _malformed(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: bad\nmodel:\n  width: 0.125\n  decoder_hidden: [16\nseed: 0\n")
    return [path], ["bad.yaml", "line 5", "malformed YAML"]


def _missing_file(tmp_path):
    path = tmp_path / "nowhere.yaml"
    return [path], [str(path), "no such config file"]


def _missing_dataset(tmp_path):
    empty = tmp_path / "empty-data"
    empty.mkdir()
    return ([TINY, "--set", "data.dataset=fashion_mnist", "--set", f"data.root={empty}"],
            ["Fashion-MNIST not found", str(empty), "apt-get install -y dataset-fashion-mnist", "COMOD_DATA"])


CASES = {
    # name: (arguments after `train` or a builder(tmp_path) -> (arguments, expected parts), expected parts)
    "malformed_yaml": (_malformed, None),
    "missing_config_file": (_missing_file, None),
    "unknown_key": ([TINY, "--set", "modulation.noise_scal=0.3"],
                    ["modulation.noise_scal", "unknown setting", "did you mean modulation.noise_scale"]),
    "unknown_top_level_key": ([TINY, "--set", "pretrian.epochs=2"], ["pretrian", "did you mean pretrain"]),
    "wrong_type": ([TINY, "--set", "pretrain.epochs=many"], ["pretrain.epochs", "'many'", "an integer"]),
    "wrong_type_list": ([TINY, "--set", "model.decoder_hidden=wide"],
                        ["model.decoder_hidden", "'wide'", "integer"]),
    "impossible_value": ([TINY, "--set", "modulation.noise_scale=-1"],
                         ["modulation.noise_scale", "-1", ">= 0"]),
    "bad_override_syntax": ([TINY, "--set", "modulation.noise_scale"], ["modulation.noise_scale", "path=value"]),
    "unknown_site": ([TINY, "--set", "modulation.sites=[layer9]"],
                     ["modulation.sites", "layer9", "stem", "layer1", "layer4"]),
    "unknown_task_set": ([TINY, "--set", "data.tasks=colours"],
                         ["data.tasks", "colours", "attributes", "coarse_fine", "groups"]),
    "unknown_dataset": ([TINY, "--set", "data.dataset=imagenet"],
                        ["data.dataset", "imagenet", "fashion_mnist", "synthetic"]),
    "unknown_finetune_task": ([TINY, "--set", "finetune.tasks=[pattern_9]"],
                              ["finetune.tasks", "pattern_9", "pattern_0", "pattern_5"]),
    "missing_dataset": (_missing_dataset, None),
    "unreachable_server": ([TINY], ["{uri}", "unreachable", "MLFLOW_TRACKING_URI", "mlflow server"]),
}


# Each case against a new --out, and against the folder of a recorded run (as
# if resuming it): except the data-level cases, which against a recorded
# folder are config changes (test_changed_config_... covers those).
DATA_LEVEL = ("missing_dataset", "unknown_finetune_task")


@pytest.mark.parametrize("case,against", [(case, against) for case in CASES for against in ("new_out", "recorded_out")
                                          if against == "new_out" or case not in DATA_LEVEL])
def test_bad_input_fails_clearly_and_loses_nothing(case, against, recorded, tmp_path, monkeypatch, capsys):
    args, expected = CASES[case]
    if callable(args):
        args, expected = args(tmp_path)
    monkeypatch.setenv("COMOD_HOME", str(recorded.home))
    monkeypatch.setenv("COMOD_DOWNLOAD", "0")
    uri = None
    if case == "unreachable_server":
        uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        expected = [e.format(uri=uri) for e in expected]
    else:
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "new-out" if against == "new_out" else recorded.out
    c = client(store_uri(recorded.home))
    before, files, home_files = run_state(c), snapshot(recorded.out), sorted(recorded.home.iterdir())

    code, stdout, stderr = main_in_process(["train", *args, "--out", out], capsys)

    assert code != 0
    assert stderr.startswith("comod: error: ") and "Traceback" not in stderr
    for part in expected:
        assert part in stderr, f"{part!r} not in the message:\n{stderr}"
    assert stdout == ""
    # nothing recorded is lost or changed, and no run or output folder is made
    assert run_state(c) == before
    assert snapshot(recorded.out) == files
    assert sorted(recorded.home.iterdir()) == home_files
    if against == "new_out":
        assert not out.exists()


def test_bad_input_through_the_command_has_no_traceback(tmp_path):
    """The same promise across the process boundary: exit status and stderr."""
    args, expected = _malformed(tmp_path)
    home = tmp_path / "runs"
    proc = run_cli(["train", *args, "--out", tmp_path / "out"], cli_env(home))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("comod: error: ") and proc.stderr.count("\n") == 1
    for part in expected:
        assert part in proc.stderr
    assert not (tmp_path / "out").exists() and not home.exists()


def test_unknown_command_and_missing_config_argument_are_usage_errors():
    proc = run_cli(["train"], cli_env(Path("/nonexistent")))
    assert proc.returncode == 2 and "config" in proc.stderr and "Traceback" not in proc.stderr


# -------------------------------------------------------------------- ui

def test_ui_help():
    proc = run_cli(["ui", "--help"], cli_env(Path("/nonexistent")))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: comod ui") and "--port" in proc.stdout


def test_ui_with_a_server_uri_points_at_it(monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    code, stdout, _ = main_in_process(["ui"], capsys)
    assert code == 0 and "http://127.0.0.1:1" in stdout


@pytest.mark.slow  # an MLflow UI takes 10-40 s to start on 2 busy cores
def test_ui_serves_the_embedded_store(recorded, tmp_path):
    import urllib.request

    port = free_port()
    log = tmp_path / "ui.log"
    with open(log, "w") as sink:
        proc = start_cli(["ui", "--port", port], cli_env(recorded.home), stdout=sink, stderr=subprocess.STDOUT)
    try:
        wait_http(f"http://127.0.0.1:{port}/", proc, timeout=180, log=log)
        run_id = json.loads((recorded.out / "mlflow_run.json").read_text())["run_id"]
        url = f"http://127.0.0.1:{port}/get-artifact?path=metrics.json&run_uuid={run_id}"
        with urllib.request.urlopen(url, timeout=10) as response:
            assert json.loads(response.read()) == json.loads((recorded.out / "metrics.json").read_text())
    finally:
        stop_group(proc)
