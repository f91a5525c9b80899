"""`comod search submit|status|logs|stop`: searches as Ray jobs.

The cluster tests start a real two-node Ray cluster on 127.0.0.1 (a head
with its dashboard, which serves the Jobs API, and one worker node, sharing
one temp dir that identifies every process they start) and a real `mlflow
server`, submit searches to it through the command line, and stop every
process afterwards. The other tests need no cluster: bad input, the shipped
wheel, and `comod search run --or-resume`.
"""
from __future__ import annotations

import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from comod_platform import jobs
from comod_platform.cli import main
from comod_platform.conventions import TAG_ROLE
from servers import MlflowServer, free_port, kill_processes_mentioning

REPO = Path(__file__).resolve().parents[2]
TINY = yaml.safe_load((REPO / "search_spaces" / "tiny.yaml").read_text())
BIN = Path(sys.executable).parent


def _dashboard_missing() -> str | None:
    try:
        import ray.dashboard.optional_deps  # noqa: F401
    except ImportError as err:
        return str(err)
    return None


needs_dashboard = pytest.mark.skipif(
    _dashboard_missing() is not None,
    reason=f"the Ray Jobs API is served by Ray's dashboard, which needs ray[default] "
           f"({_dashboard_missing()}); install the project with ray[default]")


def _write_search(folder: Path, name: str, experiment: dict | None = None, **search) -> Path:
    raw = json.loads(json.dumps(TINY))
    raw["search"].update({"num_trials": 3, "max_concurrent": 2, "scheduler": {"type": "fifo"}, **search})
    if experiment:
        raw["experiment"].update(experiment)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _clean_env(**extra) -> dict:
    drop = ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "COMOD_HOME", "COMOD_STORAGE", "COMOD_OPTUNA_STORAGE")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    # the test cluster runs without Ray's token authentication, whether or not ~/.ray/auth_token exists
    env.update(PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", PYTHONUNBUFFERED="1",
               RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled", **extra)
    return env


def _comod(args, env, timeout=300, **kwargs):
    return subprocess.run([sys.executable, "-m", "comod_platform.cli", *args], env=env, capture_output=True,
                          text=True, timeout=timeout, cwd=REPO, **kwargs)


# --- without a cluster ------------------------------------------------------------------------------


class _Quiet(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_error(404)

    def log_message(self, *args):
        pass


def test_bad_addresses_and_inputs_fail_with_one_clear_message(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    search = _write_search(tmp_path, "ok")
    closed = f"http://127.0.0.1:{free_port()}"

    def run(*argv):
        code = main(list(argv))
        return code, capsys.readouterr().err

    code, err = run("search", "submit", str(search), "--address", "127.0.0.1:6379")
    assert code == 2 and "not the URL of a Ray dashboard" in err and "http://HEAD:8265" in err
    code, err = run("search", "submit", str(search), "--address", closed, "--name", "ok")
    assert code == 1 and f"cannot reach the Ray dashboard at {closed}" in err and "ray status" in err
    for command in (["status", "ok", "--address", closed], ["logs", "ok", "--address", closed],
                    ["stop", "ok", "--address", closed]):
        code, err = run("search", *command)
        assert code == 1 and "cannot reach the Ray dashboard" in err, command
    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Quiet)  # something that is no Ray dashboard
    threading.Thread(target=web.serve_forever, daemon=True).start()
    try:
        code, err = run("search", "status", "ok", "--address", f"http://127.0.0.1:{web.server_address[1]}")
        assert code == 1 and "not as a Ray dashboard" in err and "port 8265" in err
    finally:
        web.shutdown()
    code, err = run("search", "logs", "ok")
    assert code == 2 and "--address http://HEAD:8265" in err and "RAY_ADDRESS" in err
    monkeypatch.setenv("RAY_ADDRESS", closed)  # a URL in $RAY_ADDRESS is the default address
    code, err = run("search", "stop", "ok")
    assert code == 1 and closed in err

    # the search file is checked first: nothing is contacted for a broken one
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump({**TINY, "space": {"modulation.noise_scale": {"type": "float", "low": 2,
                                                                                  "high": 1}}}))
    code, err = run("search", "submit", str(broken), "--address", closed)
    assert code == 2 and "space.modulation.noise_scale" in err and "cannot reach" not in err
    code, err = run("search", "submit", str(search), "--address", closed, "--env", "NOVALUE")
    assert code == 2 and "--env 'NOVALUE'" in err and "KEY=VALUE" in err
    code, err = run("search", "submit", str(search), "--address", closed, "--name", "no/slashes")
    assert code == 2 and "--name 'no/slashes'" in err
    code, err = run("search", "run", str(search), "--or-resume")
    assert code == 2 and "--or-resume needs" in err


def test_the_job_environment_and_entrypoint(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    monkeypatch.setenv("COMOD_OPTUNA_STORAGE", "postgresql://db/optuna")
    monkeypatch.delenv("COMOD_STORAGE", raising=False)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-forwarded-by-the-job")
    env = jobs.job_env(jobs.parse_env(["COMOD_HOME=/shared/runs", "A=b=c"]), storage="s3://bucket/p")
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert env["COMOD_OPTUNA_STORAGE"] == "postgresql://db/optuna"
    assert env["COMOD_STORAGE"] == "s3://bucket/p" and env["COMOD_HOME"] == "/shared/runs" and env["A"] == "b=c"
    assert "AWS_SECRET_ACCESS_KEY" not in env
    line = jobs.entrypoint("my-search", "wheel", "s3://bucket/p")
    assert line.startswith("python -m comod_platform.cli search run search.yaml --name my-search --or-resume")
    import shlex

    from comod_platform.cli import _parser

    parsed = _parser()[0].parse_args(shlex.split(line)[3:])  # the job's command, as comod reads it
    assert parsed.storage == "s3://bucket/p" and parsed.or_resume and parsed.name == "my-search"
    assert jobs.entrypoint("my-search", "image", None) == "comod search run search.yaml --name my-search --or-resume"


def test_the_shipped_wheel_is_this_code_without_dependencies_named_by_its_contents(tmp_path):
    wheel = jobs.build_wheel(tmp_path / "a")
    assert re.fullmatch(r"comod-0\.1\.0-0[0-9a-f]{16}-py3-none-any\.whl", wheel.name), wheel.name
    with zipfile.ZipFile(wheel) as zf:
        metadata = zf.read("comod-0.1.0.dist-info/METADATA").decode()
        shipped = zf.read("comod_platform/jobs.py")
        names = zf.namelist()
    assert "Requires-Dist" not in metadata and "Name: comod" in metadata
    assert shipped == Path(jobs.__file__).read_bytes()
    assert "comod/__init__.py" in names and not any("__pycache__" in n for n in names)
    assert jobs.build_wheel(tmp_path / "b").name == wheel.name  # same code, same package on the cluster
    # what every Ray node does with a wheel in py_modules: pip install --target, offline, nothing else
    target = tmp_path / "target"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", str(wheel),
                           f"--target={target}"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in target.iterdir()) == ["bin", "comod", "comod-0.1.0.dist-info", "comod_platform"]


def test_run_or_resume_resumes_an_existing_search_and_refuses_another_file(tmp_path, monkeypatch, capsys):
    from comod_platform import runner

    home = tmp_path / "runs"
    monkeypatch.setenv("COMOD_HOME", str(home))

    calls = []

    def fake(kind):
        def call(*args, **kwargs):
            calls.append((kind, args, kwargs))
            return {"name": "again", "trials": 1, "completed": 1, "pruned": 0, "failed": 0, "best": None,
                    "metric": "val/mean_f1"}
        return call

    monkeypatch.setattr(runner, "run_search", fake("run"))
    monkeypatch.setattr(runner, "resume_search", fake("resume"))
    search = _write_search(tmp_path, "again")
    assert main(["search", "run", str(search), "--name", "again", "--or-resume"]) == 0
    assert calls[-1][0] == "run" and calls[-1][2]["name"] == "again"

    folder = home / "searches" / "again"
    folder.mkdir(parents=True)
    shutil.copyfile(search, folder / "search.yaml")
    (folder / "meta.json").write_text("{}")
    assert main(["search", "run", str(search), "--name", "again", "--or-resume"]) == 0
    assert calls[-1][0] == "resume" and calls[-1][1] == ("again",)
    assert "[search] resuming search again" in capsys.readouterr().err

    other = _write_search(tmp_path, "other", num_trials=5)
    assert main(["search", "run", str(other), "--name", "again", "--or-resume"]) == 1
    assert "another search file" in capsys.readouterr().err and len(calls) == 2


# --- on a two-node cluster ----------------------------------------------------------------------


class Cluster:
    def __init__(self, temp_dir: str):
        self.temp_dir = temp_dir
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.dashboard_port}"
        self.env = _clean_env()

    def _ray(self, *args):
        command = [str(BIN / "ray"), "start", "--temp-dir", self.temp_dir, "--disable-usage-stats",
                   "--node-ip-address", "127.0.0.1", "--object-store-memory", str(200 * 1024 ** 2),
                   "--dashboard-agent-listen-port", str(free_port()), *args]
        done = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]

    def start(self) -> "Cluster":
        self._ray("--head", "--port", str(self.gcs_port), "--dashboard-host", "127.0.0.1", "--dashboard-port",
                  str(self.dashboard_port), "--include-dashboard", "true", "--num-cpus", "2",
                  "--ray-client-server-port", str(free_port()))
        self._ray("--address", f"127.0.0.1:{self.gcs_port}", "--num-cpus", "1")
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                self.client = jobs.connect(self.url)
                if len(jobs.alive_nodes(self.url)) == 2:
                    return self
            except jobs.JobsError:
                pass
            time.sleep(1)
        raise RuntimeError(f"the two-node cluster at {self.url} did not come up in time")

    def wait(self, submission_id: str, until=jobs.TERMINAL, timeout: float = 240):
        deadline = time.time() + timeout
        while time.time() < deadline:
            info = self.client.get_job_info(submission_id)
            if str(info.status.value) in until:
                return info
            time.sleep(1)
        logs = self.client.get_job_logs(submission_id)
        raise AssertionError(f"job {submission_id} still {info.status} after {timeout} s:\n{logs[-3000:]}")


