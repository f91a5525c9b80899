"""Searches submitted to a Ray cluster as Ray jobs, through the Ray Jobs API.

``submit`` checks the search file here, then submits a job whose entrypoint is ``comod search run search.yaml
--name N --or-resume`` (:func:`runner.run_or_resume`): a resubmitted job of the same name continues the search
instead of starting over. The search file travels in a small ``working_dir``; with ``ship="wheel"`` the project's
own wheel (:mod:`wheel`) travels in ``py_modules``, so the cluster runs exactly the code that was submitted; with
``ship="image"`` the cluster's image provides it. Every job carries the metadata ``{"comod.search": N}``;
``status``, ``logs`` and ``stop`` find a search's latest job by it.
"""
from __future__ import annotations

import asyncio
import os
import re
import shlex
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable
from urllib.parse import urlparse

from comod_platform.errors import EXIT_FAILED, EXIT_USAGE
from comod_platform.wheel import WheelError, build_wheel

SEARCH_KEY = "comod.search"
FORWARDED_ENV = ("MLFLOW_TRACKING_URI", "COMOD_OPTUNA_STORAGE", "COMOD_STORAGE")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class JobsError(RuntimeError):
    """A problem with a cluster job; the message says what and how to fix it; ``code`` is the exit status."""

    def __init__(self, message: str, code: int = EXIT_FAILED):
        super().__init__(message)
        self.code = code


def dashboard_address(address: str | None) -> str:
    """The Ray dashboard's URL: ``address``, else ``$RAY_ADDRESS`` when that is an http(s) URL."""
    env = os.environ.get("RAY_ADDRESS", "")
    if not address and not env.startswith(("http://", "https://")):
        hint = f" ($RAY_ADDRESS is {env!r}, not a dashboard URL)" if env else ""
        raise JobsError(f"no cluster address{hint}: give --address http://HEAD:8265, the Ray dashboard of the "
                        f"cluster's head node, or set RAY_ADDRESS to it", EXIT_USAGE)
    address = address or env
    parsed = urlparse(address)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise JobsError(f"--address {address!r} is not the URL of a Ray dashboard; jobs are submitted to the "
                        f"head node's dashboard, e.g. --address http://HEAD:8265 (the port of "
                        f"`ray start --head --dashboard-port`, 8265 by default)", EXIT_USAGE)
    return address.rstrip("/")


@contextmanager
def _requests(address: str, refused: Callable[[Exception], str]):
    """Requests to the Ray dashboard at ``address``; a failure is one line: unreachable, or ``refused(err)``."""
    try:
        yield
    except OSError:  # requests' and aiohttp's connection errors are OSErrors
        raise JobsError(f"cannot reach the Ray dashboard at {address}; check that the cluster is up "
                        f"(`ray status` on its head node) and that its dashboard listens on that host and port "
                        f"(`ray start --head --dashboard-host 0.0.0.0 --dashboard-port 8265`; "
                        f"`curl {address}/api/version` should answer)") from None
    except Exception as err:  # noqa: BLE001 - Ray's SDK raises RuntimeError, and its own errors for tokens
        raise JobsError(refused(err)) from None


def connect(url: str):
    """A ``JobSubmissionClient`` for the cluster whose dashboard is at ``url`` (checked: it answers)."""
    from ray.job_submission import JobSubmissionClient

    # one that answers, but refuses: a version or an authentication token
    with _requests(url, lambda err: f"{url} answers, but not as a Ray dashboard that takes jobs ({err}); check "
                   f"the address: the head node's dashboard, port 8265 unless `ray start --dashboard-port` says "
                   f"otherwise"):
        return JobSubmissionClient(url)


def _call(address: str, what: str, fn, *args):
    """``fn(*args)``, a request to the dashboard."""
    with _requests(address, lambda err: f"the Ray cluster at {address} refused to {what}: {err}"):
        return fn(*args)


def alive_nodes(address: str) -> list:
    from ray.util.state import list_nodes

    try:
        return list_nodes(address=address, filters=[("state", "=", "ALIVE")], timeout=30,
                          raise_on_missing_output=False)
    except Exception as err:  # noqa: BLE001 - the state API raises several kinds; all mean the same here
        raise JobsError(f"cannot list the nodes of the Ray cluster at {address} ({err}); check the cluster "
                        f"with `ray status` on its head node") from None


