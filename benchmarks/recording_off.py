"""How far the trials' window is from its target with no MLflow recording at all.

A diagnostic beside ``platform_overhead.py``, on the same 40 trials and settings: four sides per
repeat, interleaved (the order reversed every other repeat), each timed as a whole command:

* platform: ``comod search run`` as ``platform_overhead.py`` runs it;
* platform, MLflow off: the same command with every call to the driver's MLflow writer dropped
  (a ``sitecustomize`` on the search's ``PYTHONPATH`` replaces ``writer.Writer.submit`` for the
  thread named ``comod-mlflow-writer``; the study's writer, the checkpoints, the reports, the plots
  and the rest of the platform run as they are). The run checks that the patch took: this side's
  MLflow writer spent no CPU, the platform side's did;
* bare Ray Tune and the plain loop, as in ``platform_overhead.py``.

It answers one question: whether any way of recording to MLflow, however cheap, could bring the
window within ``platform_overhead.TARGET_WINDOW`` of the plain loop's and the idle gap within
``TARGET_GAP_MS`` here. If the platform without MLflow misses them, no change to the recording
can meet them. Not a product mode: nothing in comod drops its records.

Results go to ``benchmarks/results/recording_off.json`` and ``.md`` (``--quick``: 6 trials, one
repeat, nothing written unless ``--out``). The last line printed is ``RESULT
window_platform/plain=X.XXX window_no_mlflow/plain=Y.YYY window_bare_ray/plain=Z.ZZZ
idle_gap_ms=A idle_gap_no_mlflow_ms=B idle_gap_bare_ray_ms=C``.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import platform_overhead as po  # noqa: E402
from _common import add_run_options, code_version, machine, results_folder, versions, wait_for_load, write_results  # noqa: E402

PATCH = '''"""Diagnostic only (benchmarks/recording_off.py): with COMOD_DROP_MLFLOW=1 the driver's MLflow
writer drops every call; every other writer runs as it is."""
import os

if os.environ.get("COMOD_DROP_MLFLOW") == "1":
    from comod_platform import writer as _writer

    _submit = _writer.Writer.submit

    def submit(self, fn, *args, **kwargs):
        if self.thread.name == "comod-mlflow-writer":
            return None
        return _submit(self, fn, *args, **kwargs)

    _writer.Writer.submit = submit
'''
SIDES = ("platform", "no_mlflow", "floor", "plain")
KEYS = ("wall_s", "window_s", "mean_trial_s", "mean_gap_s", "mean_between_s")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3, help="repeats of the four sides (default 3)")
    p.add_argument("--quick", action="store_true", help="6 trials, one repeat, no waiting for load: a smoke check")
    add_run_options(p, max_wait=900.0, timeout=1800.0, what="one side")
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.max_wait = 1, 0.0
    return args


def write_patch(folder: Path) -> Path:
    """The ``sitecustomize`` that drops the MLflow writer's calls where ``COMOD_DROP_MLFLOW=1``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(PATCH)
    return folder


def run_sides(root: Path, args, settings) -> dict[str, list[dict]]:
    patch = write_patch(root / "patch")
    search_file = po.write_search(root / "overhead.yaml", settings)
    runs: dict[str, list[dict]] = {s: [] for s in SIDES}
    configs = None
    for rep in range(args.repeats):
        for side in SIDES if rep % 2 == 0 else tuple(reversed(SIDES)):
            work = root / f"rep{rep}-{side}"
            work.mkdir()
            if side in ("platform", "no_mlflow"):
                drop = "1" if side == "no_mlflow" else "0"
                r = po.run_platform(search_file, work, settings,
                                    env={"PYTHONPATH": str(patch), "COMOD_DROP_MLFLOW": drop})
                configs = configs or r["configs"]
                r["configs"] = len(r["configs"])
            elif side == "floor":
                r = po.run_floor(configs, work, settings)
            else:
                r = po.run_plain(configs, work, settings)
            runs[side].append(r)
            print(f"  repeat {rep + 1} {side:9s} wall {r['wall_s']:6.1f} s  window {r['window_s']:6.1f} s  "
                  f"trial {r['mean_trial_s'] * 1000:5.0f} ms  gap {r['mean_gap_s'] * 1000:5.0f} ms", flush=True)
    check_patch(runs)
    return runs


def check_patch(runs: dict[str, list[dict]]) -> None:
    """The MLflow-off side spent no MLflow writer CPU, the platform side did: else the patch did not take."""
    off = [r["recording_cpu_s"]["mlflow"] for r in runs["no_mlflow"]]
    on = [r["recording_cpu_s"]["mlflow"] for r in runs["platform"]]
    if any(v > 0 for v in off) or not all(v > 0 for v in on):
        raise SystemExit(f"the MLflow writer's CPU, platform {on} and MLflow off {off}: the patch did not take "
                         "(is comod_platform.writer.Writer.submit still where recording_off.py patches it?)")


