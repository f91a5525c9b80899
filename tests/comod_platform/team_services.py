"""The team tracking services, started for real on 127.0.0.1 and always
stopped: a private PostgreSQL cluster, an S3-compatible server (moto's
server mode), and an ``mlflow server`` whose backend store is PostgreSQL and
whose artifact store is S3, proxied (``--serve-artifacts``), so clients
need no storage credentials.

Plain helpers, no fixtures. Every process is started in its own session and
stopped by its process group; temp folders are removed on stop. PostgreSQL
refuses to run as root: as root, ``initdb`` and ``postgres`` run as the
``postgres`` system user, in a temp folder that user owns.
"""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from servers import free_port, stop_group

DUMMY_AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
"""Credentials moto accepts; given only to the processes that talk to S3 themselves."""

STORAGE_ENV_PREFIXES = ("AWS_", "MLFLOW_S3_", "COMOD_STORAGE")
"""Environment variables that would give a process storage access of its own."""

PG_USER = "postgres"


def without_storage_env(env: dict) -> dict:
    """``env`` less every variable that grants or points at object storage."""
    return {k: v for k, v in env.items() if not k.startswith(STORAGE_ENV_PREFIXES)}


def _tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def _wait_http(url: str, proc: subprocess.Popen, log: Path, what: str, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode}: {_tail(log)}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"{what} did not answer {url} within {timeout:.0f} s: {_tail(log)}")


# ------------------------------------------------------------------ PostgreSQL

def postgres_bindir() -> Path | None:
    """The folder holding ``initdb`` and ``postgres``: on PATH, else Debian's versioned folder."""
    on_path = shutil.which("initdb")
    if on_path and Path(on_path).with_name("postgres").exists():
        return Path(on_path).parent
    for folder in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name)
                         if Path(p).parent.name.isdigit() else 0, reverse=True):
        if (Path(folder) / "initdb").exists() and (Path(folder) / "postgres").exists():
            return Path(folder)
    return None


def postgres_missing() -> str | None:
    """Why a PostgreSQL server cannot be started here, or None when it can."""
    if postgres_bindir() is None:
        return ("PostgreSQL server binaries (initdb, postgres) not found; install them with "
                "`apt-get install postgresql`")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(PG_USER)
        except KeyError:
            return f"running as root and there is no {PG_USER!r} user to run PostgreSQL as"
    return None


class PostgresServer:
    """A throwaway PostgreSQL cluster on 127.0.0.1 (trust auth, user ``postgres``), its unix
    socket in its own temp folder, with ``databases`` created. Durability is off: tests only."""

    def __init__(self, databases: tuple[str, ...] = ("mlflow", "optuna")):
        self.databases = databases
        self.port = free_port()
        self.root: Path | None = None
        self.proc: subprocess.Popen | None = None

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def log(self) -> Path:
        return self.root / "postgres.log"

    def url(self, database: str, driver: str = "postgresql+psycopg2") -> str:
        return f"{driver}://{PG_USER}@127.0.0.1:{self.port}/{database}"

    def _as_owner(self) -> dict:
        if os.geteuid() != 0:
            return {}
        return {"user": PG_USER, "group": pwd.getpwnam(PG_USER).pw_gid, "extra_groups": []}

    def start(self, timeout: float = 60.0) -> "PostgresServer":
        reason = postgres_missing()
        if reason:
            raise RuntimeError(reason)
        bindir = postgres_bindir()
        # short and under /tmp: the socket path is length-limited, and the postgres user must reach it
        self.root = Path(tempfile.mkdtemp(prefix="pg", dir="/tmp"))
        try:
            if os.geteuid() == 0:
                entry = pwd.getpwnam(PG_USER)
                os.chown(self.root, entry.pw_uid, entry.pw_gid)
            as_owner = self._as_owner()
            init = subprocess.run([str(bindir / "initdb"), "-D", str(self.data), "-U", PG_USER, "--auth=trust",
                                   "-E", "UTF8", "--locale=C", "--no-sync"], cwd=self.root, capture_output=True,
                                  text=True, timeout=120, **as_owner)
            if init.returncode != 0:
                raise RuntimeError(f"initdb failed ({init.returncode}): {init.stderr[-2000:] or init.stdout[-2000:]}")
            log = open(self.log, "w")
            if os.geteuid() == 0:
                os.chown(self.log, pwd.getpwnam(PG_USER).pw_uid, -1)
            self.proc = subprocess.Popen(
                [str(bindir / "postgres"), "-D", str(self.data), "-p", str(self.port), "-k", str(self.root),
                 "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "synchronous_commit=off",
                 "-c", "full_page_writes=off", "-c", "max_connections=100", "-c", "shared_buffers=32MB"],
                cwd=self.root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, **as_owner)
            log.close()
            self._wait(timeout)
            conn = self.connect("postgres")
            try:
                conn.autocommit = True
                with conn.cursor() as cur:
                    for name in self.databases:
                        cur.execute(f'CREATE DATABASE "{name}"')
            finally:
                conn.close()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait(self, timeout: float) -> None:
        import psycopg2

        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited with status {self.proc.returncode}: {_tail(self.log)}")
            try:
                psycopg2.connect(self.url("postgres", "postgresql"), connect_timeout=2).close()
                return
            except psycopg2.OperationalError:
                time.sleep(0.3)
        raise RuntimeError(f"postgres did not accept connections within {timeout:.0f} s: {_tail(self.log)}")

    def connect(self, database: str):
        import psycopg2

        return psycopg2.connect(self.url(database, "postgresql"), connect_timeout=5)

    def query(self, database: str, sql: str, args: tuple = ()) -> list[tuple]:
        conn = self.connect(database)
        try:
            with conn.cursor() as cur:
                cur.execute(sql, args)
                return cur.fetchall()
        finally:
            conn.close()

    def stop(self) -> None:
        # SIGINT is PostgreSQL's fast shutdown: clients are disconnected, no waiting on them
        stop_group(self.proc, signal.SIGINT)
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)


