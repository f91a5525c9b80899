"""A search of many short trials on a simulated multi-node Ray cluster.

Measured: ``--trials`` short trials (default 200; the tiny synthetic
experiment of ``search_spaces/tiny.yaml`` with ``--steps-per-epoch`` steps in
each of ``--epochs`` pretraining and fine-tuning epochs, about a second of
training on one thread) run by the real ``comod search run FILE --name N
--address ADDR --storage DIR`` as a subprocess (``python -m
comod_platform.cli``), on a ``ray.cluster_utils.Cluster`` started by this
script: a head node (``--head-cpus`` CPUs, default 0, no GPU) and ``--nodes``
worker nodes (default 3), each with ``--cpus-per-node`` logical CPUs (default
4) and one logical GPU. The search file is derived from
``search_spaces/tiny.yaml``: sampler ``random``, scheduler ``--scheduler``
(``asha``, the default, as real searches use, or ``fifo``), resources
``--cpu`` CPU (default 1) and ``--gpu`` of a GPU (default 0.5: fractional GPU
placement, two trials share a node's GPU), ``max_concurrent`` = the slots the
cluster has (nodes x min(1 / gpu, cpus-per-node / cpu)). ``COMOD_HOME`` is a
fresh folder (embedded MLflow on SQLite, Optuna on SQLite),
``COMOD_DOWNLOAD=0``, Ray Tune's storage is ``<tmp>/storage``; the cluster
lives under a private short temp dir in /tmp, and every process that mentions
it is killed at the end.

Reported:

* wall time of the whole command (interpreter start to exit; the cluster is
  up before it starts, as a real one would be) and trials per minute;
* the ideal wall time: the sum over trials of the time inside a trial,
  divided by the concurrent slots. The time inside a trial is taken two
  ways: Ray Tune's own ``time_total_s`` (``result.json``: the trial's
  ``train()`` calls), and the trial folder
  (``config.yaml`` written when ``run_experiment`` starts, to the last file
  written there), the headline. Trials hand their epoch reports to Ray from
  a thread of their own and train on while the driver handles them, which
  Ray's ``time_total_s`` leaves out; the difference of the two is reported;
* the scheduler overhead = wall / ideal, and per trial in ms (wall minus
  ideal, amortised over the trials, and per trial slot); the start-up (command
  start to first trial start), the trials' window, the tail, and how long a
  slot freed on a node stays empty before the next trial starts there;
* where the trials ran: trials per node from the MLflow tag ``comod.node`` of
  the child runs (``comod.gpu_ids`` too), the most trials running at once on
  each node against what the fractional GPUs (and CPUs) allow, and the time
  share of the window spent at each number of running trials;
* the counts: completed / pruned / failed (the command's summary), Optuna's
  trial states and MLflow's child runs, each checked to add up to
  ``--trials``;
* what the search stores, per trial: MLflow (``mlflow.db`` plus the
  ``artifacts/`` folder, with the size of an empty store for reference),
  Optuna (``searches/N/optuna.db``), Ray Tune's storage, the trial folders;
* the machine, the versions and the 1-minute load average during the run.

Results go to ``benchmarks/results/scale.json`` and ``.md``, or
``scale_N.json`` and ``.md`` for another ``--trials N``; such a run is put
beside the 200-trial run in the same folder (driver CPU and idle slot time
per trial at both sizes; target: driver CPU per trial at most
``GROWTH_TARGET`` times that at 200), so run the two one after the other.
``--quick``: 12 trials on 2 nodes, no waiting for the load, a smoke check
that writes nothing unless ``--out`` is given.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (REPO, LoadSampler, add_run_options, clean_env, code_version,  # noqa: E402
                     kill_processes_mentioning, machine, results_folder, versions, wait_for_load, write_results)

SEARCH_NAME = "scale"
BASE_TRIALS = 200
GROWTH_TARGET = 1.5
"""Driver CPU per trial of a larger run at most this times that of the 200-trial run."""
OBJECT_STORE_BYTES = 150 * 1024 * 1024  # per node (Ray's minimum is 75 MiB; the dataset is a few KB)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=200, help="trials of the search (default 200)")
    p.add_argument("--nodes", type=int, default=3, help="worker nodes, one logical GPU each (default 3)")
    p.add_argument("--cpus-per-node", type=float, default=4, help="logical CPUs of a worker node (default 4)")
    p.add_argument("--head-cpus", type=float, default=0, help="logical CPUs of the head node (default 0)")
    p.add_argument("--cpu", type=float, default=1, help="CPUs per trial (default 1)")
    p.add_argument("--gpu", type=float, default=0.5, help="GPUs per trial, a fraction shares one (default 0.5)")
    p.add_argument("--scheduler", choices=("asha", "fifo"), default="asha", help="Ray Tune scheduler (default asha)")
    p.add_argument("--max-concurrent", type=int, default=None,
                   help="max_concurrent of the search (default: the cluster's slots)")
    p.add_argument("--steps-per-epoch", type=int, default=3,
                   help="optimisation steps per epoch, both phases (default 3, about 1 s per trial on one thread)")
    p.add_argument("--epochs", type=int, default=2, help="epochs of each phase (default 2)")
    p.add_argument("--quick", action="store_true", help="12 trials on 2 nodes, no waiting for load: a smoke check")
    add_run_options(p, max_wait=600.0, timeout=3600.0, what="the search")
    p.add_argument("--note", default="", help="a remark recorded with the results (e.g. why the size differs)")
    args = p.parse_args(argv)
    if args.quick:
        args.trials, args.nodes, args.max_wait = 12, 2, 0.0
    if not 0 < args.gpu <= 1:
        p.error("--gpu: a fraction of one GPU in (0, 1] (each worker node has one logical GPU)")
    return args


def slots_per_node(args) -> int:
    """Trials one worker node can hold at once: its GPU shared by fractions, and its CPUs."""
    return min(int(math.floor(1 / args.gpu + 1e-9)), int(math.floor(args.cpus_per_node / args.cpu + 1e-9)))


# -- helpers --------------------------------------------------------------------
def folder_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def write_search(path: Path, args, max_concurrent: int) -> Path:
    raw = yaml.safe_load((REPO / "search_spaces" / "tiny.yaml").read_text())
    for phase in ("pretrain", "finetune"):
        raw["experiment"][phase].update(epochs=args.epochs, steps_per_epoch=args.steps_per_epoch)
    scheduler = {"type": "fifo"} if args.scheduler == "fifo" else raw["search"]["scheduler"]
    raw["search"].update(num_trials=args.trials, sampler="random", scheduler=scheduler,
                         max_concurrent=max_concurrent, resources={"cpu": args.cpu, "gpu": args.gpu})
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


# -- what the search left behind --------------------------------------------------
def trial_spans(trials_root: Path) -> dict[str, dict]:
    """Per trial folder (named by the Ray trial id): start (config.yaml written when run_experiment starts)
    and end (the last file written in the folder) as wall-clock times; whether it finished (metrics.json)."""
    spans = {}
    for d in sorted(trials_root.iterdir()) if trials_root.exists() else []:
        if not (d / "config.yaml").exists():
            continue
        times = [p.stat().st_mtime for p in d.rglob("*") if p.is_file()]
        spans[d.name] = {"start": (d / "config.yaml").stat().st_mtime, "end": max(times),
                         "finished": (d / "metrics.json").exists()}
    return spans


def ray_results(experiment: Path) -> dict[str, dict]:
    """Per trial, from Ray Tune's result.json: reports, time_total_s of the last report, nodes reported."""
    out = {}
    for path in experiment.glob("*/result.json"):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if not rows:
            continue
        numeric = [k for k, v in rows[-1].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        out[rows[0]["trial_id"]] = {"reports": len(rows), "time_total_s": float(rows[-1].get("time_total_s", 0.0)),
                                    "nodes": sorted({r.get("comod/node") for r in rows if r.get("comod/node")}),
                                    "last_report_numeric_keys": len(numeric)}
    return out


def mlflow_runs(home: Path) -> tuple[list, list]:
    """(parent runs, child runs) of the search's MLflow experiment."""
    from mlflow.tracking import MlflowClient

    from comod_platform.conventions import TAG_ROLE

    client = MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
    exp = client.get_experiment_by_name(f"search/{SEARCH_NAME}")
    runs = client.search_runs([exp.experiment_id], max_results=50000)
    return ([r for r in runs if r.data.tags.get(TAG_ROLE) == "search"],
            [r for r in runs if r.data.tags.get(TAG_ROLE) == "trial"])


def log_time(text: str, marker: str) -> float | None:
    """Wall-clock time of the first Ray log line holding ``marker`` (Ray's format: local time, ms)."""
    for line in text.splitlines():
        if marker in line:
            try:
                return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            except ValueError:
                return None
    return None


def optuna_states(home: Path) -> dict:
    import optuna

    meta = json.loads((home / "searches" / SEARCH_NAME / "meta.json").read_text())
    study = optuna.load_study(study_name=meta["study_name"], storage=meta["optuna_storage"])
    return dict(Counter(t.state.name for t in study.trials))


def empty_mlflow_store_bytes(folder: Path) -> int:
    """Size of an MLflow SQLite store with its tables made and nothing in it."""
    from mlflow.tracking import MlflowClient

    folder.mkdir(parents=True, exist_ok=True)
    MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlflow.db'}").search_experiments()
    return sum(p.stat().st_size for p in folder.glob("mlflow.db*"))


def concurrency(spans: list[dict]) -> tuple[int, dict[int, float]]:
    """Most spans open at once, and the seconds spent at each number open (first start to last end)."""
    events = sorted([(s["start"], 1) for s in spans] + [(s["end"], -1) for s in spans], key=lambda e: (e[0], e[1]))
    running = peak = 0
    at: dict[int, float] = {}
    last = events[0][0] if events else 0.0
    for t, step in events:
        at[running] = at.get(running, 0.0) + (t - last)
        last = t
        running += step
        peak = max(peak, running)
    return peak, at


def refill_gaps(spans: list[dict], per_node: int) -> list[float]:
    """On one node: for every trial end after which the node held fewer trials than it allows, the seconds
    until the next trial started there (a freed slot left empty)."""
    gaps = []
    starts = sorted(s["start"] for s in spans)
    for s in spans:
        later = [t for t in starts if t >= s["end"]]
        if not later:
            continue
        running_after = sum(1 for o in spans if o["start"] <= s["end"] < o["end"])
        if running_after < per_node:
            gaps.append(later[0] - s["end"])
    return gaps


def quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    v = sorted(values)
    return v[min(len(v) - 1, int(round(q * (len(v) - 1))))]


# -- the run ----------------------------------------------------------------------
def run(args, work: Path) -> dict:
    from ray.cluster_utils import Cluster

    from comod_platform.conventions import (TAG_GPUS, TAG_KIND, TAG_NODE, TAG_STATE, TAG_STOPPED_EPOCH,
                                            TAG_TRIAL_ID)

    ray_tmp = tempfile.mkdtemp(prefix="sc", dir="/tmp")  # short: Ray's socket paths are length-limited
    (Path(ray_tmp) / "ray").mkdir()  # Ray writes the cluster's address to $RAY_TMPDIR/ray/
    home, storage = work / "home", work / "storage"
    home.mkdir()
    per_node = slots_per_node(args)
    slots_total = args.nodes * per_node
    max_concurrent = args.max_concurrent or slots_total
    slots = min(max_concurrent, slots_total)
    search_file = write_search(work / "scale.yaml", args, max_concurrent)
    # the cluster's daemons and workers inherit this process's environment
    saved_env = {k: os.environ.get(k) for k in ("RAY_TMPDIR", "OMP_NUM_THREADS", "RAY_USAGE_STATS_ENABLED")}
    os.environ.update(RAY_TMPDIR=ray_tmp, RAY_USAGE_STATS_ENABLED="0")
    os.environ.pop("OMP_NUM_THREADS", None)  # Ray then gives each trial worker its num_cpus threads
    cluster = None
    killed = 0
    log = work / "search.log"
    try:
        t_cluster = time.time()
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": args.head_cpus, "num_gpus": 0, "temp_dir": ray_tmp, "include_dashboard": False,
            "object_store_memory": OBJECT_STORE_BYTES})
        workers = [cluster.add_node(num_cpus=args.cpus_per_node, num_gpus=1, object_store_memory=OBJECT_STORE_BYTES)
                   for _ in range(args.nodes)]
        cluster.wait_for_nodes()
        cluster_start_s = time.time() - t_cluster
        labels = {cluster.head_node.node_id: "head", **{w.node_id: f"worker{i + 1}" for i, w in enumerate(workers)}}
        print(f"cluster up in {cluster_start_s:.1f} s: head ({args.head_cpus:g} CPUs, no GPU) + {args.nodes} "
              f"workers ({args.cpus_per_node:g} CPUs, 1 GPU each) at {cluster.address}; {slots} slots "
              f"({per_node} per node), max_concurrent {max_concurrent}", flush=True)
        env = clean_env(COMOD_HOME=str(home), COMOD_DOWNLOAD="0", RAY_TMPDIR=ray_tmp)
        cmd = [sys.executable, "-m", "comod_platform.cli", "search", "run", str(search_file), "--name", SEARCH_NAME,
               "--address", cluster.address, "--storage", str(storage), "--json"]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        with LoadSampler() as load, open(log, "w") as out:
            t0 = time.time()
            proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                rc = proc.wait(args.timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                rc = "timeout"
            t1 = time.time()
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        driver_cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    finally:
        if cluster is not None:
            try:
                cluster.shutdown()
            except Exception as err:  # noqa: BLE001 - the processes are killed below anyway
                print(f"cluster shutdown: {err}", file=sys.stderr)
        killed = kill_processes_mentioning(ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    text = log.read_text()
    if rc != 0:
        raise SystemExit(f"comod search run failed ({rc}); log {log}:\n{text[-4000:]}")
    summary = json.JSONDecoder().raw_decode(text[text.index('{\n  "name"'):])[0]

    # -- time: trial folders (primary) and Ray Tune's result.json (cross-check)
    search_root = home / "searches" / SEARCH_NAME
    spans = trial_spans(search_root / "trials")
    rays = ray_results(storage / SEARCH_NAME)
    parents, children = mlflow_runs(home)
    by_trial = {c.data.tags.get(TAG_TRIAL_ID): c for c in children}
    for tid, s in spans.items():
        child = by_trial.get(tid)
        s["node"] = labels.get(child.data.tags.get(TAG_NODE), "?") if child else "?"
    span_list = sorted(spans.values(), key=lambda s: s["start"])
    n = len(span_list)
    busy = sum(s["end"] - s["start"] for s in span_list)
    ray_busy = sum(r["time_total_s"] for r in rays.values())
    first = min(s["start"] for s in span_list)
    last = max(s["end"] for s in span_list)
    wall = t1 - t0
    window = last - first
    ideal = busy / slots
    ideal_ray = ray_busy / slots
    peak_all, at = concurrency(span_list)

    # -- start-up, in steps (command start = 0)
    connected = log_time(text, "Connected to Ray cluster")
    startup = {"ray_connected_s": round(connected - t0, 2) if connected else None,
               "mlflow_parent_run_s": round(min(r.info.start_time for r in parents) / 1000 - t0, 2) if parents else None,
               "first_trial_started_by_tune_s": round(min(c.info.start_time for c in children) / 1000 - t0, 2)
               if children else None,
               "first_trial_running_s": round(first - t0, 2)}

    # -- placement
    nodes = {}
    for label in ["head"] + [f"worker{i + 1}" for i in range(args.nodes)] + ["?"]:
        mine = [s for s in span_list if s["node"] == label]
        if not mine and label in ("head", "?"):
            nodes[label] = {"trials": 0}
            continue
        peak, _ = concurrency(mine) if mine else (0, {})
        gaps = refill_gaps(mine, per_node) if mine else []
        nodes[label] = {"trials": len(mine), "max_concurrent": peak, "allowed": 0 if label == "head" else per_node,
                        "busy_s": round(sum(s["end"] - s["start"] for s in mine), 2),
                        "refill_gap_median_s": round(statistics.median(gaps), 3) if gaps else None,
                        "refill_gap_p90_s": round(quantile(gaps, 0.9), 3) if gaps else None,
                        "refill_gaps": len(gaps)}
    all_gaps = []
    for label in nodes:
        if label.startswith("worker"):
            all_gaps += refill_gaps([s for s in span_list if s["node"] == label], per_node)
    gpu_ids = dict(Counter(c.data.tags.get(TAG_GPUS, "") for c in children))
    moved = sum(1 for r in rays.values() if len(r["nodes"]) > 1)

    # -- counts
    states = optuna_states(home)
    mlflow_states = dict(Counter(c.data.tags.get(TAG_STATE, "?") for c in children))
    mlflow_status = dict(Counter(c.info.status for c in children))
    counts = {"summary": {k: summary[k] for k in ("trials", "completed", "pruned", "failed")},
              "optuna_states": states, "optuna_trials": sum(states.values()),
              "mlflow_child_runs": len(children), "mlflow_states": mlflow_states, "mlflow_status": mlflow_status,
              "trial_folders": n, "trial_folders_finished": sum(s["finished"] for s in span_list),
              "ray_trials": len(rays),
              "kinds": dict(Counter(c.data.tags.get(TAG_KIND, "?") for c in children)),
              "pruned_at_epoch": dict(Counter(c.data.tags.get(TAG_STOPPED_EPOCH, "?") for c in children
                                              if c.data.tags.get(TAG_STATE) == "pruned")),
              "tune_snapshot_warnings": text.count("Experiment state snapshotting has been triggered"),
              "ray_reports": sum(r["reports"] for r in rays.values()),
              "numeric_keys_in_final_report": max((r["last_report_numeric_keys"] for r in rays.values()), default=0),
              "pretrained_models": len(list((search_root / "pretrain_cache").glob("*.pt")))}
    checks = {
        "summary_trials": summary["trials"] == args.trials,
        "summary_adds_up": summary["completed"] + summary["pruned"] + summary["failed"] == args.trials,
        "no_failed": summary["failed"] == 0,
        "optuna_trials": counts["optuna_trials"] == args.trials,
        "optuna_complete_eq_completed": states.get("COMPLETE", 0) == summary["completed"],
        "optuna_pruned_eq_pruned": states.get("PRUNED", 0) == summary["pruned"],
        "mlflow_child_runs": len(children) == args.trials,
        "mlflow_none_running": mlflow_status.get("RUNNING", 0) == 0,
        "mlflow_states_eq_summary": all(mlflow_states.get(k, 0) == summary[k]
                                        for k in ("completed", "pruned", "failed")),
        "trial_folders": n == args.trials,
        "ray_trials": len(rays) == args.trials,
        "every_trial_placed": nodes["?"]["trials"] == 0,
        "head_got_none": nodes["head"]["trials"] == 0,
        "per_node_within_allowed": all(v.get("max_concurrent", 0) <= v.get("allowed", 0)
                                       for k, v in nodes.items() if k.startswith("worker")),
    }

    # -- storage
    empty_store = empty_mlflow_store_bytes(work / "empty_store")
    mlflow_db = sum(p.stat().st_size for p in home.glob("mlflow.db*"))
    artifacts = folder_bytes(home / "artifacts")
    sizes = {"mlflow_db_bytes": mlflow_db, "mlflow_artifacts_bytes": artifacts,
             "mlflow_empty_store_bytes": empty_store,
             "optuna_db_bytes": folder_bytes(search_root / "optuna.db"),
             "ray_storage_bytes": folder_bytes(storage),
             "trial_folders_bytes": folder_bytes(search_root / "trials"),
             "pretrain_cache_bytes": folder_bytes(search_root / "pretrain_cache"),
             "ray_experiment_state_bytes": sum(p.stat().st_size
                                               for p in (storage / SEARCH_NAME).glob("experiment_state-*.json"))}
    per_trial = {"mlflow_bytes": round((mlflow_db + artifacts) / args.trials),
                 "mlflow_db_bytes": round(mlflow_db / args.trials),
                 "mlflow_db_above_empty_bytes": round((mlflow_db - empty_store) / args.trials),
                 "mlflow_artifacts_bytes": round(artifacts / args.trials),
                 "optuna_bytes": round(sizes["optuna_db_bytes"] / args.trials),
                 "ray_storage_bytes": round(sizes["ray_storage_bytes"] / args.trials),
                 "trial_folder_bytes": round(sizes["trial_folders_bytes"] / args.trials)}

    return {
        "cluster": {"address": cluster.address, "start_s": round(cluster_start_s, 1), "head_cpus": args.head_cpus,
                    "worker_nodes": args.nodes, "cpus_per_node": args.cpus_per_node, "gpus_per_node": 1,
                    "object_store_bytes_per_node": OBJECT_STORE_BYTES, "slots_per_node": per_node,
                    "slots": slots, "max_concurrent": max_concurrent, "ray_processes_killed_after": killed},
        "time": {"wall_s": round(wall, 2), "trials_per_min": round(args.trials / wall * 60, 2),
                 "startup_s": round(first - t0, 2), "startup_steps": startup, "window_s": round(window, 2), "tail_s": round(t1 - last, 2),
                 "window_trials_per_min": round(n / window * 60, 2),
                 "sum_in_trial_s": round(busy, 2), "mean_in_trial_s": round(busy / n, 3),
                 "median_in_trial_s": round(statistics.median(s["end"] - s["start"] for s in span_list), 3),
                 "mean_in_trial_finished_s": round(statistics.fmean(
                     [s["end"] - s["start"] for s in span_list if s["finished"]] or [float("nan")]), 3),
                 "mean_in_trial_pruned_s": round(statistics.fmean(
                     [s["end"] - s["start"] for s in span_list if not s["finished"]] or [float("nan")]), 3),
                 "sum_ray_time_total_s": round(ray_busy, 2),
                 # a trial trains on while the driver handles its report; Ray's time_total_s leaves that out
                 "sum_folders_minus_ray_s": round(busy - ray_busy, 2),
                 "folders_minus_ray_per_report_ms": round((busy - ray_busy) / max(1, sum(
                     r["reports"] for r in rays.values())) * 1000, 1),
                 "ideal_s": round(ideal, 2), "ideal_ray_s": round(ideal_ray, 2),
                 "overhead_ratio": round(wall / ideal, 3), "overhead_ratio_ray": round(wall / ideal_ray, 3),
                 "window_ratio": round(window / ideal, 3),
                 "overhead_per_trial_ms": round((wall - ideal_ray) / args.trials * 1000, 1),
                 "overhead_per_trial_slot_ms": round((wall - ideal_ray) / args.trials * slots * 1000, 1),
                 "overhead_per_trial_folders_ms": round((wall - ideal) / args.trials * 1000, 1),
                 "overhead_per_trial_slot_folders_ms": round((wall - ideal) / args.trials * slots * 1000, 1),
                 "window_gap_per_trial_slot_ms": round((window * slots - busy) / n * 1000, 1),
                 "mean_running": round(busy / window, 2) if window > 0 else None,
                 "peak_running": peak_all,
                 "seconds_at_running": {str(k): round(v, 2) for k, v in sorted(at.items())},
                 "refill_gap_median_s": round(statistics.median(all_gaps), 3) if all_gaps else None,
                 "refill_gap_p90_s": round(quantile(all_gaps, 0.9), 3) if all_gaps else None,
                 "refill_gap_max_s": round(max(all_gaps), 3) if all_gaps else None,
                 "driver_cpu_s": round(driver_cpu_s, 2),
                 "driver_cpu_per_trial_ms": round(driver_cpu_s / args.trials * 1000, 1)},
        "placement": {"nodes": nodes, "gpu_ids": gpu_ids, "trials_on_several_nodes": moved},
        "counts": counts, "checks": checks, "sizes": sizes, "per_trial": per_trial,
        "load": load.summary(), "log_tail": text[-1500:] if not all(checks.values()) else "",
    }


# -- report -----------------------------------------------------------------------
def kb(b: float) -> str:
    return f"{b / 1024:.1f} KiB" if b < 1024 * 1024 else f"{b / 1024 / 1024:.2f} MiB"


def report_lines(r: dict, st: dict) -> list[str]:
    t, c, p, cl = r["time"], r["counts"], r["per_trial"], r["cluster"]
    s = c["summary"]
    node_rows = [f"| {k} | {v['trials']} | {v.get('max_concurrent', 0)} | {v.get('allowed', 0)} | "
                 f"{v.get('busy_s', 0):.1f} | "
                 + (f"{v['refill_gap_median_s'] * 1000:.0f} / {v['refill_gap_p90_s'] * 1000:.0f}"
                    if v.get("refill_gap_median_s") is not None else "-") + " |"
                 for k, v in r["placement"]["nodes"].items() if k != "?" or v["trials"]]
    busy_share = t["seconds_at_running"].get(str(cl["slots"]), 0.0) / t["window_s"] if t["window_s"] else 0.0
    return [
        "| measure | value |",
        "|---|---:|",
        f"| wall time of `comod search run` | {t['wall_s']:.1f} s |",
        f"| trials per minute (whole command / trials' window) | {t['trials_per_min']:.1f} / "
        f"{t['window_trials_per_min']:.1f} |",
        f"| start-up / trials' window / tail | {t['startup_s']:.1f} / {t['window_s']:.1f} / {t['tail_s']:.1f} s |",
        "| start-up steps, s after the command started: Ray connected / MLflow parent run / first trial started "
        "by Tune (its child run) / first trial running (config.yaml) | "
        + " / ".join("-" if v is None else f"{v:.1f}" for v in t["startup_steps"].values()) + " |",
        f"| time inside trials, summed (trial folders / Ray `time_total_s`) | {t['sum_in_trial_s']:.1f} / "
        f"{t['sum_ray_time_total_s']:.1f} s |",
        f"| folders - Ray: training while the driver handles a report, per report | "
        f"{t['sum_folders_minus_ray_s']:.1f} s, {t['folders_minus_ray_per_report_ms']:.0f} ms over "
        f"{c['ray_reports']} reports |",
        f"| mean time inside a trial (all / finished / pruned) | {t['mean_in_trial_s'] * 1000:.0f} / "
        f"{t['mean_in_trial_finished_s'] * 1000:.0f} / {t['mean_in_trial_pruned_s'] * 1000:.0f} ms |",
        f"| concurrent slots | {cl['slots']} ({cl['worker_nodes']} nodes x {cl['slots_per_node']}) |",
        f"| ideal wall time = time inside trials / slots (Ray / folders) | {t['ideal_ray_s']:.1f} / {t['ideal_s']:.1f} s |",
        f"| **scheduler overhead = wall / ideal** (Ray / folders: the trials' own time, the headline) | "
        f"{t['overhead_ratio_ray']:.2f} / **{t['overhead_ratio']:.2f}** |",
        f"| trials' window / ideal | {t['window_ratio']:.2f} |",
        f"| overhead per trial, wall clock amortised (Ray / folders) | {t['overhead_per_trial_ms']:.0f} / "
        f"{t['overhead_per_trial_folders_ms']:.0f} ms |",
        f"| overhead per trial, per trial slot (Ray / folders) | {t['overhead_per_trial_slot_ms']:.0f} / "
        f"{t['overhead_per_trial_slot_folders_ms']:.0f} ms |",
        f"| idle slot time per trial inside the window | {t['window_gap_per_trial_slot_ms']:.0f} ms |",
        f"| mean / peak trials running in the window; share of it with all {cl['slots']} slots busy | "
        f"{t['mean_running']:.2f} / {t['peak_running']}; {busy_share:.0%} |",
        f"| freed slot left empty before the next trial starts on its node: median / p90 / max | "
        f"{t['refill_gap_median_s'] * 1000:.0f} / {t['refill_gap_p90_s'] * 1000:.0f} / "
        f"{t['refill_gap_max_s'] * 1000:.0f} ms |" if t["refill_gap_median_s"] is not None else
        "| freed slot left empty | - |",
        f"| driver CPU (user+sys of the `comod search run` process) | {t['driver_cpu_s']:.1f} s, "
        f"{t['driver_cpu_per_trial_ms']:.0f} ms per trial |",
        f"| completed / pruned / failed (summary) | {s['completed']} / {s['pruned']} / {s['failed']} of "
        f"{s['trials']} |",
        f"| Optuna trial states | {', '.join(f'{k} {v}' for k, v in sorted(c['optuna_states'].items()))} "
        f"({c['optuna_trials']}) |",
        f"| MLflow child runs (state tags) | {c['mlflow_child_runs']} "
        f"({', '.join(f'{k} {v}' for k, v in sorted(c['mlflow_states'].items()))}) |",
        f"| trial folders / Ray trials / pretrained models | {c['trial_folders']} / {c['ray_trials']} / "
        f"{c['pretrained_models']} |",
        f"| modulation kinds; pruned at epoch | {', '.join(f'{k} {v}' for k, v in sorted(c['kinds'].items()))}; "
        f"{', '.join(f'{k}: {v}' for k, v in sorted(c['pruned_at_epoch'].items())) or '-'} |",
        f"| Ray Tune 'experiment state snapshotting ... may become a bottleneck' warnings (0 also when the "
        "platform silences them: TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S=0) | "
        f"{c['tune_snapshot_warnings']} |",
        f"| Ray Tune experiment state file at the end; numeric keys in a trial's final report | "
        f"{kb(r['sizes']['ray_experiment_state_bytes'])} ({kb(r['sizes']['ray_experiment_state_bytes'] / max(1, c['trial_folders']))} "
        f"per trial); {c['numeric_keys_in_final_report']} |",
        f"| MLflow per trial (mlflow.db + artifacts/) | {kb(p['mlflow_bytes'])} ({kb(p['mlflow_db_bytes'])} db, "
        f"{kb(p['mlflow_db_above_empty_bytes'])} above an empty store of {kb(r['sizes']['mlflow_empty_store_bytes'])}; "
        f"{kb(p['mlflow_artifacts_bytes'])} artifacts) |",
        f"| Optuna per trial (optuna.db) | {kb(p['optuna_bytes'])} |",
        f"| Ray Tune storage per trial | {kb(p['ray_storage_bytes'])} |",
        f"| trial folder per trial (searches/N/trials) | {kb(p['trial_folder_bytes'])} |",
        f"| 1-min load average min / mean / max | {r['load']['min']:.1f} / {r['load']['mean']:.1f} / "
        f"{r['load']['max']:.1f} |",
        "",
        "| node | trials | most at once | allowed (GPU fraction, CPUs) | s inside trials | "
        "freed slot empty, ms median / p90 |",
        "|---|---:|---:|---:|---:|---:|",
        *node_rows,
        "",
        f"GPU ids assigned (tag `comod.gpu_ids`): {r['placement']['gpu_ids']}; trials that ran on more than one "
        f"node: {r['placement']['trials_on_several_nodes']}.",
    ]


def markdown(result: dict) -> str:
    st, m, v, r = result["settings"], result["machine"], result["versions"], result["run"]
    cl = r["cluster"]
    checks = r["checks"]
    failed = [k for k, ok in checks.items() if not ok]
    lines = [
        "# Scale: many short trials on a multi-node Ray cluster",
        "",
        f"{st['trials']} trials of the tiny synthetic experiment ({st['epochs']} pretraining + {st['epochs']} "
        f"fine-tuning epochs of {st['steps_per_epoch']} steps) through `comod search run --address ... --storage "
        f"...`: sampler random, scheduler {st['scheduler']}, resources cpu {st['cpu']:g} + gpu {st['gpu']:g}, "
        f"max_concurrent {cl['max_concurrent']}. Cluster (`ray.cluster_utils.Cluster`, all on this machine): "
        f"a head with {cl['head_cpus']:g} CPUs and no GPU, {cl['worker_nodes']} worker nodes of "
        f"{cl['cpus_per_node']:g} logical CPUs and 1 logical GPU, so {cl['slots_per_node']} trials per node and "
        f"{cl['slots']} slots (up in {cl['start_s']:.0f} s, before the command starts). Fresh COMOD_HOME "
        f"(MLflow and Optuna on SQLite), COMOD_DOWNLOAD=0."
        + (" **Not the default size: see the note below.**" if st.get("note") else ""),
        "",
        f"Machine: {m['processor']}, {m['cpu_count']} CPUs; {m['platform']}. Versions: Ray {v['ray']}, "
        f"MLflow {v['mlflow']}, Optuna {v['optuna']}, torch {v['torch']}, Python {v['python']}. "
        f"Code: commit {result['code']['commit']}"
        + (f" with changes to {', '.join(result['code']['changed_since'])}" if result['code']['changed_since']
           else " (comod/ and platform/ unchanged)") + ". "
        f"1-min load average before: {result['load_wait']['load_at_start']} (waited "
        f"{result['load_wait']['waited_s']:.0f} s for < {result['load_wait']['limit']}); during the run "
        f"{r['load']['min']:.1f}/{r['load']['mean']:.1f}/{r['load']['max']:.1f} (min/mean/max); total "
        f"{result['total_s']:.0f} s. The {cl['slots']} slots share {m['cpu_count']} physical cores (and the "
        f"machine with other work), so the time inside a trial is measured under that contention; the ideal "
        f"wall time uses it as measured.",
        "",
        *report_lines(r, st),
        "",
        "Time inside a trial = its folder's `config.yaml` (written when `run_experiment` starts) to the last "
        "file written there (the final checkpoint, metrics and plots; the last epoch's checkpoint for a pruned "
        "trial). Ray's `time_total_s` sums the trial's `train()` calls: from the driver's go-ahead to the "
        "trial's next `tune.report`, so it also counts the trial function before `run_experiment` (data from "
        "the object store, checkpoint restore) but not the time a trial trains on while the driver handles a "
        "report (trials report from a thread of their own); the difference of the two sums is mostly that. "
        "Ideal = sum / slots, the headline uses the folders' (the trials' own time); overhead per "
        "trial = (wall - ideal) / trials (x slots: per trial slot). A freed slot: a trial ended on a node that then held fewer "
        "trials than it allows; measured to the next trial start on that node. Node of a trial = the MLflow "
        "tag `comod.node` of its child run.",
        "",
        f"Checks: {'all passed' if not failed else 'FAILED: ' + ', '.join(failed)} "
        f"({', '.join(checks)}).",
    ]
    if st.get("note"):
        lines += ["", f"Note: {st['note']}"]
    if result.get("beside_base"):
        lines += ["", f"Beside the {BASE_TRIALS}-trial run in the same folder (`scale.json`, run just before): "
                  + growth_line(result["beside_base"])]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.time()
    code = code_version()  # before the run: what the search imports
    load_wait = wait_for_load(args.wait_load, args.max_wait)
    work = Path(tempfile.mkdtemp(prefix="comod-scale-"))
    print(f"work folder {work}; load average {os.getloadavg()[0]:.2f}; {args.trials} trials, {args.nodes} nodes, "
          f"scheduler {args.scheduler}; code {code['commit']}"
          + (f" + changes to {', '.join(code['changed_since'])}" if code["changed_since"] else ""), flush=True)
    try:
        r = run(args, work)
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    settings = {k: getattr(args, k) for k in ("trials", "nodes", "cpus_per_node", "head_cpus", "cpu", "gpu",
                                               "scheduler", "max_concurrent", "steps_per_epoch", "epochs", "quick")}
    if args.trials != 200 and not args.quick:
        settings["note"] = f"run with --trials {args.trials} instead of the default 200"
    if args.note:
        settings["note"] = "; ".join(filter(None, [settings.get("note"), args.note]))
    result = {"benchmark": "scale", "settings": settings, "machine": machine(), "versions": versions(), "code": code,
              "load_wait": load_wait, "total_s": round(time.time() - started, 1), "run": r}
    print("\n".join(report_lines(r, settings)))
    failed = [k for k, ok in r["checks"].items() if not ok]
    print(f"checks: {'all passed' if not failed else 'FAILED: ' + ', '.join(failed)}")
    if failed and r.get("log_tail"):
        print(r["log_tail"])
    out = results_folder(args.out, args.quick)
    stem = "scale" if args.trials == BASE_TRIALS or args.quick else f"scale_{args.trials}"
    if out is not None and stem != "scale" and (out / "scale.json").exists():
        result["beside_base"] = growth(json.loads((out / "scale.json").read_text())["run"], r)
        print(growth_line(result["beside_base"]))
    if out is not None:
        write_results(out, stem, result, markdown(result))
    return 1 if failed else 0


def growth(base: dict, run: dict) -> dict:
    """How the per-trial costs grow from the 200-trial run ``base`` to ``run``."""
    keys = ("driver_cpu_per_trial_ms", "window_gap_per_trial_slot_ms")
    b, r = base["time"], run["time"]
    out = {k: {"base": b[k], "this": r[k], "ratio": round(r[k] / b[k], 3) if b[k] else None} for k in keys}
    ratio = out["driver_cpu_per_trial_ms"]["ratio"]
    out["target"] = GROWTH_TARGET
    out["pass"] = ratio is not None and ratio <= GROWTH_TARGET
    return out


def growth_line(g: dict) -> str:
    cpu, idle = g["driver_cpu_per_trial_ms"], g["window_gap_per_trial_slot_ms"]
    return (f"{'PASS' if g['pass'] else 'MISS'}: driver CPU per trial {cpu['this']:.0f} ms against "
            f"{cpu['base']:.0f} ms at {BASE_TRIALS} trials = {cpu['ratio']}x (target <= {g['target']}); idle slot "
            f"time per trial {idle['this']:.0f} ms against {idle['base']:.0f} ms")


if __name__ == "__main__":
    sys.exit(main())