def parse_env(pairs: Iterable[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not _ENV_KEY.match(key):
            raise JobsError(f"--env {pair!r}: expected KEY=VALUE with KEY a variable name, "
                            f"e.g. --env COMOD_HOME=/shared/comod-runs", EXIT_USAGE)
        env[key] = value
    return env


def job_env(extra: dict[str, str], storage: str | None, notes: list[str] | None = None) -> dict[str, str]:
    """The job's environment: the submitter's MLflow, Optuna and storage settings, ``--env``, ``--storage``.
    Ray's dashboard shows it, so a forwarded URL with a password is left out (said in ``notes``) and an
    ``--env`` secret is refused (:mod:`credentials`)."""
    from comod_platform.credentials import is_secret, redact

    env = {}
    for key in FORWARDED_ENV:
        value = os.environ.get(key)
        if value and not is_secret(key, value):
            env[key] = value
        elif value and notes is not None:
            notes.append(f"{key} ({redact(value)}) holds a password, so it is not put in the job's environment "
                         f"(Ray's dashboard shows it): the job uses the cluster's own {key}")
    for key, value in extra.items():
        if is_secret(key, value):
            raise JobsError(f"--env {key}=...: a secret in a Ray job's runtime environment is shown on the "
                            f"cluster's dashboard; give it to the cluster by reference instead: in the nodes' "
                            f"own environment (cluster/ray/comod.env, a Kubernetes secret) or a file they mount "
                            f"(PGPASSFILE, AWS_SHARED_CREDENTIALS_FILE); see docs/guides/cluster.md", EXIT_USAGE)
    env.update(extra)
    if storage:
        env["COMOD_STORAGE"] = storage
    # the driver's ray.init may pass settings of its own to its workers (env_vars the job has too);
    # Ray refuses a driver runtime_env that shares a key with the job's unless told to merge them
    env.setdefault("RAY_OVERRIDE_JOB_RUNTIME_ENV", "1")
    return env


def entrypoint(name: str, ship: str, storage: str | None) -> str:
    """The job's shell command. A shipped wheel is on ``PYTHONPATH``, not ``PATH``: it runs as a module."""
    command = "python -m comod_platform.cli" if ship == "wheel" else "comod"
    more = f" --storage {shlex.quote(storage)}" if storage else ""
    return f"{command} search run search.yaml --name {shlex.quote(name)} --or-resume{more}"


@dataclass
class Submission:
    name: str
    submission_id: str
    address: str
    entrypoint: str
    notes: list[str]


def _loopback(url: str) -> bool:
    host = urlparse(url).hostname or ""
    return host in ("localhost", "::1") or host.startswith("127.")


def submit(search: str | Path, address: str | None = None, name: str | None = None, storage: str | None = None,
           ship: str = "wheel", env_pairs: Iterable[str] = ()) -> Submission:
    """Check ``search`` here, then submit it as a Ray job (``ship``: wheel or image); returns what was submitted.
    A broken file (ConfigError), name (BadName) or ``--env`` fails before the cluster is contacted; several nodes
    without shared storage, or a job of the search still running there, before anything is uploaded."""
    from comod_platform.search_state import check_name, default_name
    from comod_platform.searchfile import load_search, resolve_search_path

    sf = load_search(search)
    source = resolve_search_path(search)
    name = check_name(name) if name else default_name(sf.name)
    notes: list[str] = []
    env = job_env(parse_env(env_pairs), storage, notes)
    url = dashboard_address(address)
    client = connect(url)

    nodes = alive_nodes(url)
    if len(nodes) > 1 and not env.get("COMOD_STORAGE"):
        raise JobsError(f"the cluster at {url} has {len(nodes)} nodes and no shared storage was given: trial "
                        f"checkpoints would stay on node-local disks, where a resumed search cannot find them; "
                        f"give --storage s3://BUCKET/PREFIX, or a path on a mount shared by every node "
                        f"(--storage /mnt/shared/comod)", EXIT_USAGE)
    running = [j for j in _call(url, "list its jobs", client.list_jobs)
               if (j.metadata or {}).get(SEARCH_KEY) == name and _value(j.status) not in TERMINAL]
    if running:
        raise JobsError(f"search {name!r} has a job on the cluster already, {running[0].submission_id} "
                        f"({_value(running[0].status)}); two jobs of one search would overwrite each other: follow "
                        f"it (`comod search logs {name} --address {url} --follow`), or stop it first "
                        f"(`comod search stop {name} --address {url}`)", EXIT_USAGE)
    tracking = env.get("MLFLOW_TRACKING_URI", "")
    if tracking.startswith(("http://", "https://")) and _loopback(tracking) and not _loopback(url):
        notes.append(f"MLFLOW_TRACKING_URI {tracking} is this machine's loopback; on the cluster it names the "
                     f"head node itself")
    if "COMOD_HOME" not in env:
        notes.append("the job keeps the search's state in the head node's runs folder ($COMOD_HOME there, else "
                     "comod-runs in the job's working folder, which Ray may delete); pass --env "
                     "COMOD_HOME=/persistent/path so that a resubmission finds it")

    with tempfile.TemporaryDirectory(prefix="comod-submit-") as tmp:
        working_dir = Path(tmp) / "job"
        working_dir.mkdir()
        shutil.copyfile(source, working_dir / "search.yaml")
        runtime_env: dict = {"working_dir": str(working_dir), "env_vars": env}
        if ship == "wheel":
            print("building the project's wheel to ship with the job ...", file=sys.stderr)
            try:
                runtime_env["py_modules"] = [str(build_wheel(Path(tmp) / "wheel"))]
            except WheelError as err:
                raise JobsError(str(err)) from None
        command = entrypoint(name, ship, env.get("COMOD_STORAGE"))
        submission_id = f"comod-{name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.urandom(2).hex()}"
        _call(url, "take the job", lambda: client.submit_job(
            entrypoint=command, submission_id=submission_id, runtime_env=runtime_env,
            metadata={SEARCH_KEY: name}))
    return Submission(name, submission_id, url, command, notes)


def _value(status) -> str:
    return str(getattr(status, "value", status))


def latest_job(address: str | None, name: str):
    """(the dashboard's URL, a client, the latest job submitted there for search ``name``)."""
    address = dashboard_address(address)
    client = connect(address)
    jobs = _call(address, "list its jobs", client.list_jobs)
    mine = [j for j in jobs if j.submission_id and (j.metadata or {}).get(SEARCH_KEY) == name]
    if not mine:
        others = sorted({(j.metadata or {}).get(SEARCH_KEY) for j in jobs} - {None})
        hint = f"; searches submitted there: {', '.join(others)}" if others else "; no search was submitted there"
        raise JobsError(f"no job of a search named {name!r} on the Ray cluster at {address}{hint}; submit one "
                        f"with `comod search submit SEARCH --name {name} --address {address}`")
    return address, client, max(mine, key=lambda j: (j.start_time or 0, j.submission_id))


def _when(ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else "-"


def status(address: str | None, name: str) -> dict:
    """The latest job of search ``name``: status, submission id, times, message, last progress line."""
    url, client, job = latest_job(address, name)
    logs = _call(url, "give the job's logs", client.get_job_logs, job.submission_id) or ""
    progress = [line.strip() for line in logs.splitlines() if line.startswith("[search]")]
    return {"name": name, "status": _value(job.status), "submission_id": job.submission_id,
            "start_time": _when(job.start_time), "end_time": _when(job.end_time), "message": job.message or "",
            "progress": progress[-1] if progress else None, "address": url}


def logs(address: str | None, name: str, follow: bool = False) -> str:
    """Write the logs of search ``name``'s latest job to stdout (``follow``: until it ends); returns its id."""
    url, client, job = latest_job(address, name)
    if not follow:
        print(_call(url, "give the job's logs", client.get_job_logs, job.submission_id) or "", end="")
        return job.submission_id

    async def tail():
        async for chunk in client.tail_job_logs(job.submission_id):
            print(chunk, end="", flush=True)

    # another error: the stream closed before the job ended (aiohttp's or Ray's error)
    with _requests(url, lambda err: f"the log stream of job {job.submission_id} closed early ({err}); see the "
                   f"job with `comod search status {name} --address {url}`"):
        asyncio.run(tail())
    return job.submission_id


def stop(address: str | None, name: str, wait: float = 60.0) -> dict:
    """Stop the latest job of search ``name`` and wait until it has ended; returns what happened."""
    url, client, job = latest_job(address, name)
    now = _value(job.status)
    stopped = now not in TERMINAL
    if stopped:
        _call(url, "stop the job", client.stop_job, job.submission_id)
    deadline = time.time() + wait
    while time.time() < deadline and now not in TERMINAL:
        time.sleep(0.5)
        now = _value(_call(url, "give the job's status", client.get_job_status, job.submission_id))
    return {"name": name, "submission_id": job.submission_id, "stopped": stopped, "status": now, "address": url}

