"""The cluster recipes in cluster/.

Ray's cluster-launcher file passes Ray's own validation; the KubeRay, Compose
and Kubernetes manifests have what the platform needs and agree with each
other and with the image; every ``comod ...`` line they and the README give
parses with comod's own parser, and every ``mlflow server`` line with
MLflow's. Two recipes run for real: the Compose tracking service (its
PostgreSQL set up as the postgres image does, its init script, and its exact
``mlflow server`` command, with moto standing in for MinIO), and the local
multi-node Ray cluster of cluster/local/up.sh and down.sh. Every process
started here is stopped.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import glob
import io
import json
import os
import pwd
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from servers import free_port, kill_processes_mentioning

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
BIN = Path(sys.executable).parent


def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def dockerfile_env(name: str) -> str:
    match = re.search(rf"^ENV\s+{name}=(\S+)", (CLUSTER / "Dockerfile").read_text(), re.M)
    assert match, f"cluster/Dockerfile sets no ENV {name}"
    return match.group(1)


# ------------------------------------------------------------------ comod's and mlflow's own parsers

def _subparsers(parser: argparse.ArgumentParser):
    return next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)


def check_comod_line(line: str) -> str | None:
    """Parse a ``comod ...`` command line with comod's parser (built as ``main`` builds it). Returns
    what comod lacks (a subcommand or options) for lines it cannot have yet; fails on other errors."""
    from comod_platform.cli import _parser

    tokens = shlex.split(line, comments=True)
    assert tokens and tokens[0] == "comod", line
    parser = _parser()[0]
    node, path, rest = parser, ["comod"], tokens[1:]
    while (sub := _subparsers(node)) is not None:
        assert rest, f"{line!r}: no subcommand after {' '.join(path)}"
        if rest[0] not in sub.choices:
            return f"`{' '.join(path + [rest[0]])}`"
        node, path, rest = sub.choices[rest[0]], path + [rest[0]], rest[1:]
    unknown = sorted({t.split("=")[0] for t in rest if t.startswith("--")} - set(node._option_string_actions))
    if unknown:
        return f"`{' '.join(path)} {' '.join(unknown)}`"
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            parser.parse_args(tokens[1:])
    except SystemExit:
        pytest.fail(f"comod's parser rejects {line!r}: {err.getvalue().strip()}")
    return None


def check_comod_lines(lines: list[str], where: str) -> None:
    missing = {}
    for line in lines:
        lack = check_comod_line(line)
        if lack:
            missing.setdefault(lack, line)
    if missing:
        pytest.skip(f"comod does not have {', '.join(missing)} yet (used in {where}: "
                    f"{'; '.join(missing.values())}); every other command line parses")


def mlflow_server_params(args: list[str]) -> dict:
    """``mlflow server ARGS`` parsed by MLflow's own click command (unknown options fail)."""
    from mlflow.cli import cli

    return cli.commands["server"].make_context("server", list(args)).params


def allowed_hosts(params: dict) -> list[str]:
    return [h.strip() for h in params["allowed_hosts"].split(",")]


def host_allowed(params: dict, host: str) -> bool:
    from mlflow.server.security_utils import is_allowed_host_header

    return is_allowed_host_header(allowed_hosts(params), host)


def compose_mlflow_args(command: str) -> list[str]:
    """The tokens of compose.yaml's mlflow command after Compose's interpolation (``$$`` is a ``$``
    left to the container's shell; ``${VAR:-default}`` takes its default)."""
    text = re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: m.group(2), command.replace("$$", "\0"))
    tokens = shlex.split(text.replace("\0", "$"))
    assert tokens[:3] == ["exec", "mlflow", "server"], tokens[:3]
    return tokens[3:]


# ------------------------------------------------------------------ the cluster launcher

def test_launcher_config_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((CLUSTER / "ray/aws-gpu.yaml").read_text())
    validate_config(copy.deepcopy(raw))
    prepared = prepare_config(copy.deepcopy(raw))  # merged with Ray's AWS defaults, as `ray up` does
    validate_config(prepared)
    assert prepared["available_node_types"]["gpu"]["max_workers"] == raw["available_node_types"]["gpu"]["max_workers"]
    # the validator is real: Ray's schema rejects a fractional GPU count and an unknown key
    import jsonschema

    fractional = copy.deepcopy(raw)
    fractional["available_node_types"]["gpu"]["resources"]["GPU"] = 0.5
    with pytest.raises(jsonschema.ValidationError):
        validate_config(fractional)
    typo = {**copy.deepcopy(raw), "worker_start_commands": []}
    with pytest.raises(jsonschema.ValidationError):
        validate_config(typo)


