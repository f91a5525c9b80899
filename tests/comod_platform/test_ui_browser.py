"""The MLflow UI as a researcher opens it, in a real headless browser.

A real `comod search run` of search_spaces/tiny.yaml (local Ray, Optuna,
the embedded SQLite store in a temporary runs folder: the session's, which
the dashboard test reads too), then `comod ui NAME`
serving that store on 127.0.0.1, and Debian's chromium (`make chromium`)
loading the page `comod ui` prints: the DOM must hold the parent run's name,
every trial's run name and the key metric columns, on the runs table (not
MLflow's GenAI overview) and without the usage-data notice. Every process
started here is stopped afterwards. Without chromium the browser test is
skipped, with the reason; the records' checks still run.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow.tracking import MlflowClient

from comod_platform import tracking
from comod_platform.conventions import PROTOCOL_KEYS, TAG_BEST_RUN, TAG_BEST_TRIAL, TAG_PARENT, TAG_ROLE, TAG_STATE
from servers import free_port, processes_mentioning, stop_group

NAME = "tiny"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def searched(tiny_search):
    """The session's tiny search (search_spaces/tiny.yaml run by the command in a fresh runs folder, the
    conftest's ``tiny_search``); its MLflow records."""
    assert tiny_search["name"] == NAME
    home, env = tiny_search["home"], tiny_search["env"]
    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(f"search/{NAME}")
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get(TAG_ROLE) == "search"]
    children = [r for r in runs if r.data.tags.get(TAG_ROLE) == "trial"]
    assert len(children) == 4
    return SimpleNamespace(home=home, env=env, client=client, experiment=experiment, parent=parent,
                           children=children)


def test_a_search_is_recorded_for_the_ui(searched):
    """The experiment's kind and view, every run's dataset input, the key metrics on every completed
    trial and the best trial's on the parent."""
    tags = searched.experiment.tags
    assert tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    view = json.loads(json.loads(tags[tracking.VIEW_TAG])["state"])
    assert view["orderByKey"] == "metrics.`val/mean_f1`" and view["orderByAsc"] is False

    (parent_input,) = searched.parent.inputs.dataset_inputs
    assert parent_input.dataset.name == "synthetic/attributes"
    assert re.fullmatch(r"[0-9a-f]{10}", parent_input.dataset.digest)
    profile = json.loads(parent_input.dataset.profile)
    assert profile["tasks"] == [f"pattern_{i}" for i in range(6)] and profile["train_size"] == 128
    for child in searched.children:
        assert child.data.tags[TAG_PARENT] == searched.parent.info.run_id
        (entry,) = child.inputs.dataset_inputs
        assert (entry.dataset.name, entry.dataset.digest) == (parent_input.dataset.name, parent_input.dataset.digest)
        assert child.data.params["modulation.kind"] == child.data.tags["comod.modulation_kind"]
        if child.data.tags[TAG_STATE] == "completed":
            assert set(tracking.KEY_METRICS) <= set(child.data.metrics)
        # rows that differ in their first characters; pruned trials ended normally; no bookkeeping charts
        kind, trial_id = child.data.tags["comod.modulation_kind"], child.data.tags["comod.ray_trial_id"]
        assert child.info.run_name == f"{kind}-{trial_id}"
        assert child.info.status == "FINISHED" and child.data.tags[TAG_STATE] in ("completed", "pruned")
        assert not PROTOCOL_KEYS & set(child.data.metrics), sorted(child.data.metrics)

    completed = [c for c in searched.children if c.data.tags[TAG_STATE] == "completed"]
    best = max(completed, key=lambda c: c.data.metrics["val/mean_f1"])
    assert searched.parent.data.tags[TAG_BEST_RUN] == best.info.run_id
    assert searched.parent.data.tags[TAG_BEST_TRIAL] == best.data.tags["comod.ray_trial_id"]
    for key in tracking.KEY_METRICS:
        assert searched.parent.data.metrics[key] == pytest.approx(best.data.metrics[key])