def summarise(runs: dict[str, list[dict]]) -> dict:
    mean = {s: {k: statistics.fmean(r[k] for r in rs) for k in KEYS} for s, rs in runs.items()}
    plain = mean["plain"]["window_s"]
    out = {"mean": {s: {k: round(v, 4) for k, v in m.items()} for s, m in mean.items()}}
    for s in ("platform", "no_mlflow", "floor"):
        out[s] = {
            "window_over_plain": round(mean[s]["window_s"] / plain, 3),
            "window_over_plain_per_repeat": [round(a["window_s"] / b["window_s"], 3)
                                             for a, b in zip(runs[s], runs["plain"])],
            "wall_over_floor": round(mean[s]["wall_s"] / mean["floor"]["wall_s"], 3),
            "idle_gap_ms": round(mean[s]["mean_gap_s"] * 1000),
            "between_trials_ms": round(mean[s]["mean_between_s"] * 1000),
            "mlflow_cpu_s": round(statistics.fmean(r.get("recording_cpu_s", {}).get("mlflow", 0.0)
                                                   for r in runs[s]), 2),
        }
    out["no_mlflow_meets_window"] = out["no_mlflow"]["window_over_plain"] <= po.TARGET_WINDOW
    out["no_mlflow_meets_gap"] = out["no_mlflow"]["idle_gap_ms"] <= po.TARGET_GAP_MS
    return out


def result_line(s: dict) -> str:
    return (f"RESULT window_platform/plain={s['platform']['window_over_plain']:.3f} "
            f"window_no_mlflow/plain={s['no_mlflow']['window_over_plain']:.3f} "
            f"window_bare_ray/plain={s['floor']['window_over_plain']:.3f} "
            f"idle_gap_ms={s['platform']['idle_gap_ms']} idle_gap_no_mlflow_ms={s['no_mlflow']['idle_gap_ms']} "
            f"idle_gap_bare_ray_ms={s['floor']['idle_gap_ms']}")


def verdict(s: dict) -> str:
    if s["no_mlflow_meets_window"] and s["no_mlflow_meets_gap"]:
        return "Without MLflow recording the platform meets both targets: the recording is what misses them."
    return ("Without any MLflow recording the platform still misses "
            + " and ".join(t for t, met in (("the window target", s["no_mlflow_meets_window"]),
                                            ("the idle-gap target", s["no_mlflow_meets_gap"])) if not met)
            + " here: no cheaper recording can meet "
            + ("it." if s["no_mlflow_meets_window"] or s["no_mlflow_meets_gap"] else "them."))


def markdown(result: dict) -> str:
    s, st = result["summary"], result["settings"]
    names = {"platform": "platform", "no_mlflow": "platform, MLflow off", "floor": "bare Ray Tune", "plain": "plain"}
    lines = [
        "# The trials' window with no MLflow recording",
        "",
        f"`python benchmarks/recording_off.py`: {st['trials']} trials as in `platform_overhead.py`, "
        f"{st['concurrency']} at a time, {result['repeats']} repeat(s) of four sides interleaved (the order "
        "reversed every other repeat). *platform, MLflow off*: `comod search run` with every call to the "
        "driver's MLflow writer dropped (a `sitecustomize` on the search's PYTHONPATH); the rest of the "
        "platform as it is. A diagnostic, not a product mode.",
        "",
        f"Machine: {result['machine']['processor']}, {result['machine']['cpu_count']} CPUs; "
        f"{result['machine']['platform']}. Versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items())
        + f". Code: commit {result['code']['commit']}"
        + (f" (changed since: {', '.join(result['code']['changed_since'])})" if result["code"]["changed_since"]
           else " (comod/ and platform/ unchanged)") + f". Total {result['total_s']:.0f} s.",
        "",
        "| side | wall s | trials' window s | window / plain | ms in a trial | idle gap ms / slot | "
        "ms between two trials | MLflow writer CPU s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for side in SIDES:
        m = s["mean"][side]
        extra = s.get(side, {})
        lines.append(f"| {names[side]} | {m['wall_s']:.1f} | {m['window_s']:.2f} | "
                     f"{extra.get('window_over_plain', 1.0):.3f} | {m['mean_trial_s'] * 1000:.0f} | "
                     f"{m['mean_gap_s'] * 1000:.0f} | {m['mean_between_s'] * 1000:.0f} | "
                     f"{extra.get('mlflow_cpu_s', 0.0):.2f} |")
    lines += ["", "Window / plain per repeat: " + "; ".join(
        f"{names[x]} {s[x]['window_over_plain_per_repeat']}" for x in ("platform", "no_mlflow", "floor")) + ".",
        "", f"Targets (from `platform_overhead.py`): window at most {po.TARGET_WINDOW}x the plain loop's, idle "
        f"gap at most {po.TARGET_GAP_MS} ms per trial slot.", "", f"**{verdict(s)}**", "", result_line(s), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    settings = po.parse_args(["--quick"] if args.quick else [])
    settings.cluster, settings.timeout = None, args.timeout
    started = time.time()
    load_wait = wait_for_load(args.wait_load, args.max_wait)
    root = Path(tempfile.mkdtemp(prefix="recording-off-"))
    print(f"work folder {root}", flush=True)
    try:
        runs = run_sides(root, args, settings)
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    result = {"benchmark": "recording_off", "repeats": args.repeats,
              "settings": {k: getattr(settings, k) for k in ("trials", "concurrency", "steps_per_epoch", "epochs")},
              "machine": machine(), "versions": versions(), "code": code_version(), "load_wait": load_wait,
              "total_s": round(time.time() - started, 1), "runs": runs}
    result["summary"] = summarise(runs)
    print(verdict(result["summary"]))
    out = results_folder(args.out, args.quick)
    if out is not None:
        write_results(out, "recording_off", result, markdown(result))
    print(result_line(result["summary"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
