"""A real single-node Slurm for the tests: Debian's ``slurm-wlm`` and ``munge`` (``make slurm``), started
here on 127.0.0.1 from a temporary folder (its own munge key and socket, ``slurm.conf``, state and logs),
as root. :meth:`SingleNodeSlurm.start` raises :class:`SlurmUnavailable` with the reason where it cannot
start; :meth:`SingleNodeSlurm.stop` ends every job and every daemon it started."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from servers import free_port

COMMANDS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "sinfo", "srun")
NODE = "comodnode"


class SlurmUnavailable(RuntimeError):
    """Slurm cannot run here; the message says why (for a test's skip)."""


def _which(command: str) -> str | None:
    """The command on PATH, else in /usr/sbin (where Debian puts the daemons, off a user's PATH)."""
    return shutil.which(command) or (f"/usr/sbin/{command}" if os.access(f"/usr/sbin/{command}", os.X_OK) else None)


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""


class SingleNodeSlurm:
    def __init__(self, root: Path, cpus: int = 2):
        self.root, self.cpus = root, cpus
        self.conf = root / "slurm.conf"
        self.procs: dict[str, subprocess.Popen] = {}

    @property
    def env(self) -> dict:
        """The environment of a Slurm command (and of the jobs it submits): this cluster's slurm.conf."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), env=self.env, capture_output=True, text=True, timeout=timeout)

    def start(self, timeout: float = 90) -> "SingleNodeSlurm":
        missing = [c for c in COMMANDS if _which(c) is None]
        if missing:
            raise SlurmUnavailable(f"{', '.join(missing)} not installed (make slurm installs Debian's slurm-wlm "
                                   f"and munge)")
        if os.geteuid() != 0:
            raise SlurmUnavailable("slurmd runs jobs as their users: the single-node Slurm needs root")
        for folder in ("state", "spool", "munge"):
            (self.root / folder).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root / "munge", 0o700)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        munge = self.root / "munge"
        self.socket = munge / "munge.socket"
        self._spawn("munged", [_which("munged"), "--foreground", "--force", f"--key-file={key}",
                               f"--socket={self.socket}", f"--pid-file={munge / 'munged.pid'}",
                               f"--seed-file={munge / 'munged.seed'}", f"--log-file={munge / 'munged.log'}"])
        self._wait(lambda: self.socket.exists(), 20, "munged did not open its socket", munge / "munged.log")
        self.conf.write_text(self._conf())
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        self._spawn("slurmd", [_which("slurmd"), "-D", "-f", str(self.conf), "-N", NODE])
        self._wait(self._idle, timeout, "the node did not become idle", self.root / "slurmctld.log")
        return self

    def _conf(self) -> str:
        r = self.root
        return "\n".join([
            # slurmctld runs where SlurmctldHost names this host
            "ClusterName=comodtest", f"SlurmctldHost={socket.gethostname().split('.')[0]}(127.0.0.1)",
            "SlurmUser=root", "SlurmdUser=root", "MailProg=/bin/true",
            f"SlurmctldPort={free_port()}", f"SlurmdPort={free_port()}",
            "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={self.socket}",
            f"StateSaveLocation={r / 'state'}", f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}", f"SlurmdPidFile={r / 'slurmd.pid'}",
            f"SlurmctldLogFile={r / 'slurmctld.log'}", f"SlurmdLogFile={r / 'slurmd.log'}",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "MpiDefault=none",
            "SchedulerType=sched/builtin", "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU",
            "ReturnToService=2", "KillWait=10", "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none", "SlurmctldDebug=info", "SlurmdDebug=info",
            f"NodeName={NODE} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN",
            f"PartitionName=debug Nodes={NODE} Default=YES MaxTime=INFINITE State=UP", ""])

    def _spawn(self, name: str, command: list[str]) -> None:
        self.procs[name] = subprocess.Popen(command, env=self.env, stdout=subprocess.DEVNULL,
                                            stderr=open(self.root / f"{name}.err", "w"), start_new_session=True)

    def _idle(self) -> bool:
        done = self.run("sinfo", "-h", "-n", NODE, "-o", "%T", timeout=20)
        return done.returncode == 0 and done.stdout.strip() == "idle"

    def _wait(self, ready, timeout: float, what: str, log: Path) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead:
                break
            if ready():
                return
            time.sleep(0.5)
        reason = f"{what} ({', '.join(dead)} exited)" if dead else f"{what} within {timeout:.0f} s"
        detail = _tail(log) or _tail(self.root / f"{(dead or ['slurmctld'])[0]}.err")
        self.stop()
        raise SlurmUnavailable(f"{reason}: {detail[-1500:]}")

    # -- jobs ---------------------------------------------------------------------------------
    def sbatch(self, script: Path, *args: str, env: dict | None = None) -> str:
        done = subprocess.run(["sbatch", "--parsable", *args, str(script)], env={**(env or os.environ),
                              "SLURM_CONF": str(self.conf)}, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip().split(";")[0]

    def state(self, job: str) -> str | None:
        """The job's state (PENDING, RUNNING, ...), or None once it has left the queue."""
        done = self.run("squeue", "-h", "-j", job, "-o", "%T", timeout=20)
        return done.stdout.strip() or None if done.returncode == 0 else None

    def wait_gone(self, job: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.state(job) is not None:
            assert time.monotonic() < deadline, f"job {job} still {self.state(job)} after {timeout:.0f} s"
            time.sleep(1)

    def stop(self) -> None:
        """Cancel every job, then end the daemons (slurmd first, so none of its jobs outlives it)."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self.run("scancel", "--full", "-u", "root", timeout=30)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.pop(name, None)
            if proc is None:
                continue
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(10)