# ------------------------------------------------------------------ S3 (moto)

class MotoServer:
    """moto's S3-compatible server on 127.0.0.1 (state in memory, gone when it stops)."""

    def __init__(self, root: Path):
        self.root = root
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    @property
    def log(self) -> Path:
        return self.root / "moto.log"

    def start(self, timeout: float = 60.0) -> "MotoServer":
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                         env={**without_storage_env(os.environ), **DUMMY_AWS})
        try:
            _wait_http(f"{self.endpoint}/moto-api/", self.proc, self.log, "moto server", timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=DUMMY_AWS["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=DUMMY_AWS["AWS_SECRET_ACCESS_KEY"],
                            region_name=DUMMY_AWS["AWS_DEFAULT_REGION"])

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        """Every object key under ``prefix`` (all pages)."""
        keys: list[str] = []
        for page in self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            keys += [obj["Key"] for obj in page.get("Contents", [])]
        return keys

    def env(self) -> dict:
        """What a process needs to use this server as its S3 (AWS SDKs and pyarrow read it)."""
        return {**DUMMY_AWS, "AWS_ENDPOINT_URL": self.endpoint}

    def stop(self) -> None:
        stop_group(self.proc)


# ------------------------------------------------------------------ MLflow

class TeamMlflowServer:
    """``mlflow server`` with its runs in PostgreSQL and its artifacts in an S3 bucket that it
    proxies: the storage credentials and endpoint are given to this process only."""

    def __init__(self, root: Path, postgres: PostgresServer, s3: MotoServer, bucket: str = "mlflow-artifacts"):
        self.root = root
        self.postgres = postgres
        self.s3 = s3
        self.bucket = bucket
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    @property
    def log(self) -> Path:
        return self.root / "mlflow-server.log"

    def start(self, timeout: float = 180.0) -> "TeamMlflowServer":
        self.root.mkdir(parents=True, exist_ok=True)
        env = {**without_storage_env(os.environ), **DUMMY_AWS, "MLFLOW_S3_ENDPOINT_URL": self.s3.endpoint}
        env.pop("MLFLOW_TRACKING_URI", None)
        cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
               "--backend-store-uri", self.postgres.url("mlflow"),
               "--artifacts-destination", f"s3://{self.bucket}/", "--serve-artifacts", "--workers", "1"]
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env,
                                         cwd=self.root)
        try:
            _wait_http(f"{self.uri}/health", self.proc, self.log, "mlflow server", timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        stop_group(self.proc)


def start_team_mlflow(root: Path, postgres: PostgresServer, s3: MotoServer,
                      bucket: str = "mlflow-artifacts") -> TeamMlflowServer:
    """Create ``bucket`` on ``s3`` and start an MLflow server on ``postgres``'s ``mlflow`` database
    that serves artifacts from ``s3://bucket/`` by proxy."""
    s3.create_bucket(bucket)
    return TeamMlflowServer(root, postgres, s3, bucket).start()