def test_launcher_config_has_gpu_workers_the_image_and_the_team_settings():
    cfg = yaml.safe_load((CLUSTER / "ray/aws-gpu.yaml").read_text())
    types = cfg["available_node_types"]
    head, gpu = types[cfg["head_node_type"]], types["gpu"]
    assert gpu["resources"]["GPU"] >= 1 and gpu["node_config"]["InstanceType"].startswith(("g", "p"))
    assert gpu["min_workers"] == 0 < gpu["max_workers"] <= cfg["max_workers"]
    assert head["resources"]["CPU"] == 0
    head_start = " ".join(cfg["head_start_ray_commands"])
    assert "--num-cpus=0" in head_start and "--dashboard-host=0.0.0.0" in head_start
    assert "$RAY_HEAD_IP:6379" in " ".join(cfg["worker_start_ray_commands"])

    image = cfg["docker"]["image"]
    kuberay = one(load_docs(CLUSTER / "kuberay/raycluster.yaml"), "RayCluster")
    assert image == kuberay["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    home = dockerfile_env("COMOD_HOME")
    assert any(opt.endswith(f":{home}") for opt in cfg["docker"]["head_run_options"]), "COMOD_HOME is not on the host"

    # comod.env reaches every node: mounted, then read by every later shell (and so by `ray start`)
    (remote, local), = cfg["file_mounts"].items()
    assert (ROOT / local).parent.is_dir() and f"{remote}/comod.env" in " ".join(cfg["setup_commands"]).replace("~", "/home/ray")
    ignored = (CLUSTER / ".gitignore").read_text().split()
    assert Path(local).relative_to("cluster").as_posix() + "/" in ignored, "the filled-in settings would be committed"
    example = dict(line.split("=", 1) for line in (CLUSTER / "ray/comod.env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    assert example["MLFLOW_TRACKING_URI"].startswith("http")
    assert example["COMOD_OPTUNA_STORAGE"].startswith("postgresql+psycopg2://")
    assert example["COMOD_STORAGE"].startswith("s3://")


# ------------------------------------------------------------------ the image

def test_dockerfile_pins_cuda_torch_on_rays_image_and_installs_the_project():
    import ray
    import torch

    text = (CLUSTER / "Dockerfile").read_text()
    base = re.search(r"^ARG RAY_IMAGE=(\S+)", text, re.M).group(1)
    match = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py(\d+)-cu(\d+)", base)
    assert match, base
    assert match.group(1) == ray.__version__ and match.group(2) == "311"
    assert re.search(r"^FROM \$\{RAY_IMAGE\}", text, re.M)
    index = re.search(r"^ARG TORCH_INDEX_URL=(\S+)", text, re.M).group(1)
    assert index == f"https://download.pytorch.org/whl/cu{match.group(3)}", "torch's CUDA differs from the image's"
    makefile = (ROOT / "Makefile").read_text()
    for package in ("torch", "torchvision"):
        pinned = re.search(rf"\b{package}==(\S+)", text).group(1)
        assert pinned == re.search(rf"\b{package}==(\S+)", makefile).group(1), f"{package} differs from the Makefile's"
    assert "torch==2.14.1" in text and "torchvision==0.29.1" in text
    assert torch.__version__.split("+")[0] == "2.14.1"
    assert re.search(r'^COPY .*\. /src$', text, re.M) and 'pip install --no-cache-dir "/src[cluster]"' in text
    assert dockerfile_env("COMOD_HOME") == "/comod-home"

    ignore = (CLUSTER / "Dockerfile.dockerignore").read_text().split()
    for heavy in (".venv", "comod-runs", ".git", "data"):
        assert heavy in ignore, f"{heavy} would go into the build context"
    for needed in ("comod", "platform", "search_spaces", "pyproject.toml", "README.md"):
        assert needed not in ignore, f"the image needs {needed}"


def test_pyproject_cluster_extra_has_the_drivers_the_image_needs():
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"].get("optional-dependencies", {})
    if "cluster" not in extras:
        pytest.skip("pyproject.toml has no `cluster` extra yet (cluster/Dockerfile installs /src[cluster])")
    names = {re.split(r"[<>=\[ ;]", req, 1)[0].lower() for req in extras["cluster"]}
    assert {"psycopg2-binary", "boto3"} <= names


# ------------------------------------------------------------------ KubeRay

def test_kuberay_raycluster_has_a_gpu_group_the_settings_and_a_persistent_runs_folder():
    import ray

    docs = load_docs(CLUSTER / "kuberay/raycluster.yaml")
    cluster = one(docs, "RayCluster")
    assert cluster["apiVersion"] == "ray.io/v1" and cluster["spec"]["rayVersion"] == ray.__version__
    head = cluster["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    pod = head["template"]["spec"]
    container = pod["containers"][0]

    home = dockerfile_env("COMOD_HOME")
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    assert env.get("COMOD_HOME", home) == home
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == home)
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    one(docs, "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])

    sources = container["envFrom"]
    settings = one(docs, "ConfigMap", next(s["configMapRef"]["name"] for s in sources if "configMapRef" in s))
    assert settings["data"]["COMOD_STORAGE"].startswith("s3://")
    assert "COMOD_OPTUNA_STORAGE" not in settings["data"], "a database password belongs in a Secret"
    assert any("secretRef" in s for s in sources), "the head gets COMOD_OPTUNA_STORAGE from no Secret"

    # the in-cluster MLflow URI is one the k8s MLflow server accepts (MLflow checks the Host header)
    uri = settings["data"]["MLFLOW_TRACKING_URI"]
    mlflow_args = one(load_docs(CLUSTER / "tracking/k8s/mlflow.yaml"), "Deployment")[
        "spec"]["template"]["spec"]["containers"][0]["args"]
    assert host_allowed(mlflow_server_params(mlflow_args), uri.split("://", 1)[1].rstrip("/"))

    (group,) = cluster["spec"]["workerGroupSpecs"]
    worker = group["template"]["spec"]["containers"][0]
    assert int(worker["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert group["minReplicas"] == 0 < group["maxReplicas"]
    assert worker["image"] == container["image"]
    assert not any("secretRef" in s for s in worker.get("envFrom", [])), "workers need no database password"


def test_kuberay_rayjob_resumes_the_search_on_the_cluster():
    cluster = one(load_docs(CLUSTER / "kuberay/raycluster.yaml"), "RayCluster")
    job = one(load_docs(CLUSTER / "kuberay/rayjob-search.yaml"), "RayJob")
    assert job["apiVersion"] == "ray.io/v1"
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    steps = [s.strip() for s in job["spec"]["entrypoint"].split("&&")]
    assert steps[0] == "cd /src" and re.search(r"^COPY .* /src$", (CLUSTER / "Dockerfile").read_text(), re.M)
    command = steps[-1]
    tokens = shlex.split(command)
    assert tokens[:3] == ["comod", "search", "run"] and "--or-resume" in tokens
    name = tokens[tokens.index("--name") + 1]
    assert name == "celeba-1" and job["spec"]["metadata"]["comod.search"] == name
    from comod_platform.searchfile import load_search

    # the file the image holds at /src/search_spaces: a valid search, for GPUs
    assert load_search(ROOT / tokens[3]).search.resources.gpu > 0
    check_comod_lines([command], "cluster/kuberay/rayjob-search.yaml")


# ------------------------------------------------------------------ the README

def readme_commands() -> list[str]:
    text = (CLUSTER / "README.md").read_text()
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line.startswith("comod "):
                lines.append(line)
    # whole commands quoted in the text (not names of commands, nor elided ones)
    lines += [span for span in re.findall(r"`([^`\n]+)`", text)
              if span.startswith("comod ") and "..." not in span and len(shlex.split(span)) >= 4]
    return lines


def test_readme_names_the_settings_and_its_commands_parse():
    text = (CLUSTER / "README.md").read_text()
    for name in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "COMOD_OPTUNA_STORAGE", "COMOD_STORAGE", "AWS_ENDPOINT_URL",
                 "COMOD_HOME", "search.max_retries", "ray up cluster/ray/aws-gpu.yaml",
                 "kubectl apply -n comod -f cluster/kuberay/raycluster.yaml", "cluster/local/up.sh"):
        assert name in text, f"cluster/README.md does not mention {name}"
    default = re.search(r"`search\.max_retries` times \(in the search file, default (\d+)\)", text)
    assert default
    from comod_platform.searchfile import SearchSettings

    if hasattr(SearchSettings, "max_retries"):
        assert SearchSettings.max_retries == int(default.group(1))
    commands = readme_commands()
    used = {tuple(shlex.split(c)[1:3]) for c in commands}
    for sub in ("run", "submit", "status", "logs", "stop", "resume"):
        assert ("search", sub) in used, f"the README shows no `comod search {sub}`"
    check_comod_lines(commands, "cluster/README.md")


# ------------------------------------------------------------------ the tracking service: files

def test_tracking_compose_and_k8s_run_mlflow_on_postgres_with_proxied_s3_artifacts():
    compose = yaml.safe_load((CLUSTER / "tracking/compose.yaml").read_text())
    services = compose["services"]
    assert {"postgres", "minio", "buckets", "mlflow"} <= set(services)
    params = mlflow_server_params(compose_mlflow_args(services["mlflow"]["command"][0]))
    assert re.fullmatch(r"postgresql\+psycopg2://mlflow:\$\{POSTGRES_PASSWORD\}@postgres:5432/mlflow",
                        params["backend_store_uri"])
    assert params["artifacts_destination"] == "s3://mlflow-artifacts" and params["serve_artifacts"]
    assert "local/mlflow-artifacts" in services["buckets"]["entrypoint"][-1]
    assert services["mlflow"]["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    for host in ("mlflow:5000", "localhost:5000", "127.0.0.1:5000", "localhost"):
        assert host_allowed(params, host), host  # the Host headers of clients in and beside Compose
    assert not host_allowed(params, "attacker.example.com:5000")
    assert "./initdb:/docker-entrypoint-initdb.d:ro" in services["postgres"]["volumes"]
    assert services["postgres"]["environment"]["POSTGRES_DB"] == "mlflow"

    k8s = [d for path in sorted((CLUSTER / "tracking/k8s").glob("*.yaml")) for d in load_docs(path)]
    deployment = one(k8s, "Deployment", "mlflow")
    one(k8s, "Service", "mlflow")
    statefulset = one(k8s, "StatefulSet", "postgres")
    one(k8s, "Service", "postgres")
    secret = one(k8s, "Secret")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["mlflow", "server"]
    k8s_params = mlflow_server_params(container["args"])
    assert k8s_params["backend_store_uri"] == "postgresql+psycopg2://mlflow:$(POSTGRES_PASSWORD)@postgres:5432/mlflow"
    assert k8s_params["artifacts_destination"] == "s3://mlflow-artifacts" and k8s_params["serve_artifacts"]
    for host in ("mlflow:5000", "mlflow.comod.svc.cluster.local:5000", "localhost:5000"):
        assert host_allowed(k8s_params, host), host
    assert not host_allowed(k8s_params, "attacker.example.com:5000")
    assert container["envFrom"] == [{"secretRef": {"name": secret["metadata"]["name"]}}]
    pg_env = statefulset["spec"]["template"]["spec"]["containers"][0]["env"]
    for ref in (e["valueFrom"]["secretKeyRef"] for e in pg_env if "valueFrom" in e):
        assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"]
    for key in ("POSTGRES_PASSWORD", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert key in secret["stringData"]
    initdb = one(k8s, "ConfigMap", "postgres-initdb")
    assert initdb["data"]["create-optuna-db.sh"] == (CLUSTER / "tracking/initdb/create-optuna-db.sh").read_text()


# ------------------------------------------------------------------ the tracking service, for real

def _postgres_bindir() -> Path | None:
    found = shutil.which("initdb")
    if found and Path(found).with_name("postgres").exists():
        return Path(found).parent
    folders = sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    return next((Path(f) for f in folders if Path(f, "initdb").exists() and Path(f, "postgres").exists()), None)


def _stop(proc: subprocess.Popen | None, first: int = signal.SIGTERM) -> None:
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, first)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


def _wait_for(check, what: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{what} exited with status {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            if check():
                return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(0.3)
    pytest.fail(f"{what} did not come up within {timeout:.0f} s: {log.read_text()[-2000:]}")


def _http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2):
        return True


def test_compose_tracking_service_works_as_written(monkeypatch):
    """PostgreSQL set up as the postgres image does (superuser `mlflow` with a password, database
    `mlflow`, then the init script), the bucket the `buckets` service makes (on moto), and MLflow
    started with compose.yaml's own command: a client with no storage credentials logs an artifact
    that lands in the bucket, and Optuna uses the database at the URL the file gives."""
    bindir = _postgres_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries (initdb, postgres) not found: apt-get install postgresql")
    pytest.importorskip("moto.server", reason="moto[server] (the dev extra) stands in for MinIO")
    pytest.importorskip("psycopg2")
    import boto3
    import optuna
    import sqlalchemy.exc
    from mlflow.tracking import MlflowClient

    owner: dict = {}
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        try:
            entry = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no `postgres` user to run PostgreSQL as")
        owner = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
    compose = yaml.safe_load((CLUSTER / "tracking/compose.yaml").read_text())
    root = Path(tempfile.mkdtemp(prefix="trk", dir="/tmp"))
    pg_pass, optuna_pass = "pg-pass_1", "opt-pass_2"
    pg_port, mlflow_port, s3_port = free_port(), free_port(), free_port()
    procs: list[subprocess.Popen] = []
    try:
        if owner:
            os.chown(root, owner["user"], owner["group"])
        (root / "pw").write_text(pg_pass)
        subprocess.run([str(bindir / "initdb"), "-D", str(root / "data"), "-U", "mlflow", f"--pwfile={root / 'pw'}",
                        "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--locale=C", "--no-sync"],
                       check=True, capture_output=True, timeout=120, **owner)
        pg_log = root / "postgres.log"
        with open(pg_log, "w") as log:
            if owner:
                os.chown(pg_log, owner["user"], -1)
            procs.append(subprocess.Popen(
                [str(bindir / "postgres"), "-D", str(root / "data"), "-p", str(pg_port), "-k", str(root),
                 "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True, **owner))
        pg_env = {"PATH": f"{bindir}:{os.environ['PATH']}", "PGHOST": str(root), "PGPORT": str(pg_port)}
        _wait_for(lambda: subprocess.run(["psql", "-U", "mlflow", "-d", "postgres", "-c", "select 1"], env=pg_env,
                                         capture_output=True, timeout=10, **owner).returncode == 0,
                  "postgres", procs[0], pg_log, 60)
        subprocess.run(["psql", "-U", "mlflow", "-d", "postgres", "-c", "CREATE DATABASE mlflow"], env=pg_env,
                       check=True, capture_output=True, timeout=30, **owner)
        init = subprocess.run(["sh", str(CLUSTER / "tracking/initdb/create-optuna-db.sh")], capture_output=True,
                              text=True, timeout=60, **owner,
                              env={**pg_env, "POSTGRES_USER": "mlflow", "POSTGRES_DB": "mlflow",
                                   "OPTUNA_PASSWORD": optuna_pass})
        assert init.returncode == 0, init.stderr

        # moto in MinIO's place, with the bucket the `buckets` service makes
        s3_log = root / "moto.log"
        fake_aws = {"AWS_ACCESS_KEY_ID": "minio", "AWS_SECRET_ACCESS_KEY": "minio-secret", "AWS_DEFAULT_REGION": "us-east-1"}
        clean = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_"))}
        with open(s3_log, "w") as log:
            procs.append(subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(s3_port)],
                                          stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                          env={**clean, **fake_aws}))
        endpoint = f"http://127.0.0.1:{s3_port}"
        _wait_for(lambda: _http_ok(f"{endpoint}/moto-api/"), "moto", procs[-1], s3_log, 60)
        s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=fake_aws["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=fake_aws["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")
        for bucket in re.findall(r"mc mb --ignore-existing local/([\w.-]+)", compose["services"]["buckets"]["entrypoint"][-1]):
            s3.create_bucket(Bucket=bucket)

        # compose.yaml's mlflow command, with the hosts and ports of this machine
        args = compose_mlflow_args(compose["services"]["mlflow"]["command"][0])
        here = {"--host": "127.0.0.1", "--port": str(mlflow_port)}
        args = [here.get(prev, arg) for prev, arg in zip([""] + args, args)]
        args = [a.replace("${POSTGRES_PASSWORD}", pg_pass).replace("@postgres:5432", f"@127.0.0.1:{pg_port}")
                for a in args]
        service_env = compose["services"]["mlflow"]["environment"]
        assert set(service_env) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_S3_ENDPOINT_URL",
                                    "POSTGRES_PASSWORD"}
        mlflow_log = root / "mlflow.log"
        with open(mlflow_log, "w") as log:
            procs.append(subprocess.Popen([sys.executable, "-m", "mlflow", "server", *args], cwd=root, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True,
                                          env={**clean, **fake_aws, "MLFLOW_S3_ENDPOINT_URL": endpoint,
                                               "POSTGRES_PASSWORD": pg_pass}))
        uri = f"http://127.0.0.1:{mlflow_port}"
        _wait_for(lambda: _http_ok(f"{uri}/health"), "mlflow server", procs[-1], mlflow_log, 120)

        # a client with no storage settings at all
        for key in list(os.environ):
            if key.startswith(("AWS_", "MLFLOW_S3_")):
                monkeypatch.delenv(key)
        client = MlflowClient(tracking_uri=uri)
        experiment = client.create_experiment("search/compose-check")
        assert client.get_experiment(experiment).artifact_location.startswith("mlflow-artifacts:")
        run = client.create_run(experiment)
        client.log_param(run.info.run_id, "modulation.kind", "stochastic")
        client.log_text(run.info.run_id, "proxied", "report.md")
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket="mlflow-artifacts").get("Contents", [])]
        assert any(k.endswith(f"{run.info.run_id}/artifacts/report.md") for k in keys), keys

        # COMOD_OPTUNA_STORAGE as compose.yaml tells clients to set it
        template = re.search(r"COMOD_OPTUNA_STORAGE=(\S+)", (CLUSTER / "tracking/compose.yaml").read_text()).group(1)
        url = template.replace("OPTUNA_PASSWORD", optuna_pass).replace("TRACKING_HOST:5432", f"127.0.0.1:{pg_port}")
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(storage=url, study_name="compose-check", direction="maximize")
        study.optimize(lambda t: t.suggest_float("x", 0.0, 1.0), n_trials=2)
        assert len(optuna.load_study(study_name="compose-check", storage=url).trials) == 2
        with pytest.raises(sqlalchemy.exc.OperationalError):
            optuna.create_study(storage=url.replace(optuna_pass, "wrong"), study_name="nope")
    finally:
        for proc in reversed(procs):  # PostgreSQL (first) stops at once on SIGINT, whoever is connected
            _stop(proc, signal.SIGINT if proc is procs[0] else signal.SIGTERM)
        kill_processes_mentioning(str(root))
        shutil.rmtree(root, ignore_errors=True)


# ------------------------------------------------------------------ the local multi-node cluster

def _dashboard_deps() -> bool:
    try:
        import ray.dashboard.optional_deps  # noqa: F401
    except ImportError:
        return False
    return True


def _running_mentioning(text: str) -> set[int]:
    """Live (not zombie) processes whose command line mentions ``text`` with a path boundary after it."""
    found = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace") + " "
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z" and any(f"{text}{end}" in cmdline for end in ("/", " ", "=")):
            found.add(int(proc.name))
    return found


def _descendants(pids: set[int]) -> set[int]:
    parent = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                parent[int(proc.name)] = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
    found, grew = set(pids), True
    while grew:
        grew = False
        for pid, ppid in parent.items():
            if ppid in found and pid not in found:
                found.add(pid)
                grew = True
    return found


def _alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _local_env(temp_dir: str, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and not k.startswith(("COMOD_LOCAL_", "RAY_AUTH"))}
    env.update({"PATH": f"{BIN}:{env.get('PATH', '')}", "COMOD_LOCAL_TEMP_DIR": temp_dir,
                "COMOD_LOCAL_OBJECT_STORE_MB": "100", "COMOD_LOCAL_STOP_GRACE_S": "5"})
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _script(name: str, env: dict, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(CLUSTER / "local" / name)], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


@pytest.mark.parametrize("temp_dir, message", [("relative/dir", "absolute path"),
                                                ("/tmp/" + "x" * 60, "keep it under 40")])
def test_local_up_refuses_a_bad_temp_dir_before_starting_anything(temp_dir, message):
    result = _script("up.sh", _local_env(temp_dir, COMOD_LOCAL_DASHBOARD="false"), timeout=60)
    assert result.returncode != 0 and message in result.stderr
    assert not _running_mentioning(temp_dir) and not Path(temp_dir).exists()


@pytest.mark.parametrize("temp_dir", ["/", "/tmp", "/tmp/", "/tmp//", "/tmp/x/..", "//"])
def test_local_down_refuses_a_temp_dir_that_names_everything(temp_dir):
    """down.sh stops every process mentioning its temp dir: / or /tmp would be every process here."""
    bystander = subprocess.Popen(["sh", "-c", "sleep 60", "/tmp/bystander"], start_new_session=True)
    try:
        result = _script("down.sh", _local_env(temp_dir), timeout=60)
        assert result.returncode == 1 and "would match processes that are not the cluster's" in result.stderr
        assert bystander.poll() is None, "down.sh stopped a process of something else"
    finally:
        bystander.kill()
        bystander.wait()


def test_tracking_services_publish_on_loopback_or_the_cluster_network_only():
    compose = yaml.safe_load((CLUSTER / "tracking/compose.yaml").read_text())
    published = {name: service.get("ports", []) for name, service in compose["services"].items()}
    assert {name for name, ports in published.items() if ports} == {"postgres", "minio", "mlflow"}
    for name, ports in published.items():
        for port in ports:
            # HOST:PUBLISHED:TARGET with the host from .env, loopback unless set: never all interfaces
            assert port.startswith("${TRACKING_BIND_ADDRESS:-127.0.0.1}:"), (name, port)
    example = (CLUSTER / "tracking/tracking.env.example").read_text()
    assert re.search(r"^TRACKING_BIND_ADDRESS=127\.0\.0\.1$", example, re.M)
    assert "basic-auth" in (CLUSTER / "tracking/compose.yaml").read_text()  # how to add MLflow's authentication
    for manifest, name in (("mlflow.yaml", "mlflow"), ("postgres.yaml", "postgres")):
        service = one(load_docs(CLUSTER / "tracking/k8s" / manifest), "Service", name)
        assert service["spec"].get("type", "ClusterIP") == "ClusterIP", manifest


def test_local_up_without_rays_dashboard_says_what_to_install():
    if _dashboard_deps():
        pytest.skip("ray[default] is installed here: the dashboard starts")
    temp_dir = tempfile.mkdtemp(prefix="cr-", dir="/tmp")
    try:
        result = _script("up.sh", _local_env(temp_dir), timeout=60)
        assert result.returncode != 0 and "ray[default]" in result.stderr and "COMOD_LOCAL_DASHBOARD=false" in result.stderr
        assert not _running_mentioning(temp_dir)
    finally:
        kill_processes_mentioning(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def local_cluster():
    """cluster/local/up.sh with two worker nodes of one logical GPU each, on free ports and a private
    temp dir (with the dashboard where ray[default] is installed); always torn down."""
    temp_dir = tempfile.mkdtemp(prefix="cr-", dir="/tmp")
    ports = {"port": free_port(), "dashboard": free_port(), "agent": free_port()}
    dashboard = _dashboard_deps()
    env = _local_env(temp_dir, COMOD_LOCAL_WORKERS=2, COMOD_LOCAL_WORKER_CPUS=1, COMOD_LOCAL_WORKER_GPUS=1,
                     COMOD_LOCAL_PORT=ports["port"], COMOD_LOCAL_DASHBOARD_PORT=ports["dashboard"],
                     COMOD_LOCAL_AGENT_PORT=ports["agent"], COMOD_LOCAL_CLIENT_PORT=free_port(),
                     COMOD_LOCAL_DASHBOARD=str(dashboard).lower())
    try:
        up = _script("up.sh", env)
        assert up.returncode == 0, f"up.sh failed: {up.stderr[-3000:]}"
        yield {"temp_dir": temp_dir, "env": env, "gcs": f"127.0.0.1:{ports['port']}",
               "dashboard": f"http://127.0.0.1:{ports['dashboard']}" if dashboard else None, "up": up}
    finally:
        _script("down.sh", env, timeout=60)
        kill_processes_mentioning(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


NODES_PROBE = """
import json, sys, time, ray
ray.init(address=sys.argv[1], log_to_driver=False)
deadline = time.time() + 60
while True:
    nodes = [n for n in ray.nodes() if n["Alive"]]
    if len(nodes) >= 3 or time.time() > deadline:
        break
    time.sleep(0.5)

@ray.remote(num_cpus=1, num_gpus=1)
def where():
    return ray.get_runtime_context().get_node_id()

placed = ray.get([where.remote() for _ in range(2)], timeout=120)
print(json.dumps({"nodes": [{"id": n["NodeID"], "resources": n["Resources"]} for n in nodes], "placed": placed}))
ray.shutdown()
"""


def test_local_cluster_has_a_head_and_gpu_workers(local_cluster):
    out = local_cluster["up"].stdout
    assert f"--address {local_cluster['gcs']}" in out and local_cluster["temp_dir"] in out
    probe = subprocess.run([sys.executable, "-c", NODES_PROBE, local_cluster["gcs"]], env=local_cluster["env"],
                           capture_output=True, text=True, timeout=180, cwd=local_cluster["temp_dir"])
    assert probe.returncode == 0, probe.stderr[-3000:]
    seen = json.loads(probe.stdout.strip().splitlines()[-1])
    nodes = seen["nodes"]
    assert len(nodes) == 3, nodes
    heads = [n for n in nodes if "node:__internal_head__" in n["resources"]]
    assert len(heads) == 1 and heads[0]["resources"].get("CPU", 0) == 0
    workers = {n["id"] for n in nodes} - {heads[0]["id"]}
    assert sum(n["resources"].get("GPU", 0) for n in nodes) == 2
    assert set(seen["placed"]) <= workers, "a GPU task ran off the worker nodes"

    again = _script("up.sh", local_cluster["env"], timeout=60)
    assert again.returncode != 0 and "already uses" in again.stderr


def test_local_cluster_serves_the_jobs_api(local_cluster):
    if local_cluster["dashboard"] is None:
        pytest.skip("ray[default] is not installed here, so the local cluster runs without its dashboard "
                    "(the Jobs API); the project's dependencies should include ray[default]")
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(local_cluster["dashboard"])
    assert isinstance(client.list_jobs(), list)
    job = client.submit_job(entrypoint="python -c \"import ray; ray.init(); "
                                       "print('alive nodes:', sum(n['Alive'] for n in ray.nodes()))\"")
    deadline = time.time() + 90
    while (status := client.get_job_status(job)) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        assert time.time() < deadline, f"job {job} still {status}"
        time.sleep(1)
    assert status == JobStatus.SUCCEEDED, client.get_job_logs(job)
    assert "alive nodes: 3" in client.get_job_logs(job)


def test_local_down_stops_exactly_that_cluster(local_cluster):
    temp_dir = local_cluster["temp_dir"]
    started = _descendants(_running_mentioning(temp_dir))
    assert len(started) >= 6, started  # GCS, raylets and the rest, for three nodes
    # a bystander whose command line mentions a longer path with the same start
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", temp_dir + "x"],
                                 start_new_session=True)
    try:
        down = _script("down.sh", local_cluster["env"], timeout=60)
        assert down.returncode == 0 and "stopped" in down.stdout, down.stderr
        deadline = time.time() + 10
        while (left := {p for p in started if _alive(p)}) and time.time() < deadline:
            time.sleep(0.2)
        assert not left, f"still running after down.sh: {left}"
        assert bystander.poll() is None, "down.sh stopped a process of something else"
        assert not (Path(temp_dir) / "comod-local.env").exists()
        assert "no local cluster" in _script("down.sh", local_cluster["env"], timeout=60).stdout
    finally:
        bystander.kill()
        bystander.wait(5)
