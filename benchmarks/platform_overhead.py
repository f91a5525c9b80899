"""What the search platform costs over the bare work.

Measured: ``--trials`` short trials (default 40, each about a second of
training on one thread: the tiny synthetic experiment of
``search_spaces/tiny.yaml`` with ``--steps-per-epoch`` steps in each of
``--epochs`` pretraining and fine-tuning epochs) run two ways, with the same
concurrency (``--concurrency``, default 2):

* platform: the real ``comod search run FILE --name N`` as a subprocess
  (``python -m comod_platform.cli``), the search file derived from
  ``search_spaces/tiny.yaml`` with sampler ``random``, scheduler ``fifo`` (no
  early stopping, so every trial does the same work as in the plain loop),
  ``max_concurrent`` = concurrency and one CPU per trial; ``COMOD_HOME`` is a
  fresh temporary folder (embedded MLflow on SQLite, Optuna on SQLite, Ray
  Tune results; its MLflow store made by MLflow within the command),
  ``COMOD_DOWNLOAD=0``, and a private ``RAY_TMPDIR`` whose Ray processes are
  killed afterwards;
* plain: the very configs the search ran (each trial's ``config.yaml``) in a
  plain loop, also as a subprocess: a ``ProcessPoolExecutor`` of
  ``concurrency`` workers, each with ``torch.set_num_threads(1)`` and the
  dataset loaded once per worker, calling ``comod.train.run_experiment`` on
  each config into a temporary folder, with a pretraining cache shared by the
  workers like the search's (so both sides pretrain the same models).

* the floor (``--no-floor`` skips it): the same configs as one bare Ray Tune
  run in its own process: a ``Tuner`` over a function trainable that calls
  ``run_experiment``, the data loaded once and shared through the object
  store, actor reuse and the same concurrency, but no Optuna, no MLflow, no
  checkpoints and no callbacks. It is what Ray Tune itself costs here:
  floor / plain is a bound no platform built on Ray Tune beats on this
  machine, and platform / floor is what comod adds on top.

Before the timed repeats, one untimed round of each side on 4 trials
(``--no-warmup`` skips it): what a machine pays once, Python compiling
changed modules to bytecode and the libraries' first reads from disk, falls
there and not on whichever side a timed repeat runs first.

All are timed end to end (wall clock of the whole command: interpreter
start, imports, Ray start, MLflow and Optuna set-up, shut-down). From the
trial folders' file times (``config.yaml`` written when ``run_experiment``
starts, the final ``checkpoint.pt`` when it ends) each side's time is split
into start-up (command start to first trial start), the trials' window
(first trial start to last trial end) and tail (last trial end to command
end); the window is further split into the mean time inside a trial and the
mean idle gap per trial slot (``(window x concurrency - time in trials) /
trials``, the target's measure). That idle time is split once more: the
gaps between two trials of one slot (each trial on the slot that became free
first), and the slots' idle time at the window's two ends, which depends on
how unevenly the last trials finish more than on the platform. The per-trial
overhead is reported in ms both amortised over the whole command and in the
trials' window only (start-up and tail excluded).

The guard: the whole command at most 1.10x the bare Ray Tune run (what comod
adds on top of Ray Tune): the median over the repeats of each repeat's
platform / bare Ray Tune, the two run side by side, so that a repeat
disturbed by other load does not decide it (the ratio of the mean walls is
reported beside it). The
trials' window against the plain loop's and comod's idle gap per trial slot
are reported, not targets: on a 2-core machine the driver shares the cores
with the trials, and for real trials of minutes a few tens of milliseconds
per trial do not show. The whole command platform / plain is reported too, but is
not a target here: it cannot reach 1.15 where Ray's own start-up and
shut-down make the floor itself, bare Ray Tune / plain, far above 1.15 (the
report says which holds). The last line printed is ``RESULT
platform/bare_ray=X.XXX window_platform/plain=Y.YYY idle_gap_ms=Z``.

What recording alone costs the window is reported too: the search's
summary (``--json``) says how much CPU the driver's MLflow writer thread
took; spread over the machine's cores, which the trials keep busy,
and added to bare Ray Tune's window, it gives the least window ratio to the
plain loop that the platform can reach here while recording what it does.

With ``--repeats`` > 1 the two sides alternate order (platform first, then
plain first, ...) so that load from other processes hits both alike. The
1-minute load average is sampled during every run and recorded with the
results, as are the machine and the Ray, MLflow, Optuna and torch versions.
Results go to ``benchmarks/results/platform_overhead.json`` and ``.md``
(``--quick``: 6 trials, one repeat, no waiting for the load, a smoke check
that writes nothing unless ``--out`` is given).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (REPO, LoadSampler, add_run_options, clean_env, kill_processes_mentioning, machine,  # noqa: E402
                     results_folder, versions, wait_for_load, write_results)

TARGET_OVER_FLOOR = 1.10
"""The guard: comod's whole `search run` at most this times the bare Ray Tune run of the same configs."""
TARGET_WINDOW = 1.10
"""Trials' window over the plain loop's: a retired target, reported beside the guard."""
TARGET_GAP_MS = 70
"""comod's idle gap per trial slot (ms): a retired target, reported beside the guard."""
WHOLE_COMMAND_RATIO = 1.15
"""Whole command platform / plain: reported, not a target here (see ``whole_command_note``)."""
SEARCH_NAME = "overhead"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=40, help="trials per side (default 40)")
    p.add_argument("--concurrency", type=int, default=2, help="trials at a time on each side (default 2)")
    p.add_argument("--steps-per-epoch", type=int, default=30,
                   help="optimisation steps per epoch, both phases (default 30: about 1 s of work per trial on "
                        "one thread here)")
    p.add_argument("--epochs", type=int, default=2, help="epochs of each phase (default 2)")
    p.add_argument("--repeats", type=int, default=4,
                   help="platform/plain pairs, their order alternating (default 4: on a shared 2-core machine the "
                        "same trials' window varies by about 10%% from run to run)")
    p.add_argument("--quick", action="store_true", help="6 trials, one repeat, no waiting for load: a smoke check")
    add_run_options(p, max_wait=900.0, timeout=1800.0, what="one side")
    p.add_argument("--plain-worker", nargs=3, metavar=("CONFIGS_JSON", "OUT_DIR", "CONCURRENCY"),
                   help=argparse.SUPPRESS)  # internal: the plain side, run as its own command
    p.add_argument("--floor-worker", nargs=3, metavar=("CONFIGS_JSON", "OUT_DIR", "CONCURRENCY"),
                   help=argparse.SUPPRESS)  # internal: the bare Ray Tune side, run as its own command
    p.add_argument("--no-floor", action="store_true", help="skip the bare Ray Tune run (the floor)")
    p.add_argument("--no-warmup", dest="warmup", action="store_false",
                   help="skip the untimed round of each side before the repeats (on by default, off with --quick)")
    p.add_argument("--warm", action="store_true",
                   help="a machine in use: a Ray cluster already up (`ray start --head` on 127.0.0.1, which "
                        "the search and the floor join with --address) and a runs folder whose MLflow store "
                        "exists; results go to platform_overhead_warm.*")
    args = p.parse_args(argv)
    if args.quick:
        args.trials, args.repeats, args.max_wait, args.warmup = 6, 1, 0.0, False
    return args


