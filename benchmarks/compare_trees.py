"""Two checkouts' `comod search run` on the overhead benchmark's 40 trials, interleaved.

A diagnostic beside ``platform_overhead.py``: does a change to the platform cost wall time? Each repeat runs
the search once from each checkout (``git worktree add ../old COMMIT``), the order alternating, each with a
fresh ``COMOD_HOME`` and its own Ray; the checkout's code is put first on ``PYTHONPATH``, for the driver and
the Ray workers it starts. Printed per run: wall, start-up, trials' window, tail, ms in a trial, idle gap per
trial slot and the MLflow writer's CPU; at the end the second checkout's wall over the first's per repeat,
their median and the ratio of the mean walls. Nothing is written.

    python benchmarks/compare_trees.py ../old . --repeats 6
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import platform_overhead as po  # noqa: E402


def run(tree: Path, args) -> dict:
    """One ``comod search run`` from checkout ``tree`` (its code first on ``PYTHONPATH``), timed."""
    work = Path(tempfile.mkdtemp(prefix="compare-trees-"))
    try:
        search = po.write_search(work / "overhead.yaml", args)
        return po.run_platform(search, work, args, env={"PYTHONPATH": f"{tree / 'platform'}:{tree}"}, cwd=tree)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def ratios(first: list[float], second: list[float]) -> dict:
    """The second checkout's wall over the first's per repeat, their median, and the ratio of the mean walls."""
    per_repeat = [b / a for a, b in zip(first, second)]
    return {"per_repeat": [round(r, 3) for r in per_repeat], "median": round(statistics.median(per_repeat), 3),
            "mean_walls": round(statistics.fmean(second) / statistics.fmean(first), 3)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("first", type=Path, help="a checkout of the repository (the baseline)")
    p.add_argument("second", type=Path, help="another checkout (the change)")
    p.add_argument("--repeats", type=int, default=6)
    p.add_argument("--trials", type=int, default=40)
    p.add_argument("--concurrency", type=int, default=2)
    p.add_argument("--steps-per-epoch", type=int, default=30)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--timeout", type=float, default=1800.0)
    args = p.parse_args(argv)
    args.cluster = None  # a Ray started by each command, as in platform_overhead.py's cold runs
    trees = {"first": args.first.resolve(), "second": args.second.resolve()}
    walls: dict[str, list[float]] = {"first": [], "second": []}
    for rep in range(args.repeats):
        for side in ("first", "second") if rep % 2 == 0 else ("second", "first"):
            r = run(trees[side], args)
            walls[side].append(r["wall_s"])
            print(f"repeat {rep + 1} {side:6s} wall {r['wall_s']:5.1f} s  start-up {r['startup_s']:5.1f} s  window "
                  f"{r['window_s']:5.1f} s  tail {r['tail_s']:4.1f} s  trial {r['mean_trial_s'] * 1000:5.0f} ms  gap "
                  f"{r['mean_gap_s'] * 1000:4.0f} ms  writer CPU {r['recording_cpu_s']['mlflow']:.2f} s", flush=True)
    r = ratios(walls["first"], walls["second"])
    print(f"second / first per repeat {r['per_repeat']}; median {r['median']:.3f}; ratio of the mean walls "
          f"{r['mean_walls']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
