"""`comod dashboard N`: a real optuna-dashboard server on a real search's Optuna study.

The session's tiny search (search_spaces/tiny.yaml as it is, four trials: a real local Ray, Optuna in SQLite,
MLflow on SQLite, through `.venv/bin/comod`; the conftest's ``tiny_search``, which the UI test reads too); the
dashboard runs as `.venv/bin/comod dashboard N --port P` and is read through optuna-dashboard's own JSON API.
"""
from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from searches import COMOD, REPO, TINY, search_env, search_study
from servers import free_port

NAME = "tiny"
TRIALS = TINY["search"]["num_trials"]


@pytest.fixture(scope="module")
def search(tiny_search):
    assert tiny_search["name"] == NAME
    assert json.loads(tiny_search["done"].stdout)["trials"] == TRIALS
    home = tiny_search["home"]
    meta = json.loads((home / "searches" / NAME / "meta.json").read_text())
    return {"home": home, "env": search_env(home), "meta": meta, "trials": len(search_study(home, NAME).trials)}


def _get(url: str, timeout: float = 5.0):
    with urllib.request.urlopen(url, timeout=timeout) as response:
        body = response.read()
        return response.status, response.headers.get("Content-Type", ""), body


def _start(name: str, port: int, env: dict) -> subprocess.Popen:
    return subprocess.Popen([str(COMOD), "dashboard", name, "--port", str(port)], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_studies(proc: subprocess.Popen, port: int, timeout: float = 90.0) -> list[dict]:
    """Poll optuna-dashboard's /api/studies until it answers with a study."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"comod dashboard exited ({proc.returncode}): {proc.stderr.read()[-3000:]}")
        try:
            status, _, body = _get(f"http://127.0.0.1:{port}/api/studies")
            studies = json.loads(body)["study_summaries"]
            if status == 200 and studies:
                return studies
        except (OSError, ValueError):
            pass
        time.sleep(0.3)
    proc.kill()
    pytest.fail("optuna-dashboard did not list a study in time")


def _port_is_free(port: int) -> bool:
    with socket.socket() as probe:  # nothing listens any more
        if probe.connect_ex(("127.0.0.1", port)) == 0:
            return False
    with socket.socket() as again:  # and a server may listen there again (as any server binds, SO_REUSEADDR)
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            again.bind(("127.0.0.1", port))
            again.listen(1)
        except OSError:
            return False
    return True


def _stop(proc: subprocess.Popen, sig: int) -> tuple[int, str, str]:
    proc.send_signal(sig)
    try:
        out, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"comod dashboard did not stop on signal {sig}: {err[-2000:]}")
    return proc.returncode, out, err


def test_dashboard_serves_the_search_study_and_stops_on_sigterm(search):
    port = free_port()
    proc = _start(NAME, port, search["env"])
    try:
        studies = _wait_for_studies(proc, port)
        assert [s["study_name"] for s in studies] == [search["meta"]["study_name"]] == [NAME]
        assert studies[0]["directions"] == ["maximize"]
        study_id = studies[0]["study_id"]
        status, kind, body = _get(f"http://127.0.0.1:{port}/api/studies/{study_id}")
        detail = json.loads(body)
        assert status == 200 and detail["name"] == NAME
        assert len(detail["trials"]) == search["trials"] == TRIALS
        assert {p["name"] for p in detail["union_search_space"]} >= {"modulation.kind", "finetune.lr.controller"}
        status, kind, page = _get(f"http://127.0.0.1:{port}/dashboard/studies/{study_id}")
        assert status == 200 and kind.startswith("text/html")  # the page a browser opens
    finally:
        code, out, err = _stop(proc, signal.SIGTERM)
    url = f"http://127.0.0.1:{port}/dashboard/studies/{study_id}"
    assert out.splitlines()[0].startswith(f"Optuna dashboard of search {NAME} (study {NAME} in sqlite:///")
    assert url in out.splitlines()[0] and "Ctrl-C stops it" in out
    assert code == 0 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == f"comod: dashboard of search {NAME} stopped"
    assert _port_is_free(port)


def test_ctrl_c_stops_the_dashboard_cleanly(search):
    port = free_port()
    proc = _start(NAME, port, search["env"])
    try:
        _wait_for_studies(proc, port)
    finally:
        code, _, err = _stop(proc, signal.SIGINT)
    assert code == 0 and "Traceback" not in err and "interrupted" not in err, err
    assert _port_is_free(port)


def test_a_port_in_use_is_one_clear_message(search):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        done = subprocess.run([str(COMOD), "dashboard", NAME, "--port", str(port)], env=search["env"], cwd=REPO,
                              capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"comod: error: cannot listen on 127.0.0.1:{port}")
    assert "--port" in lines[0]


def test_an_unknown_search_is_one_clear_message(search):
    done = subprocess.run([str(COMOD), "dashboard", "nope"], env=search["env"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [f"comod: error: no search named 'nope' in "
                                                f"{search['home'] / 'searches'}; searches here: {NAME}"]


def test_without_the_extra_the_message_says_how_to_install_it(search):
    # optuna_dashboard made unimportable in this one process, as where the extra is not installed
    code = ("import sys; sys.modules['optuna_dashboard'] = None\n"
            "from comod_platform.cli import main\n"
            f"raise SystemExit(main(['dashboard', {NAME!r}]))")
    done = subprocess.run([sys.executable, "-c", code], env=search["env"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "optuna-dashboard, which is not installed" in lines[0]
    assert "pip install 'comod[dashboard]'" in lines[0]


def test_a_search_whose_study_database_is_gone_is_one_clear_message(search, tmp_path):
    home = tmp_path / "runs"
    shutil.copytree(search["home"] / "searches", home / "searches")
    (home / "searches" / NAME / "optuna.db").unlink()
    meta_file = home / "searches" / NAME / "meta.json"
    meta = json.loads(meta_file.read_text())
    meta["optuna_storage"] = f"sqlite:///{home / 'searches' / NAME / 'optuna.db'}"
    meta_file.write_text(json.dumps(meta))
    done = subprocess.run([str(COMOD), "dashboard", NAME], env=search_env(home), cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "has no Optuna database at" in lines[0], done.stderr
    assert not (home / "searches" / NAME / "optuna.db").exists()