# -- the plain side (runs in its own process, see --plain-worker) ---------------
_DATA: dict = {}


def _plain_init() -> None:
    import torch

    torch.set_num_threads(1)


def _plain_run(index: int, config_path: str, out_dir: str, cache_dir: str) -> dict:
    import torch

    from comod.config import config_to_dict, load_config
    from comod.data import load_data
    from comod.train import run_experiment

    cfg = load_config(config_path)
    key = json.dumps(config_to_dict(cfg.data), sort_keys=True)
    if key not in _DATA:  # once per worker (all trials of this benchmark share the data settings)
        _DATA[key] = load_data(cfg)
    start = time.time()
    run_experiment(cfg, Path(out_dir) / f"run{index:03d}", data=_DATA[key], pretrain_cache=cache_dir)
    return {"start": start, "end": time.time(), "pid": os.getpid(), "threads": torch.get_num_threads()}


def plain_main(configs_json: str, out_dir: str, concurrency: int) -> int:
    from concurrent.futures import ProcessPoolExecutor

    configs = json.loads(Path(configs_json).read_text())
    cache = Path(out_dir) / "pretrain_cache"
    with ProcessPoolExecutor(concurrency, initializer=_plain_init) as pool:
        futures = [pool.submit(_plain_run, i, c, out_dir, str(cache)) for i, c in enumerate(configs)]
        runs = [f.result() for f in futures]
    (Path(out_dir) / "plain_runs.json").write_text(json.dumps(runs))
    return 0


# -- the floor: bare Ray Tune (runs in its own process, see --floor-worker) ------
def _floor_trial(config, configs=None, out_dir="", cache="", data=None):
    import torch
    from ray import tune

    from comod.config import load_config
    from comod.train import run_experiment
    from comod_platform.trainable import unpack

    torch.set_num_threads(1)
    index = config["index"]
    run_experiment(load_config(configs[index]), Path(out_dir) / f"run{index:03d}", data=unpack(data),
                   pretrain_cache=cache)
    tune.report({"finished": 1})