def _kill_jobs_under(folder: str) -> None:
    """Job drivers run in their working_dir under the cluster's temp dir; their command line has no trace of it."""
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                if os.readlink(proc / "cwd").startswith(folder):
                    os.kill(int(proc.name), 9)
            except OSError:
                pass


@pytest.fixture(scope="module")
def cluster():
    if _dashboard_missing():
        pytest.skip(f"the Ray Jobs API needs ray[default] ({_dashboard_missing()})")
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")
    before = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"  # this process's own client, as the cluster's
    try:
        yield Cluster(temp_dir).start()
    finally:
        if before is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = before
        _kill_jobs_under(temp_dir)
        kill_processes_mentioning(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    if _dashboard_missing():
        pytest.skip("no cluster to track")
    server = MlflowServer(tmp_path_factory.mktemp("mlflow")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Path:
    """The runs folder and the storage of the cluster's jobs: both nodes share this machine's disk."""
    return tmp_path_factory.mktemp("shared")


def _submit(cluster, path: Path, name: str, shared: Path, tracking: str, storage: bool = True):
    env = _clean_env(MLFLOW_TRACKING_URI=tracking)
    if storage:
        env["COMOD_STORAGE"] = str(shared / "storage")
    return _comod(["search", "submit", str(path), "--address", cluster.url, "--name", name,
                   "--env", f"COMOD_HOME={shared / 'runs'}", "--env", "COMOD_DOWNLOAD=0"], env)


def _submission_id(done) -> str:
    assert done.returncode == 0, done.stderr[-3000:]
    return re.search(r"^submission id: (\S+)$", done.stdout, re.M).group(1)


@needs_dashboard
def test_a_submitted_search_runs_on_the_cluster_and_a_resubmission_resumes(cluster, mlflow_server, shared,
                                                                           tmp_path):
    path = _write_search(tmp_path, "onjob")
    first = _submit(cluster, path, "onjob", shared, mlflow_server.uri)
    sid = _submission_id(first)
    assert sid.startswith("comod-onjob-") and "comod search logs onjob" in first.stdout
    info = cluster.wait(sid)
    logs = cluster.client.get_job_logs(sid)
    assert str(info.status.value) == "SUCCEEDED", logs[-3000:]
    assert info.metadata["comod.search"] == "onjob"
    assert re.fullmatch(r"gcs://comod-0\.1\.0-0[0-9a-f]{16}-py3-none-any\.whl", info.runtime_env["py_modules"][0])
    job_env = info.runtime_env["env_vars"]
    assert job_env["MLFLOW_TRACKING_URI"] == mlflow_server.uri and job_env["COMOD_STORAGE"] == str(shared / "storage")

    env = _clean_env()
    status = _comod(["search", "status", "onjob", "--address", cluster.url], env)
    assert status.returncode == 0, status.stderr
    assert "SUCCEEDED" in status.stdout and sid in status.stdout and "[search]" in status.stdout
    shown = _comod(["search", "logs", "onjob", "--address", cluster.url], env)
    assert shown.returncode == 0 and "[search]" in shown.stdout

    client = MlflowClient(mlflow_server.uri)
    experiment = client.get_experiment_by_name("search/onjob")

    def runs():
        found = client.search_runs([experiment.experiment_id])
        return ([r for r in found if r.data.tags.get(TAG_ROLE) == "search"],
                [r for r in found if r.data.tags.get(TAG_ROLE) == "trial"])

    parents, children = runs()
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 3 and {c.info.status for c in children} == {"FINISHED"}

    # the same name again: the job finds the search in the runs folder and resumes it
    second = _submit(cluster, path, "onjob", shared, mlflow_server.uri)
    sid2 = _submission_id(second)
    assert sid2 != sid
    info = cluster.wait(sid2)
    logs = cluster.client.get_job_logs(sid2)
    assert str(info.status.value) == "SUCCEEDED", logs[-3000:]
    assert "[search] resuming search onjob" in logs
    parents, children = runs()
    assert len(parents) == 1 and len(children) == 3
    status = _comod(["search", "status", "onjob", "--address", cluster.url], env)
    assert sid2 in status.stdout  # the latest job of the search


@needs_dashboard
def test_a_cluster_of_two_nodes_without_shared_storage_is_refused(cluster, mlflow_server, shared, tmp_path):
    path = _write_search(tmp_path, "nostore")
    done = _submit(cluster, path, "nostore", shared, mlflow_server.uri, storage=False)
    assert done.returncode == 2, done.stderr
    assert "2 nodes" in done.stderr and "node-local" in done.stderr and "--storage s3://BUCKET/PREFIX" in done.stderr
    assert "Traceback" not in done.stderr
    assert not [j for j in cluster.client.list_jobs() if (j.metadata or {}).get("comod.search") == "nostore"]


@needs_dashboard
def test_stop_ends_a_running_job_and_a_followed_log_ends_with_it(cluster, mlflow_server, shared, tmp_path):
    longer = {"pretrain": {"epochs": 3, "steps_per_epoch": 40, "batch_size": 16}}
    path = _write_search(tmp_path, "halt", experiment=longer, num_trials=6)
    sid = _submission_id(_submit(cluster, path, "halt", shared, mlflow_server.uri))
    info = cluster.wait(sid, until=("RUNNING",) + jobs.TERMINAL, timeout=120)
    assert str(info.status.value) == "RUNNING", cluster.client.get_job_logs(sid)[-3000:]
    env = _clean_env()
    follow = subprocess.Popen([sys.executable, "-m", "comod_platform.cli", "search", "logs", "halt", "--address",
                               cluster.url, "--follow"], env=env, cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        twice = _submit(cluster, path, "halt", shared, mlflow_server.uri)  # one job per search at a time
        assert twice.returncode == 2 and f"has a job on the cluster already, {sid}" in twice.stderr
        stopped = _comod(["search", "stop", "halt", "--address", cluster.url], env)
        assert stopped.returncode == 0, stopped.stderr
        assert f"stopped job {sid}" in stopped.stdout and "STOPPED" in stopped.stdout
        assert "comod search submit SEARCH --name halt" in stopped.stderr
        out, err = follow.communicate(timeout=60)  # the log stream ends with the job
        assert follow.returncode == 0, err
        assert f"job {sid} is STOPPED" in err
    finally:
        if follow.poll() is None:
            follow.kill()
    assert str(cluster.client.get_job_info(sid).status.value) == "STOPPED"
    again = _comod(["search", "stop", "halt", "--address", cluster.url], env)
    assert again.returncode == 0 and "ended already (STOPPED)" in again.stdout
