"""The platform's reason to exist, measured: one search run with `comod search run`, and the same search
written by hand on Ray Tune, as a user would write it without comod.

The search is a search file (``--search``, default ``search_spaces/quickstart_tpe.yaml``; ``--trials``
overrides its ``num_trials``), run two ways, each as a whole command in a process of its own, with the
same trials, sampler and seed, scheduler, resources per trial and concurrency:

* hand-written: this script's ``--hand-written-worker`` mode, a plain Ray Tune script: a ``Tuner`` over
  a function trainable, ``ray.tune.search.optuna.OptunaSearch`` on a define-by-run translation of the
  file's space (its ``when`` conditions included) with the file's sampler and seed, ASHA on Ray's
  iteration count when the file says ``asha``, and Ray's own
  ``ray.air.integrations.mlflow.MLflowLoggerCallback`` (``save_artifact=True``) tracking to a SQLite
  MLflow store in a temporary folder. Each trial loads its data (``comod.data.load_data``) and pretrains
  its own model: ``comod.train.run_experiment`` with no shared data and no pretraining cache, every
  epoch reported with ``ray.tune.report`` from ``run_experiment``'s ``on_epoch`` callback (the phase's
  validation metric also under the search metric's name, so ASHA sees one curve), and the final
  metrics reported at the end;
* comod: ``python -m comod_platform.cli search run FILE --name N --json`` in a fresh ``COMOD_HOME``
  (embedded MLflow and Optuna on SQLite), ``COMOD_DOWNLOAD=0``.

comod runs first and the hand-written script second (the data files are then in the page cache for the
hand-written side's many loads). Each side has a private ``RAY_TMPDIR`` whose processes are killed
afterwards. Reported: the wall time of each command and their ratio comod / hand-written (target: at most
0.5), and what each recorded: MLflow runs and the child runs nested under a parent run (tag
``mlflow.parentRunId``), trials stopped early by ASHA and the Optuna trial states they were told as,
plots logged as artifacts, and the pretrainings each did. Also recorded: the 1-minute load average
(waited for before, sampled during), the machine, the versions and the checkout.

Results go to ``benchmarks/results/vs_hand_written.json`` and ``.md`` (``--quick``: search_spaces/tiny.yaml
with 3 trials, no waiting for the load, a smoke check that writes nothing unless ``--out`` is given).
The last line printed is ``RESULT comod/hand_written=X.XXX``.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (REPO, LoadSampler, add_run_options, clean_env, code_version,  # noqa: E402
                     kill_processes_mentioning, machine, results_folder, versions, wait_for_load, write_results)

TARGET_RATIO = 0.5
"""comod's wall time at most this share of the hand-written script's."""
SEARCH_NAME = "vs_hand_written"
FINAL = "final"
"""Key of the hand-written trainable's last report (with the final metrics): a trial without it stopped early."""
PLOT_SUFFIXES = (".png", ".svg", ".pdf", ".html")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--search", default="quickstart_tpe",
                   help="a search file, or the name of one in search_spaces/ (default quickstart_tpe)")
    p.add_argument("--trials", type=int, default=None, help="trials of each side (default: the file's num_trials)")
    p.add_argument("--quick", action="store_true",
                   help="search_spaces/tiny.yaml, 3 trials, no waiting for load: a smoke check")
    add_run_options(p, max_wait=900.0, timeout=7200.0, what="one side")
    p.add_argument("--hand-written-worker", nargs=2, metavar=("SEARCH_YAML", "WORK_DIR"),
                   help=argparse.SUPPRESS)  # internal: the hand-written side, run as its own command
    args = p.parse_args(argv)
    if args.quick:
        args.search, args.max_wait = "tiny", 0.0
        args.trials = args.trials or 3
    return args


def search_path(search: str) -> Path:
    path = Path(search)
    if path.suffix not in (".yaml", ".yml"):
        path = REPO / "search_spaces" / f"{search}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in (REPO / "search_spaces").glob("*.yaml")))
        raise SystemExit(f"--search: no search file {path}; give a path or one of: {known}")
    return path