def floor_main(configs_json: str, out_dir: str, concurrency: int) -> int:
    """The same configs as one Ray Tune run with nothing of comod's platform: no Optuna, no MLflow, no
    checkpoints, no callbacks; the data loaded once and shared through the object store like the search's."""
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    import ray
    from ray import tune

    from comod.config import load_config
    from comod.data import load_data
    from comod_platform.trainable import pack

    configs = json.loads(Path(configs_json).read_text())
    address = os.environ.get("COMOD_BENCH_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False, configure_logging=False)
    else:
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    data = pack(load_data(load_config(configs[0])))
    fn = tune.with_parameters(_floor_trial, configs=configs, out_dir=out_dir,
                              cache=str(Path(out_dir) / "pretrain_cache"), data=data)
    tuner = tune.Tuner(tune.with_resources(fn, {"cpu": 1}),
                       param_space={"index": tune.grid_search(list(range(len(configs))))},
                       tune_config=tune.TuneConfig(max_concurrent_trials=concurrency, reuse_actors=True),
                       run_config=tune.RunConfig(name="floor", storage_path=str(Path(out_dir) / "ray"), verbose=0))
    grid = tuner.fit()
    ray.shutdown()
    return 0 if not grid.errors else 1


# -- helpers --------------------------------------------------------------------
def write_search(path: Path, args) -> Path:
    raw = yaml.safe_load((REPO / "search_spaces" / "tiny.yaml").read_text())
    for phase in ("pretrain", "finetune"):
        raw["experiment"][phase].update(epochs=args.epochs, steps_per_epoch=args.steps_per_epoch)
    raw["search"].update(num_trials=args.trials, sampler="random", scheduler={"type": "fifo"},
                         max_concurrent=args.concurrency, resources={"cpu": 1, "gpu": 0})
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _clean_env(**extra) -> dict:
    # the warm cluster, its drivers and the embedded Ray alike run without Ray's token authentication
    return clean_env(RAY_AUTH_MODE="disabled", **extra)


def trial_spans(run_dirs: list[Path]) -> list[dict]:
    """Per run folder: start (config.yaml written) and end (last checkpoint write) as wall-clock times,
    and run_experiment's own wall_seconds (metrics.json)."""
    spans = []
    for d in run_dirs:
        if not (d / "metrics.json").exists():
            continue
        metrics = json.loads((d / "metrics.json").read_text())
        spans.append({"dir": d.name, "start": (d / "config.yaml").stat().st_mtime,
                      "end": (d / "checkpoint.pt").stat().st_mtime, "wall_seconds": metrics["wall_seconds"],
                      "kind": yaml.safe_load((d / "config.yaml").read_text())["modulation"]["kind"]})
    return sorted(spans, key=lambda s: s["start"])


def slot_idle(spans: list[dict], concurrency: int, first: float, last: float) -> tuple[list[float], float]:
    """The trials in start order, each on the slot that became free first: the idle times between two
    trials of one slot, and the slots' idle time at the window's two ends (before a slot's first trial,
    after its last one, while other slots still run: how unevenly the last trials finish). Together they
    are the window's idle slot time, ``window x concurrency - time in trials``."""
    free, used = [first] * concurrency, [False] * concurrency
    between, edges = [], 0.0
    for span in sorted(spans, key=lambda s: s["start"]):
        slot = min(range(concurrency), key=free.__getitem__)
        if used[slot]:
            between.append(span["start"] - free[slot])
        else:
            edges += span["start"] - first
            used[slot] = True
        free[slot] = span["end"]
    return between, edges + sum(last - f for f in free)


def breakdown(t0: float, t1: float, spans: list[dict], concurrency: int) -> dict:
    """Start-up, trials' window, tail; mean time in a trial and mean idle gap per trial slot, with the
    part of it between two trials of a slot (the rest is the window's ends, :func:`slot_idle`)."""
    first = min(s["start"] for s in spans)
    last = max(s["end"] for s in spans)
    window = last - first
    busy = sum(s["end"] - s["start"] for s in spans)
    n = len(spans)
    between, edges = slot_idle(spans, concurrency, first, last)
    return {"wall_s": round(t1 - t0, 3), "startup_s": round(first - t0, 3), "window_s": round(window, 3),
            "tail_s": round(t1 - last, 3), "trials": n,
            "mean_trial_s": round(busy / n, 4),
            "mean_run_experiment_s": round(statistics.fmean(s["wall_seconds"] for s in spans), 4),
            "mean_gap_s": round((window * concurrency - busy) / n, 4),
            "mean_between_s": round(statistics.fmean(between), 4) if between else 0.0,
            "edge_idle_s": round(edges, 3)}


class WarmCluster:
    """A local Ray cluster started before the measurements (``ray start --head`` on 127.0.0.1, a private
    temp dir, ``concurrency`` CPUs), as on a workstation or cluster in use; every process stopped at the end."""

    def __init__(self, cpus: int):
        self.cpus = cpus
        self.tmp = tempfile.mkdtemp(prefix="pw", dir="/tmp")
        self.address = ""

    def __enter__(self):
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        ray = str(Path(sys.executable).with_name("ray"))
        subprocess.run([ray, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
                        f"--num-cpus={self.cpus}", "--num-gpus=0", "--include-dashboard=false", "--disable-usage-stats",
                        f"--temp-dir={self.tmp}"], check=True, capture_output=True,
                       env=_clean_env(RAY_TMPDIR=self.tmp), timeout=120)
        self.address = f"127.0.0.1:{port}"
        return self

    def __exit__(self, *exc):
        kill_processes_mentioning(self.tmp)
        shutil.rmtree(self.tmp, ignore_errors=True)


def _open_store(home: Path) -> None:
    """A runs folder in use: its embedded MLflow store exists (made before the clock starts)."""
    code = "from comod_platform.tracking import open_store; open_store()"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_clean_env(COMOD_HOME=str(home)), check=True,
                   capture_output=True, timeout=300)