@pytest.fixture
def ui(searched, tmp_path):
    """`comod ui NAME` on a free port, as a user starts it; the URL it prints."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "comod_platform.cli", "ui", NAME, "--port", str(port)],
                            env=searched.env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 240
        url = None
        while url is None and time.monotonic() < deadline and proc.poll() is None:
            url = next((line.split(": ", 1)[1].strip() for line in list(lines) if line.startswith(f"{NAME}: ")),
                       None)
            time.sleep(0.25)
        assert url, "comod ui printed no URL:\n" + "".join(lines)[-3000:]
        yield SimpleNamespace(url=url, port=port, lines=lines, home=searched.home)
    finally:
        stop_group(proc)
        assert proc.poll() is not None


def test_comod_ui_serves_with_mlflow_telemetry_off(ui):
    """The server `comod ui` starts tells the UI to send nothing and accepts no usage records."""
    base = f"http://127.0.0.1:{ui.port}/ajax-api/3.0/mlflow/ui-telemetry"
    with urllib.request.urlopen(base, timeout=30) as response:
        assert json.load(response)["disable_ui_telemetry"] is True
    posted = urllib.request.Request(base, data=json.dumps({"records": []}).encode(), method="POST",
                                    headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(posted, timeout=30) as response:
        assert json.load(response) == {"status": "disabled"}
    # quiet: comod's own lines (the address), none of the server's start-up, warnings or requests
    time.sleep(1)
    assert ui.lines and all(line.startswith(("MLflow UI of ", f"{NAME}: ")) for line in ui.lines), ui.lines
    assert "ui-telemetry" in (ui.home / "ui.log").read_text()  # the requests went to the log instead


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as probe:
        probe.settimeout(1)
        return probe.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGINT])
def test_stopping_comod_ui_stops_its_server_and_frees_the_port(searched, tmp_path, how):
    """A signal to `comod ui` alone (kill PID, a scheduler's stop; SIGINT as a terminal's Ctrl-C sends it)
    ends the MLflow server it started and the server's uvicorn worker: the port is free again."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "comod_platform.cli", "ui", NAME, "--port", str(port)],
                            env=searched.env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    marker = f"--port {port}"
    try:
        deadline = time.monotonic() + 240
        while not _listening(port) and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            time.sleep(0.25)
        assert _listening(port), "the UI did not start"
        assert len(processes_mentioning(marker)) >= 2  # comod ui and the server (and its worker)
        proc.send_signal(how)
        assert proc.wait(60) == 0
        deadline = time.monotonic() + 30
        while (_listening(port) or len(processes_mentioning(marker)) > 0) and time.monotonic() < deadline:
            time.sleep(0.25)
        assert not _listening(port), "a server process still holds the port"
        assert not processes_mentioning(marker), processes_mentioning(marker)
    finally:
        stop_group(proc)
        for pid in processes_mentioning(marker):
            os.kill(pid, signal.SIGKILL)


def _dump_dom(url: str, profile: Path, budget_ms: int) -> str:
    """The page's DOM after ``budget_ms`` of (virtual) time in headless chromium, on a fresh profile."""
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--no-first-run", "--disable-extensions", "--window-size=1920,1200", f"--user-data-dir={profile}",
               f"--virtual-time-budget={budget_ms}", "--dump-dom", url]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=120 + budget_ms / 1000)
        return out
    finally:
        stop_group(proc)


@pytest.fixture
def chromium():
    """Debian's chromium, or a skip that says so (asked first: no server starts for a test that skips)."""
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (make chromium installs Debian's)")
    return CHROMIUM


def test_comod_ui_opens_the_searchs_runs_table_in_a_browser(chromium, searched, ui, tmp_path):
    assert ui.url == (f"http://127.0.0.1:{ui.port}/#/experiments/{searched.experiment.experiment_id}/runs"
                      f"?viewStateShareKey=comod&workflowType=machine_learning")
    names = [searched.parent.info.run_name, *[c.info.run_name for c in searched.children]]
    dom = ""
    for attempt, budget in enumerate((15000, 30000, 60000)):  # a slow machine: more time, a fresh profile
        dom = _dump_dom(ui.url, tmp_path / f"profile{attempt}", budget)
        if all(f">{name}<" in dom for name in names):
            break
    missing = [name for name in names if f">{name}<" not in dom]
    assert not missing, f"run names missing from the page: {missing}\n{dom[-3000:]}"
    # the runs table in comod's view: its key metric columns and the kind are there without picking them
    for column in ("val/mean_f1", "test/mean_f1", "test/mean_recall", "test/mean_precision", "modulation.kind",
                   "Dataset"):
        assert column in dom, column
    assert "synthetic/attributes" in dom  # the runs' dataset inputs, in the Dataset column
    assert "comod.state" in dom and ">completed<" in dom  # each trial's state, a column of the view
    assert "share key" not in dom  # the saved view was found
    assert "comod: compare trials" in dom
    # the UI in model-training mode: its sidebar lists runs and the model registry, none of the GenAI
    # overview's pages (Overview, Observability, ...) nor its charts
    assert ">Model registry<" in dom
    for genai in (">Overview<", ">Observability<", ">Token Usage<", ">Prompts &amp; versions<"):
        assert genai not in dom, genai
    assert "MLflow collects usage data" not in dom
    assert "Welcome to MLflow" not in dom


def test_comod_ui_on_a_taken_port_says_why_in_one_line(tmp_path, empty_store):
    """The server's own log is off the terminal, so its reason to stop (uvicorn ends with status 0 when it
    cannot bind) comes back as one line of comod's, with a failing status."""
    import socket

    from searches import search_env

    home = tmp_path / "runs"
    home.mkdir()
    shutil.copy(empty_store, home / "mlflow.db")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "comod_platform.cli", "ui", "--port", str(port)],
                              env=search_env(home), capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr[-2000:]
    assert len(done.stdout.strip().splitlines()) == 1 and f"on http://127.0.0.1:{port}" in done.stdout
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"comod: error: the MLflow server did not start on http://127.0.0.1:{port}: ")
    assert "address already in use" in line and str(home / "ui.log") in line