# -- the hand-written side (runs in its own process, see --hand-written-worker) ----
def define_by_run(space: dict, base_flat: dict):
    """The search file's ``space`` as an Optuna define-by-run function (picklable: Ray Tune saves the
    searcher with its experiment state): see :func:`suggest`."""
    return functools.partial(suggest, space, base_flat)


def suggest(space: dict, base_flat: dict, trial) -> dict:
    """Suggest every path of ``space`` whose ``when`` holds (on the values suggested before it, else the
    base experiment's ``base_flat``); list choices go to Optuna as JSON text. Returns ``{path: value}``,
    the values decoded."""
    values: dict = {}
    for path, dist in space.items():
        if any(values.get(k, base_flat.get(k)) != v for k, v in (dist.get("when") or {}).items()):
            continue
        kind = dist["type"]
        if kind == "float":
            values[path] = trial.suggest_float(path, dist["low"], dist["high"], log=dist.get("log", False),
                                               step=dist.get("step"))
        elif kind == "int":
            values[path] = trial.suggest_int(path, int(dist["low"]), int(dist["high"]),
                                             step=int(dist.get("step") or 1), log=dist.get("log", False))
        else:
            labels = [json.dumps(c) if isinstance(c, (list, dict)) else c for c in dist["choices"]]
            label = trial.suggest_categorical(path, labels)
            values[path] = json.loads(label) if isinstance(label, str) and label[:1] in "[{" else label
    return values


def hand_written_trial(config: dict, experiment: dict | None = None, metric: str = "", out_root: str = "") -> None:
    """One trial: the experiment with the sampled settings in ``out_root/TRIAL_ID``, its own data and
    pretraining, every epoch reported to Ray Tune, then the final metrics."""
    import copy

    from ray import tune

    from comod.config import parse_config, set_path
    from comod.data import load_data
    from comod.train import Callbacks, run_experiment

    raw = copy.deepcopy(experiment)
    for path, value in config.items():
        set_path(raw, path, value)
    cfg = parse_config(raw, "trial")
    pretrain_epochs = cfg.pretrain.epochs

    def on_epoch(phase: str, epoch: int, step: int, metrics: dict) -> None:
        # the phase's validation metric also under the search metric's name: one curve for ASHA
        tune.report({**metrics, metric: metrics[f"{phase}/{metric}"], "step": step,
                     "epoch": epoch + (pretrain_epochs if phase == "finetune" else 0)})

    out = Path(out_root) / tune.get_context().get_trial_id()
    final = run_experiment(cfg, out, data=load_data(cfg), callbacks=Callbacks(on_epoch=on_epoch))
    tune.report({**final, FINAL: 1})


def hand_written_main(search_yaml: str, work_dir: str) -> int:
    """The search of ``search_yaml`` as a plain Ray Tune script, in ``work_dir``."""
    import mlflow
    import optuna
    import ray
    from ray import tune
    from ray.air.integrations.mlflow import MLflowLoggerCallback
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.optuna import OptunaSearch

    from comod.config import flatten, parse_config

    work = Path(work_dir)
    raw = yaml.safe_load(Path(search_yaml).read_text())
    experiment, space, search = raw["experiment"], raw["space"], raw["search"]
    metric, mode = search.get("metric", "val/mean_f1"), search.get("mode", "max")
    base = parse_config(experiment, "experiment")
    samplers = {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler}
    if search.get("sampler", "tpe") not in samplers:
        raise SystemExit(f"the hand-written script knows the samplers {', '.join(samplers)}, not "
                         f"{search['sampler']!r}")
    sampler = samplers[search.get("sampler", "tpe")](seed=search.get("seed", 0))
    searcher = OptunaSearch(space=define_by_run(space, flatten(base)), metric=metric, mode=mode, sampler=sampler,
                            study_name=SEARCH_NAME,
                            storage=optuna.storages.RDBStorage(f"sqlite:///{work / 'optuna.db'}"))
    sched = search.get("scheduler") or {"type": "asha"}
    if sched.get("type", "asha") == "asha":
        # Ray's iteration count is the epoch count (one report per epoch) and the final report one more
        epochs = base.pretrain.epochs + base.finetune.epochs + 1
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=epochs,
                                  grace_period=sched.get("grace_period", 1),
                                  reduction_factor=sched.get("reduction_factor", 2))
    else:
        scheduler = FIFOScheduler()
    tracking_uri = f"sqlite:///{work / 'mlflow.db'}"
    mlflow.MlflowClient(tracking_uri).create_experiment(SEARCH_NAME, artifact_location=(work / "artifacts").as_uri())
    resources = search.get("resources") or {}
    trainable = tune.with_resources(tune.with_parameters(hand_written_trial, experiment=experiment, metric=metric,
                                                         out_root=str(work / "trials")),
                                    {"cpu": resources.get("cpu", 1), "gpu": resources.get("gpu", 0)})
    ray.init(include_dashboard=False)
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, metric=metric, mode=mode,
                                    num_samples=search["num_trials"],
                                    max_concurrent_trials=search.get("max_concurrent", 2)),
        run_config=tune.RunConfig(name=SEARCH_NAME, storage_path=str(work / "ray"), callbacks=[
            MLflowLoggerCallback(tracking_uri=tracking_uri, experiment_name=SEARCH_NAME, save_artifact=True)]))
    grid = tuner.fit()
    ray.shutdown()
    return 1 if grid.errors else 0