def run_platform(search_file: Path, work: Path, args, env: dict | None = None, cwd: Path = REPO) -> dict:
    """``comod search run`` timed as a whole command; ``env``: variables added to its environment; ``cwd``: the
    checkout it runs in (another one's code also goes first on ``PYTHONPATH``, see ``compare_trees.py``)."""
    home = work / "home"
    home.mkdir()
    ray_tmp = args.cluster.tmp if args.cluster else tempfile.mkdtemp(prefix="po", dir="/tmp")
    env = _clean_env(COMOD_HOME=str(home), COMOD_DOWNLOAD="0", RAY_TMPDIR=ray_tmp, **(env or {}))
    cmd = [sys.executable, "-m", "comod_platform.cli", "search", "run", str(search_file), "--name", SEARCH_NAME,
           "--json"]
    if args.cluster:
        _open_store(home)
        cmd += ["--address", args.cluster.address]
    log = work / "platform.log"
    try:
        with LoadSampler() as load, open(log, "w") as out, open(work / "summary.json", "w") as summary:
            t0 = time.time()
            proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=summary, stderr=out, start_new_session=True)
            try:
                rc = proc.wait(args.timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                rc = "timeout"
            t1 = time.time()
    finally:
        leftovers = 0 if args.cluster else kill_processes_mentioning(ray_tmp)
        if not args.cluster:
            shutil.rmtree(ray_tmp, ignore_errors=True)
    if rc != 0:
        raise SystemExit(f"comod search run failed ({rc}); log {log}:\n{log.read_text()[-4000:]}")
    trials = sorted((home / "searches" / SEARCH_NAME / "trials").iterdir())
    spans = trial_spans(trials)
    if len(spans) != args.trials:
        raise SystemExit(f"the search finished {len(spans)} trials of {args.trials}; log {log}")
    pretrained = len(list((home / "searches" / SEARCH_NAME / "pretrain_cache").glob("*.pt")))
    return {**breakdown(t0, t1, spans, args.concurrency), "load": load.summary(),
            "pretrained_models": pretrained, "ray_processes_killed_after": leftovers,
            "recording_cpu_s": recording_cpu(json.loads((work / "summary.json").read_text())),
            "configs": [str(work / "home" / "searches" / SEARCH_NAME / "trials" / s["dir"] / "config.yaml")
                        for s in spans],
            "kinds": {k: sum(s["kind"] == k for s in spans) for k in ("none", "deterministic", "stochastic")}}


WRITER_NAMES = {"comod-mlflow-writer": "mlflow"}  # the study is written in the scheduling loop, not counted


def recording_cpu(summary: dict) -> dict[str, float]:
    """The CPU seconds the search's driver spent recording (its writer threads, from the summary that
    ``comod search run --json`` prints): ``{"mlflow": s}``."""
    writers = summary.get("writers") or {}
    return {short: float((writers.get(name) or {}).get("cpu_s", 0.0)) for name, short in WRITER_NAMES.items()}


def recording_estimate(pairs: list[dict], trials: int, cores: int) -> dict:
    """What recording alone adds to the trials' window where the trials keep every core busy: the driver's
    writer CPU per trial (ms), that CPU spread over ``cores`` (s per command), and the window ratio it
    implies at the least, bare Ray Tune's window plus that, over the plain loop's (None without the floor)."""
    cpu = {k: statistics.fmean(p["platform"]["recording_cpu_s"][k] for p in pairs) for k in WRITER_NAMES.values()}
    window_s = sum(cpu.values()) / cores
    out = {"ms_per_trial": {k: round(v / trials * 1000, 1) for k, v in cpu.items()}, "window_s": round(window_s, 2),
           "cores": cores}
    if all("floor" in p for p in pairs):
        floor = statistics.fmean(p["floor"]["window_s"] for p in pairs)
        plain = statistics.fmean(p["plain"]["window_s"] for p in pairs)
        out["window_ratio_at_least"] = round((floor + window_s) / plain, 3)
    return out


def run_plain(configs: list[str], work: Path, args) -> dict:
    out = work / "plain"
    out.mkdir()
    (work / "plain_configs.json").write_text(json.dumps(configs))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--plain-worker", str(work / "plain_configs.json"),
           str(out), str(args.concurrency)]
    log = work / "plain.log"
    with LoadSampler() as load, open(log, "w") as stream:
        t0 = time.time()
        done = subprocess.run(cmd, cwd=REPO, env=_clean_env(), stdout=stream, stderr=subprocess.STDOUT,
                              timeout=args.timeout)
        t1 = time.time()
    if done.returncode != 0:
        raise SystemExit(f"the plain loop failed ({done.returncode}); log {log}:\n{log.read_text()[-4000:]}")
    runs = json.loads((out / "plain_runs.json").read_text())
    spans = trial_spans(sorted(p for p in out.iterdir() if p.name.startswith("run")))
    pretrained = len(list((out / "pretrain_cache").glob("*.pt")))
    return {**breakdown(t0, t1, spans, args.concurrency), "load": load.summary(), "pretrained_models": pretrained,
            "worker_threads": sorted({r["threads"] for r in runs})}


