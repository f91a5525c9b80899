"""Does stochastic comodulation's edge over deterministic gain shrink with longer pretraining?

Reads the trial tables (``comod export trials``) of two searches that differ only in pretraining length
(the Fashion-MNIST study at 15 epochs and its long arm at 30), keeps the stochastic trials at one noise
scale, and pairs each with the deterministic trial of the same seed and few-shot arm. For each length it
prints the mean paired difference (stochastic - deterministic) of each metric with a percentile bootstrap
interval over seeds (the K arms of a seed share one pretraining, so the seed is the unit), then the change
of that difference from the short to the long pretraining, again bootstrapped over seeds (the two
searches use the same five seeds, but not the same pretrained models: the seed pairs the draws).

    python benchmarks/pretraining_length.py \\
        benchmarks/results/fashion_mnist_study/trials.parquet \\
        benchmarks/results/fashion_mnist_long/trials.parquet

Ends with ``RESULT delta_test_f1_short=... delta_test_f1_long=... change=...``.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np
import pyarrow.parquet as pq

METRICS = ("test/mean_f1", "test/mean_recall", "test/mean_precision", "val/mean_f1", "pretrained/test/mean_f1")


def paired(path: str, noise: float) -> dict[int, dict[str, list[float]]]:
    """seed -> metric -> [stochastic - deterministic, one per few-shot arm]."""
    rows = pq.read_table(path).to_pylist()
    done = [r for r in rows if r["state"] == "completed"]
    key = lambda r: (r["seed"], r["finetune.samples_per_task"])  # noqa: E731
    det = {key(r): r for r in done if r["modulation.kind"] == "deterministic"}
    out: dict[int, dict[str, list[float]]] = {}
    for r in done:
        if r["modulation.kind"] != "stochastic" or abs(float(r["modulation.noise_scale"]) - noise) > 1e-9:
            continue
        partner = det.get(key(r))
        if partner is None:
            continue
        per_seed = out.setdefault(int(r["seed"]), {m: [] for m in METRICS})
        for m in METRICS:
            per_seed[m].append(float(r[m]) - float(partner[m]))
    return out


def seed_means(pairs: dict[int, dict[str, list[float]]], metric: str) -> dict[int, float]:
    return {seed: float(np.mean(v[metric])) for seed, v in pairs.items() if v[metric]}


def bootstrap(values: np.ndarray, rng: np.random.Generator, draws: int = 10000) -> tuple[float, float]:
    means = rng.choice(values, size=(draws, len(values)), replace=True).mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("short", help="trials.parquet of the shorter pretraining")
    parser.add_argument("long", help="trials.parquet of the longer pretraining")
    parser.add_argument("--noise", type=float, default=0.1, help="the stochastic kind's noise scale")
    parser.add_argument("--seed", type=int, default=0, help="the bootstrap's seed")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    short, long = paired(args.short, args.noise), paired(args.long, args.noise)
    if not short or not long:
        print("no stochastic/deterministic pairs in one of the tables", file=sys.stderr)
        return 1
    print(f"stochastic (noise {args.noise:g}) - deterministic, paired by seed and K; 95% bootstrap over seeds")
    print(f"{'metric':26} {'short':>24} {'long':>24} {'long - short':>24}")
    result = {}
    for metric in METRICS:
        a, b = seed_means(short, metric), seed_means(long, metric)
        common = sorted(set(a) & set(b))
        cells = []
        for values in (np.array(list(a.values())), np.array(list(b.values())),
                       np.array([b[s] - a[s] for s in common])):
            lo, hi = bootstrap(values, rng)
            cells.append(f"{values.mean():+.4f} [{lo:+.4f},{hi:+.4f}]")
        print(f"{metric:26} {cells[0]:>24} {cells[1]:>24} {cells[2]:>24}")
        if metric == "test/mean_f1":
            result = {"short": float(np.mean(list(a.values()))), "long": float(np.mean(list(b.values()))),
                      "change": float(np.mean([b[s] - a[s] for s in common]))}
    print(f"seeds: short {sorted(short)}, long {sorted(long)}; pairs per seed: "
          f"{ {s: len(v['test/mean_f1']) for s, v in long.items()} }")
    print(f"RESULT delta_test_f1_short={result['short']:+.4f} delta_test_f1_long={result['long']:+.4f} "
          f"change={result['change']:+.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