# -- the two runs -------------------------------------------------------------------
def timed(cmd: list[str], env: dict, work: Path, stem: str, timeout: float) -> dict:
    """Run ``cmd`` in a session of its own, stdout and stderr to ``work/stem.out|err``; its wall time,
    exit status and the load average during it."""
    with LoadSampler() as load, open(work / f"{stem}.out", "w") as out, open(work / f"{stem}.err", "w") as err:
        t0 = time.time()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=err, start_new_session=True)
        try:
            rc = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = "timeout"
        t1 = time.time()
    if rc != 0:
        raise SystemExit(f"{stem} failed ({rc}); see {work / stem}.err:\n{(work / f'{stem}.err').read_text()[-4000:]}")
    return {"wall_s": round(t1 - t0, 2), "load": load.summary()}


def with_ray_tmp(run):
    """``run(ray_tmp)`` with a private Ray temp dir (short: Ray's socket paths are length-limited), whose
    processes are killed afterwards; the count killed goes into the result."""
    ray_tmp = tempfile.mkdtemp(prefix="vh", dir="/tmp")
    try:
        result = run(ray_tmp)
    finally:
        killed = kill_processes_mentioning(ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    return {**result, "ray_processes_killed_after": killed}


def run_comod(search_file: Path, work: Path, args) -> dict:
    home = work / "home"
    cmd = [sys.executable, "-m", "comod_platform.cli", "search", "run", str(search_file), "--name", SEARCH_NAME,
           "--json"]

    def run(ray_tmp: str) -> dict:
        env = clean_env(COMOD_HOME=str(home), COMOD_DOWNLOAD="0", RAY_TMPDIR=ray_tmp, RAY_AUTH_MODE="disabled")
        return timed(cmd, env, work, "comod", args.timeout)

    result = with_ray_tmp(run)
    text = (work / "comod.out").read_text()
    summary = json.JSONDecoder().raw_decode(text[text.index("{"):])[0]
    meta = json.loads((home / "searches" / SEARCH_NAME / "meta.json").read_text())
    return {**result, "stopped_early": summary["pruned"], "completed": summary["completed"],
            "failed": summary["failed"], "trials": summary["trials"],
            **recorded_mlflow(f"sqlite:///{home / 'mlflow.db'}", f"search/{SEARCH_NAME}"),
            "optuna_states": optuna_states(meta["optuna_storage"], meta["study_name"]),
            "pretrainings": len(list((home / "searches" / SEARCH_NAME / "pretrain_cache").glob("*.pt"))),
            "pretrainings_note": "cache entries; the other trials of the same pretraining settings load one"}


def run_hand_written(search_file: Path, work: Path, args) -> dict:
    folder = work / "hand_written"
    folder.mkdir()
    cmd = [sys.executable, str(Path(__file__).resolve()), "--hand-written-worker", str(search_file), str(folder)]

    def run(ray_tmp: str) -> dict:
        env = clean_env(COMOD_DOWNLOAD="0", RAY_TMPDIR=ray_tmp, RAY_AUTH_MODE="disabled")
        return timed(cmd, env, work, "hand_written", args.timeout)

    result = with_ray_tmp(run)
    trials = ray_trials(folder / "ray" / SEARCH_NAME, folder / "trials")
    pretrain_epochs = yaml.safe_load(search_file.read_text())["experiment"].get("pretrain", {}).get("epochs", 1)
    return {**result, "trials": len(trials), "completed": sum(t["final"] for t in trials),
            "stopped_early": sum(not t["final"] for t in trials),
            **recorded_mlflow(f"sqlite:///{folder / 'mlflow.db'}", SEARCH_NAME),
            "optuna_states": optuna_states(f"sqlite:///{folder / 'optuna.db'}", SEARCH_NAME),
            "pretrainings": sum(t["ran"] for t in trials),
            "pretrainings_finished": sum(t["iterations"] >= pretrain_epochs for t in trials),
            "pretrainings_note": "one per trial, each with its own data load"}


# -- what each recorded --------------------------------------------------------------
def ray_trials(experiment: Path, runs: Path) -> list[dict]:
    """Per Ray trial (its result.json under ``experiment``): reports (iterations), whether the last one
    was the final, whether its ``run_experiment`` started (a config.yaml in ``runs/TRIAL_ID``)."""
    out = []
    for path in sorted(experiment.glob("*/result.json")):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        trial_id = rows[0]["trial_id"] if rows else None
        out.append({"iterations": len(rows), "final": bool(rows and rows[-1].get(FINAL)),
                    "ran": trial_id is not None and (runs / trial_id / "config.yaml").exists()})
    return out


def recorded_mlflow(tracking_uri: str, experiment_name: str) -> dict:
    """Runs of the experiment, those nested under a parent run, and the plots logged as artifacts."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment_name)
    runs = client.search_runs([exp.experiment_id], max_results=50000) if exp else []
    nested = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    plots = sum(count_plots(client, r.info.run_id) for r in runs)
    return {"mlflow_runs": len(runs), "mlflow_child_runs": len(nested),
            "mlflow_parent_runs": len({r.data.tags["mlflow.parentRunId"] for r in nested}), "plots": plots}


def count_plots(client, run_id: str, path: str | None = None) -> int:
    n = 0
    for item in client.list_artifacts(run_id, path):
        if item.is_dir:
            n += count_plots(client, run_id, item.path)
        elif item.path.lower().endswith(PLOT_SUFFIXES):
            n += 1
    return n


def optuna_states(storage: str, study_name: str) -> dict:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=study_name, storage=storage)
    return dict(sorted(Counter(t.state.name for t in study.trials).items()))


# -- report --------------------------------------------------------------------------
def ratio(comod: dict, hand: dict) -> float:
    return round(comod["wall_s"] / hand["wall_s"], 3)


def result_line(value: float) -> str:
    return f"RESULT comod/hand_written={value:.3f}"


def states_text(states: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in states.items()) or "none"


def report_lines(result: dict) -> list[str]:
    c, h = result["comod"], result["hand_written"]
    pruned = lambda side: side["optuna_states"].get("PRUNED", 0)  # noqa: E731
    return [
        "| | comod search run | hand-written Ray Tune |",
        "|---|---:|---:|",
        f"| wall time of the command | {c['wall_s']:.1f} s | {h['wall_s']:.1f} s |",
        f"| trials: completed / stopped early by ASHA | {c['completed']} / {c['stopped_early']} | "
        f"{h['completed']} / {h['stopped_early']} |",
        f"| stopped early, told to Optuna as PRUNED | {pruned(c)} of {c['stopped_early']} | "
        f"{pruned(h)} of {h['stopped_early']} |",
        f"| Optuna trial states | {states_text(c['optuna_states'])} | {states_text(h['optuna_states'])} |",
        f"| MLflow runs (child runs nested under a parent) | {c['mlflow_runs']} ({c['mlflow_child_runs']} under "
        f"{c['mlflow_parent_runs']} parent) | {h['mlflow_runs']} ({h['mlflow_child_runs']} under "
        f"{h['mlflow_parent_runs']} parent) |",
        f"| plots logged as artifacts | {c['plots']} | {h['plots']} |",
        f"| pretrainings | {c['pretrainings']}: {c['pretrainings_note']} | {h['pretrainings']}: "
        f"{h['pretrainings_note']}, {h['pretrainings_finished']} to their end |",
        f"| 1-min load average min / mean / max | {c['load']['min']:.1f} / {c['load']['mean']:.1f} / "
        f"{c['load']['max']:.1f} | {h['load']['min']:.1f} / {h['load']['mean']:.1f} / {h['load']['max']:.1f} |",
    ]


def verdict(result: dict) -> str:
    r = result["ratio"]
    return f"{'PASS' if r <= TARGET_RATIO else 'MISS'}: comod / hand-written = {r:.3f} (target <= {TARGET_RATIO})"


def markdown(result: dict) -> str:
    st, m, v, code = result["settings"], result["machine"], result["versions"], result["code"]
    s = st["search"]
    return "\n".join([
        "# comod search run vs the same search written by hand on Ray Tune",
        "",
        f"`{st['search_file']}`: {st['trials']} trials, sampler {s['sampler']} (seed {s['seed']}), scheduler "
        f"{s['scheduler']}, {s['max_concurrent']} at a time, resources {s['resources']}. comod: `comod search "
        f"run` in a fresh COMOD_HOME. Hand-written: a plain Ray Tune script with OptunaSearch (define-by-run, the "
        f"same sampler and seed), Ray's MLflowLoggerCallback to SQLite, ASHA on Ray's iteration count, each trial "
        f"loading its data and pretraining its own model with `comod.train.run_experiment`, every epoch "
        f"reported. Both timed as whole commands, comod first.",
        "",
        f"Machine: {m['processor']}, {m['cpu_count']} CPUs; {m['platform']}. Versions: Ray {v['ray']}, MLflow "
        f"{v['mlflow']}, Optuna {v['optuna']}, torch {v['torch']}, Python {v['python']}. Code: commit "
        f"{code['commit']}" + (f" with changes to {', '.join(code['changed_since'])}" if code["changed_since"]
                               else " (comod/ and platform/ unchanged)")
        + f". 1-min load average before: {result['load_wait']['load_at_start']} (waited "
        f"{result['load_wait']['waited_s']:.0f} s for < {result['load_wait']['limit']}); total "
        f"{result['total_s']:.0f} s.",
        "",
        *report_lines(result),
        "",
        f"**{verdict(result)}**",
        "",
    ])


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.hand_written_worker:
        return hand_written_main(*args.hand_written_worker)
    started = time.time()
    source = search_path(args.search)
    raw = yaml.safe_load(source.read_text())
    if args.trials:
        raw["search"]["num_trials"] = args.trials
    code = code_version()
    load_wait = wait_for_load(args.wait_load, args.max_wait)
    work = Path(tempfile.mkdtemp(prefix="vs-hand-written-"))
    search_file = work / f"{SEARCH_NAME}.yaml"
    search_file.write_text(yaml.safe_dump(raw, sort_keys=False))
    print(f"work folder {work}; {source.name}, {raw['search']['num_trials']} trials; load average "
          f"{os.getloadavg()[0]:.2f}", flush=True)
    try:
        comod = run_comod(search_file, work, args)
        print(f"  comod        wall {comod['wall_s']:7.1f} s", flush=True)
        hand = run_hand_written(search_file, work, args)
        print(f"  hand-written wall {hand['wall_s']:7.1f} s", flush=True)
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    s = raw["search"]
    settings = {"search_file": str(source.relative_to(REPO)) if source.is_relative_to(REPO) else str(source),
                "trials": s["num_trials"], "quick": args.quick,
                "search": {k: s.get(k) for k in ("metric", "mode", "sampler", "seed", "scheduler", "max_concurrent",
                                                 "resources")}}
    result = {"benchmark": "vs_hand_written", "settings": settings, "machine": machine(), "versions": versions(),
              "code": code, "load_wait": load_wait, "total_s": round(time.time() - started, 1),
              "comod": comod, "hand_written": hand, "ratio": ratio(comod, hand), "target": TARGET_RATIO}
    print("\n".join(report_lines(result)))
    print(verdict(result))
    out = results_folder(args.out, args.quick)
    if out is not None:
        write_results(out, "vs_hand_written", result, markdown(result))
    print(result_line(result["ratio"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