def run_floor(configs: list[str], work: Path, args) -> dict:
    out = work / "floor"
    out.mkdir()
    (work / "floor_configs.json").write_text(json.dumps(configs))
    ray_tmp = args.cluster.tmp if args.cluster else tempfile.mkdtemp(prefix="pf", dir="/tmp")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--floor-worker", str(work / "floor_configs.json"),
           str(out), str(args.concurrency)]
    env = _clean_env(COMOD_DOWNLOAD="0", RAY_TMPDIR=ray_tmp)
    if args.cluster:
        env["COMOD_BENCH_ADDRESS"] = args.cluster.address
    log = work / "floor.log"
    try:
        with LoadSampler() as load, open(log, "w") as stream:
            t0 = time.time()
            done = subprocess.run(cmd, cwd=REPO, env=env, stdout=stream, stderr=subprocess.STDOUT,
                                  timeout=args.timeout)
            t1 = time.time()
    finally:
        if not args.cluster:
            kill_processes_mentioning(ray_tmp)
            shutil.rmtree(ray_tmp, ignore_errors=True)
    if done.returncode != 0:
        raise SystemExit(f"the bare Ray Tune run failed ({done.returncode}); log {log}:\n{log.read_text()[-4000:]}")
    spans = trial_spans(sorted(p for p in out.iterdir() if p.name.startswith("run")))
    pretrained = len(list((out / "pretrain_cache").glob("*.pt")))
    return {**breakdown(t0, t1, spans, args.concurrency), "load": load.summary(), "pretrained_models": pretrained}


def summarise(pairs: list[dict], args) -> dict:
    wall_p = sum(p["platform"]["wall_s"] for p in pairs)
    wall_q = sum(p["plain"]["wall_s"] for p in pairs)
    win_p = sum(p["platform"]["window_s"] for p in pairs)
    win_q = sum(p["plain"]["window_s"] for p in pairs)
    n = args.trials * len(pairs)
    mean = lambda side, key: round(statistics.fmean(p[side][key] for p in pairs), 4)  # noqa: E731
    summary = {
        "ratio": round(wall_p / wall_q, 3),
        "ratios_per_repeat": [round(p["platform"]["wall_s"] / p["plain"]["wall_s"], 3) for p in pairs],
        "window_ratio": round(win_p / win_q, 3),
        "window_ratios_per_repeat": [round(p["platform"]["window_s"] / p["plain"]["window_s"], 3) for p in pairs],
        "per_trial_overhead_ms": round((wall_p - wall_q) / n * 1000, 1),
        "per_trial_overhead_window_ms": round((win_p - win_q) / n * 1000, 1),
        "per_trial_overhead_slot_ms": round((win_p - win_q) / n * 1000 * args.concurrency, 1),
        "startup_extra_s": round(mean("platform", "startup_s") - mean("plain", "startup_s"), 3),
        "tail_extra_s": round(mean("platform", "tail_s") - mean("plain", "tail_s"), 3),
        "in_trial_extra_ms": round((mean("platform", "mean_trial_s") - mean("plain", "mean_trial_s")) * 1000, 1),
        "gap_extra_ms": round((mean("platform", "mean_gap_s") - mean("plain", "mean_gap_s")) * 1000, 1),
        "idle_gap_ms": round(mean("platform", "mean_gap_s") * 1000),
        # where the idle slot time lies: between two trials of a slot, and at the window's ends
        "between_gap_ms": {side: round(mean(side, "mean_between_s") * 1000) for side in _split(pairs)},
        "edge_idle_s": {side: round(mean(side, "edge_idle_s"), 2) for side in _split(pairs)},
        **_floor_summary(pairs, wall_p, wall_q),
    }
    if all("recording_cpu_s" in p["platform"] for p in pairs):
        summary["recording"] = recording_estimate(pairs, args.trials, os.cpu_count() or 1)
    return {**summary, **checks(summary)}


def _split(pairs: list[dict]) -> list[str]:
    """The sides whose idle slot time was split in every repeat (:func:`slot_idle`)."""
    return [side for side in ("platform", "floor", "plain")
            if all(side in p and "mean_between_s" in p[side] for p in pairs)]


def checks(s: dict) -> dict:
    """The guard and whether it holds (None: not measured, the floor skipped); the retired window and gap
    targets beside it, reported only."""
    over_floor = s.get("platform_over_floor")
    met = {"platform_over_floor": None if over_floor is None else over_floor <= TARGET_OVER_FLOOR}
    return {"targets": {"platform_over_floor": TARGET_OVER_FLOOR},
            "retired": {"window_ratio": TARGET_WINDOW, "idle_gap_ms": TARGET_GAP_MS},
            "checks": met, "pass": met["platform_over_floor"] is True}


