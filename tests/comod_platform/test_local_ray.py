"""The Ray a search's driver starts itself: no idle workers started for tasks a search never runs.

Ray starts a worker per CPU for a first driver before ``ray.init`` returns; a search's trials are
Ray Tune actors with a runtime environment of their own, which start in new workers, so those idle
workers only take CPU from the search (``compat.LOCAL_RAY_SYSTEM_CONFIG``). Checked on a real local Ray in
a subprocess under a private temp dir: no worker process right after the driver's start, and one
once a task asks for it (which shows that the check sees Ray's workers at all).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from searches import search_env

REPO = Path(__file__).resolve().parents[2]

PROBE = r"""
import json, os, sys, time
from comod_platform.tuner import init_ray
import ray

def processes():
    # (pid, parent pid, command line) of every process
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode()
            stat = open(f"/proc/{pid}/stat").read()
        except OSError:
            continue
        yield int(pid), int(stat[stat.rindex(")") + 2:].split()[1]), cmd


def workers():
    # the worker processes of this session's raylet: its children that are neither its agents nor
    # raylet processes of its own
    raylets = {pid for pid, _, cmd in processes() if sys.argv[1] in cmd and "raylet --raylet_socket_name" in cmd}
    return [pid for pid, parent, cmd in processes() if parent in raylets and "Agent" not in cmd
            and not cmd.split(" ", 1)[0].endswith("raylet")
            and ("default_worker.py" in cmd or "setup_worker.py" in cmd or cmd.startswith("ray::"))]


init_ray(None)
time.sleep(2)  # a prestarted worker is launched before ray.init returns; give it time to show
at_start = workers()
ray.get(ray.remote(lambda: 1).remote())
after_task = workers()
ray.shutdown()
print(json.dumps({"at_start": len(at_start), "after_task": len(after_task)}))
"""


def test_a_search_s_own_ray_starts_no_idle_workers(tmp_path, ray_tmp):
    done = subprocess.run([sys.executable, "-c", PROBE, ray_tmp], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=search_env(tmp_path / "runs", ray_tmp))
    assert done.returncode == 0, done.stderr[-3000:]
    counts = json.loads(done.stdout.strip().splitlines()[-1])
    assert counts["after_task"] >= 1, counts  # the check sees Ray's workers
    assert counts["at_start"] == 0, counts