def target_lines(s: dict) -> list[str]:
    """One line per target, PASS or MISS (or not measured), then the whole-command ratio to the plain loop
    with why it is not a target."""
    def verdict(key: str) -> str:
        return {True: "PASS", False: "MISS", None: "NOT MEASURED"}[s["checks"][key]]

    over_floor = s.get("platform_over_floor")
    lines = [f"{verdict('platform_over_floor')}: whole command platform / bare Ray Tune = "
             + (f"{over_floor:.3f}" if over_floor is not None else "- (--no-floor)")
             + f" (the median of the repeats' paired ratios; guard <= {TARGET_OVER_FLOOR})",
             f"reported: trials' window platform / plain = {s['window_ratio']:.3f} (a retired target, "
             f"<= {TARGET_WINDOW})",
             f"reported: idle gap per trial slot = {s['idle_gap_ms']} ms (a retired target, <= {TARGET_GAP_MS})"]
    if "floor_window_ratio" in s:
        extra = s["over_floor_s"]
        lines.append(f"bare Ray Tune itself: trials' window / plain = {s['floor_window_ratio']:.3f}, idle gap "
                     f"{s['floor_idle_gap_ms']} ms per trial slot; platform / bare Ray Tune per repeat "
                     f"{s['platform_over_floor_per_repeat']} (ratio of the mean walls "
                     f"{s['platform_over_floor_mean_walls']:.3f}); comod over bare Ray Tune: start-up "
                     f"{extra['startup']:+.1f} s, window {extra['window']:+.1f} s, tail {extra['tail']:+.1f} s")
    if s.get("between_gap_ms"):
        names = {"platform": "comod", "floor": "bare Ray Tune", "plain": "plain"}
        between = ", ".join(f"{names[k]} {v} ms" for k, v in s["between_gap_ms"].items())
        edges = ", ".join(f"{names[k]} {v} s" for k, v in s["edge_idle_s"].items())
        lines.append(f"where the idle gap lies: between two trials of a slot {between}; the rest is the slots' "
                     f"idle time at the window's ends, while the last trials finish unevenly ({edges} of slot "
                     f"time per command, spread over the trials)")
    if s.get("recording"):
        lines.append(recording_note(s["recording"]))
    return lines + [whole_command_note(s)]


def recording_note(r: dict) -> str:
    """What recording alone costs the window, and whether the window target is within reach here."""
    ms = r["ms_per_trial"]
    text = (f"recording alone: the driver's MLflow writer takes {ms['mlflow']:.0f} ms of CPU per trial (the "
            f"Optuna study's writes, in the scheduling loop, are not counted); with the trials keeping all "
            f"{r['cores']} cores busy that CPU "
            f"is about {r['window_s']:.1f} s of the window")
    bound = r.get("window_ratio_at_least")
    if bound is None:
        return text
    text += f", so the window is at least about {bound:.3f}x the plain loop's (bare Ray Tune's window plus it)"
    return text


def whole_command_note(s: dict) -> str:
    text = f"whole command platform / plain = {s['ratio']:.3f}, reported"
    floor = s.get("floor_ratio")
    if floor is None:
        return text + " (without the floor, run without --no-floor to see what Ray Tune itself costs)"
    if floor > WHOLE_COMMAND_RATIO:
        return (text + f", not a target: it cannot reach {WHOLE_COMMAND_RATIO} here, since the floor itself, "
                f"bare Ray Tune / plain, is {floor:.3f} (Ray's own start-up and shut-down, paid once per command)")
    return text + f"; the floor, bare Ray Tune / plain, is {floor:.3f} here"


def result_line(s: dict) -> str:
    """``RESULT platform/bare_ray=X.XXX window_platform/plain=Y.YYY idle_gap_ms=Z``: the whole command over
    the bare Ray Tune run (the median of the repeats' paired ratios; nan without the floor), the trials'
    window over the plain loop's, and comod's mean idle gap per trial slot."""
    over_floor = s.get("platform_over_floor")
    return (f"RESULT platform/bare_ray={over_floor if over_floor is not None else math.nan:.3f} "
            f"window_platform/plain={s['window_ratio']:.3f} idle_gap_ms={s['idle_gap_ms']}")


def _floor_summary(pairs: list[dict], wall_p: float, wall_q: float) -> dict:
    if not all("floor" in p for p in pairs):
        return {}
    wall_f = sum(p["floor"]["wall_s"] for p in pairs)
    mean = lambda side, key: statistics.fmean(p[side][key] for p in pairs)  # noqa: E731
    per_repeat = [p["platform"]["wall_s"] / p["floor"]["wall_s"] for p in pairs]  # side by side in one repeat
    return {"floor_ratio": round(wall_f / wall_q, 3), "platform_over_floor": round(statistics.median(per_repeat), 3),
            "platform_over_floor_mean_walls": round(wall_p / wall_f, 3),
            "floor_ratios_per_repeat": [round(p["floor"]["wall_s"] / p["plain"]["wall_s"], 3) for p in pairs],
            "platform_over_floor_per_repeat": [round(r, 3) for r in per_repeat],
            # what bare Ray Tune itself reaches on the window and gap targets, and where comod's extra lies
            "floor_window_ratio": round(sum(p["floor"]["window_s"] for p in pairs)
                                        / sum(p["plain"]["window_s"] for p in pairs), 3),
            "floor_idle_gap_ms": round(mean("floor", "mean_gap_s") * 1000),
            "over_floor_s": {part: round(mean("platform", f"{part}_s") - mean("floor", f"{part}_s"), 2)
                             for part in ("startup", "window", "tail")}}


def row(name: str, r: dict) -> str:
    return (f"| {name} | {r['wall_s']:.1f} | {r['startup_s']:.1f} | {r['window_s']:.1f} | {r['tail_s']:.1f} | "
            f"{r['mean_trial_s'] * 1000:.0f} | {r['mean_run_experiment_s'] * 1000:.0f} | "
            f"{r['mean_gap_s'] * 1000:.0f} | {r['pretrained_models']} | "
            f"{r['load']['min']:.1f}/{r['load']['mean']:.1f}/{r['load']['max']:.1f} |")


def markdown(result: dict) -> str:
    s, st, m, v = result["summary"], result["settings"], result["machine"], result["versions"]
    lines = [
        "# Platform overhead: `comod search run` vs a plain loop" + (" (warm)" if st.get("warm") else ""),
        "",
        f"{st['trials']} trials of the tiny synthetic experiment ({st['epochs']} pretraining + {st['epochs']} "
        f"fine-tuning epochs of {st['steps_per_epoch']} steps), {st['concurrency']} at a time, one CPU thread "
        f"each; search: sampler random, scheduler fifo, Ray Tune + Optuna (SQLite) + MLflow (SQLite), "
        + ("a Ray cluster already up (`ray start --head` on 127.0.0.1, joined with --address by the search "
           "and the floor) and a runs folder whose MLflow store exists (a machine in use). "
           if st.get("warm") else "a fresh COMOD_HOME (its MLflow store made by MLflow within the command) "
           "and a Ray started by the command "
           "(a new runs folder's first search). ")
        + f"Plain: the same configs (the search's trials' config.yaml) through "
        f"`comod.train.run_experiment` in a ProcessPoolExecutor({st['concurrency']}), data loaded once per "
        f"worker, a shared pretraining cache like the search's. Both timed as whole commands. "
        f"{len(result['pairs'])} repeat(s), the order alternating"
        f"{', after an untimed round of each side' if result['settings'].get('warmup') else ''}.",
        "",
        f"Machine: {m['processor']}, {m['cpu_count']} CPUs; {m['platform']}. Versions: Ray {v['ray']}, "
        f"MLflow {v['mlflow']}, Optuna {v['optuna']}, torch {v['torch']}, Python {v['python']}. "
        f"1-min load average before: {result['load_wait']['load_at_start']} (waited "
        f"{result['load_wait']['waited_s']:.0f} s for < {result['load_wait']['limit']}); during the runs "
        f"min/mean/max per row below; total {result['total_s']:.0f} s.",
        "",
        "| run | wall s | start-up s | trials' window s | tail s | ms in a trial | ms run_experiment | "
        "ms idle gap / trial slot | pretrained models | load min/mean/max |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for i, p in enumerate(result["pairs"]):
        lines.append(row(f"{i + 1}: platform", p["platform"]))
        if "floor" in p:
            lines.append(row(f"{i + 1}: bare Ray Tune", p["floor"]))
        lines.append(row(f"{i + 1}: plain", p["plain"]))
    lines += [
        "",
        "start-up = command start to the first trial's run_experiment start; window = first trial start to "
        "last trial end; tail = last trial end to command end; ms in a trial = config.yaml to final "
        "checkpoint.pt of a trial folder; ms run_experiment = its own `wall_seconds` (without model build); "
        "idle gap = (window x concurrency - time in trials) / trials, which is the gaps between two trials "
        "of a slot plus the slots' idle time at the window's ends.",
        "",
        f"- ratio platform / plain (whole commands): **{s['ratio']:.3f}** (per repeat: "
        f"{', '.join(f'{r:.3f}' for r in s['ratios_per_repeat'])}); trials' window only: {s['window_ratio']:.3f} "
        f"(per repeat: {', '.join(f'{r:.3f}' for r in s.get('window_ratios_per_repeat', []))})",
        f"- per-trial overhead: {s['per_trial_overhead_ms']:.0f} ms of wall clock amortised over the whole "
        f"command; {s['per_trial_overhead_window_ms']:.0f} ms in the trials' window "
        f"({s['per_trial_overhead_slot_ms']:.0f} ms of a trial slot)",
        f"- of which: start-up +{s['startup_extra_s']:.1f} s, tail +{s['tail_extra_s']:.1f} s (once per search); "
        f"in a trial {s['in_trial_extra_ms']:+.0f} ms, idle gap between trials {s['gap_extra_ms']:+.0f} ms "
        f"(per trial slot)",
    ]
    if "floor_ratio" in s:
        lines += [
            f"- the floor: bare Ray Tune (the same configs as one `Tuner` of a function trainable calling "
            f"run_experiment, data through the object store, actor reuse, the same concurrency; no Optuna, "
            f"MLflow, checkpoints or callbacks) / plain = **{s['floor_ratio']:.3f}** (per repeat: "
            f"{', '.join(f'{r:.3f}' for r in s['floor_ratios_per_repeat'])}); platform / bare Ray Tune = "
            f"**{s['platform_over_floor']:.3f}** (the median of the repeats' paired ratios; the ratio of the mean "
            f"walls {s['platform_over_floor_mean_walls']:.3f})",
        ]
    lines += ["", f"The guard: the whole command at most {TARGET_OVER_FLOOR}x the bare Ray Tune run (what comod "
              f"adds to Ray Tune). The trials' window over the plain loop's and the idle gap per trial slot are "
              f"reported beside it; their targets ({TARGET_WINDOW}x, {TARGET_GAP_MS} ms) are retired.", ""]
    verdicts = target_lines(s)
    lines += [f"**{line}**" for line in verdicts[:3]] + [""] + [f"- {line}" for line in verdicts[3:]]
    return "\n".join(lines) + "\n"


def warm_up(root: Path, args) -> None:
    """One untimed round of each side on a few trials, so that no timed repeat pays what a machine pays once
    (Python compiling changed modules to bytecode, the libraries' first reads from disk)."""
    print("warm-up: one untimed round of each side, 4 trials", flush=True)
    few = argparse.Namespace(**{**vars(args), "trials": 4})
    work = root / "warm-up"
    work.mkdir()
    configs = run_platform(write_search(work / "overhead.yaml", few), work, few)["configs"]
    if not args.no_floor:
        run_floor(configs, work, few)
    run_plain(configs, work, few)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.plain_worker:
        return plain_main(args.plain_worker[0], args.plain_worker[1], int(args.plain_worker[2]))
    if args.floor_worker:
        return floor_main(args.floor_worker[0], args.floor_worker[1], int(args.floor_worker[2]))
    started = time.time()
    load_wait = wait_for_load(args.wait_load, args.max_wait)
    root = Path(tempfile.mkdtemp(prefix="platform-overhead-"))
    print(f"work folder {root}; load average {os.getloadavg()[0]:.2f}", flush=True)
    pairs = []
    args.cluster = None
    try:
        if args.warm:
            args.cluster = WarmCluster(args.concurrency).__enter__()
            print(f"warm: a Ray cluster at {args.cluster.address}; MLflow stores made before timing", flush=True)
        if args.warmup:
            warm_up(root, args)
        for rep in range(args.repeats):
            work = root / f"rep{rep}"
            work.mkdir()
            search_file = write_search(work / "overhead.yaml", args)
            configs = pairs[0]["platform"]["configs"] if pairs else None
            order = ["platform", "floor", "plain"] if rep % 2 == 0 or configs is None else ["plain", "floor", "platform"]
            if args.no_floor:
                order.remove("floor")
            pair: dict = {}
            for side in order:
                if side == "platform":
                    pair["platform"] = run_platform(search_file, work, args)
                elif side == "floor":
                    pair["floor"] = run_floor(configs or pair["platform"]["configs"], work, args)
                else:
                    pair["plain"] = run_plain(configs or pair["platform"]["configs"], work, args)
                r = pair[side]
                print(f"  repeat {rep + 1} {side:8s} wall {r['wall_s']:6.1f} s  start-up {r['startup_s']:5.1f} s  "
                      f"window {r['window_s']:6.1f} s  tail {r['tail_s']:5.1f} s  trial {r['mean_trial_s']*1000:5.0f} "
                      f"ms  gap {r['mean_gap_s']*1000:5.0f} ms  load {r['load']['mean']:.1f}", flush=True)
            pairs.append(pair)
    finally:
        if args.cluster:
            args.cluster.__exit__(None, None, None)
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    for p in pairs:
        p["platform"]["configs"] = len(p["platform"]["configs"])
    result = {"benchmark": "platform_overhead",
              "settings": {k: getattr(args, k) for k in ("trials", "concurrency", "steps_per_epoch", "epochs",
                                                          "repeats", "quick", "warm", "warmup")},
              "machine": machine(), "versions": versions(), "load_wait": load_wait,
              "total_s": round(time.time() - started, 1), "pairs": pairs}
    result["summary"] = summarise(pairs, args)
    s = result["summary"]
    print(f"platform / plain = {s['ratio']:.3f} (per repeat {s['ratios_per_repeat']}); trials' window only "
          f"{s['window_ratio']:.3f}")
    print(f"per-trial overhead {s['per_trial_overhead_ms']:.0f} ms amortised, "
          f"{s['per_trial_overhead_window_ms']:.0f} ms in the trials' window; start-up +{s['startup_extra_s']:.1f} s, "
          f"tail +{s['tail_extra_s']:.1f} s, in a trial {s['in_trial_extra_ms']:+.0f} ms, "
          f"gap {s['gap_extra_ms']:+.0f} ms")
    if "floor_ratio" in s:
        print(f"floor: bare Ray Tune / plain = {s['floor_ratio']:.3f}; platform / bare Ray Tune = "
              f"{s['platform_over_floor']:.3f}")
    print("\n".join(target_lines(s)))
    out = results_folder(args.out, args.quick)
    if out is not None:
        write_results(out, "platform_overhead_warm" if args.warm else "platform_overhead", result, markdown(result))
    print(result_line(s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
