"""Compare no modulation, deterministic gain and stochastic comodulation on
real Fashion-MNIST (10 one-vs-rest attributes) under one shared budget.

Every kind gets the same data (per seed), the same architecture, the same
pretraining and fine-tuning steps, batch size and learning rates; only
``modulation.kind`` (and, for named stochastic variants, the
``modulation.readout.*`` / ``modulation.*`` settings of that variant)
differs. Each run goes through :func:`comod.train.run_experiment` into its
own folder under the work dir (named by kind, seed and a hash of the full
config), so a rerun with the same settings reads the saved metrics instead
of training again, and a changed setting never collides with an old run.

The stochastic variant shown in the headline row is chosen by mean
validation F1 over seeds (``val/mean_f1``), never by the test split.

Results: ``<out>.md`` and ``<out>.json`` (mean +- std over seeds and per
seed, test F1 and error after fine-tuning, pretrained test F1, the
pretraining validation-F1 curve of every run, the full settings and the
wall time).

Examples::

    python benchmarks/fashion_mnist_compare.py --quick          # smoke test, seconds
    python benchmarks/fashion_mnist_compare.py                  # the committed results
    python benchmarks/fashion_mnist_compare.py --kinds none stochastic \\
        --set modulation.noise_scale=0.3 --seeds 0 1 2 3 4
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

import comod
from comod.config import apply_overrides, config_to_dict, flatten, parse_config
from comod.data import load_data
from comod.train import CHECKPOINT, load_checkpoint, run_experiment

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DEFAULT_OUT = RESULTS / "fashion_mnist_compare"
DEFAULT_WORK = RESULTS / "runs"
QUICK_ROOT = Path("/tmp/comod_fashion_mnist_compare_quick")

# The base experiment every run shares (kind and seed are set per run; the
# budget flags below fill in the phase lengths and the training subset).
BASE = {
    "name": "fashion_mnist_compare",
    "seed": 0,
    "device": "cpu",
    "data": {"dataset": "fashion_mnist", "tasks": "attributes", "train_limit": 12000, "test_limit": 3000},
    "model": {"backbone": "resnet18", "residual": True, "stem": "small", "width": 0.125,
              "decoder_hidden": [64]},
    "modulation": {"kind": "none", "sites": ["layer3"], "noise_scale": 0.5},
    "pretrain": {"epochs": 6, "steps_per_epoch": 50, "batch_size": 128,
                 "lr": {"backbone": 0.002, "decoder": 0.002, "heads": 0.002, "controller": 0.01}},
    "finetune": {"epochs": 2, "steps_per_epoch": 50, "batch_size": 128, "trainable": ["controller"],
                 "lr": {"controller": 0.02}},
    "eval": {"batch_size": 1000, "select_metric": "mean_f1"},
}

# Named variants: a modulation kind plus settings applied on top of the base.
# ``{warmup_third}`` is replaced by a third of the pretraining steps.
VARIANTS = {
    "none": ("none", []),
    "deterministic": ("deterministic", []),
    "stochastic": ("stochastic", []),
    "stochastic_mix_warmup": ("stochastic", ["modulation.readout.mix=0.5",
                                             "modulation.readout.warmup_steps={warmup_third}"]),
    "stochastic_running": ("stochastic", ["modulation.readout.decision=running"]),
}
DEFAULT_KINDS = ["none", "deterministic", "stochastic"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default 0 1 2)")
    p.add_argument("--pretrain-epochs", type=int, default=None, help="pretraining epochs (default 6)")
    p.add_argument("--finetune-epochs", type=int, default=None, help="fine-tuning epochs (default 2)")
    p.add_argument("--steps-per-epoch", type=int, default=None,
                   help="steps per epoch of both phases, one task per step (default 50)")
    p.add_argument("--train-limit", type=int, default=None,
                   help="training images kept (seeded subset; validation shrinks with it; default 12000)")
    p.add_argument("--kinds", nargs="+", default=None,
                   help=f"variants to run (default: {' '.join(DEFAULT_KINDS)}); known: {', '.join(VARIANTS)}; "
                        f"define more with --variant")
    p.add_argument("--variant", action="append", default=[], metavar="NAME:KIND:path=value[,path=value]",
                   help="define a named variant, e.g. stoch_soft:stochastic:modulation.readout.rectifier=softplus")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="path=value",
                   help="setting applied to every run (as comod.config.apply_overrides; repeatable)")
    p.add_argument("--out", type=Path, default=None,
                   help=f"results path without suffix; writes .md and .json (default {DEFAULT_OUT})")
    p.add_argument("--work-dir", type=Path, default=None,
                   help=f"folder of the per-run output folders (default {DEFAULT_WORK}, ignored by git)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; 1 is faster on a busy shared machine)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: tiny subset and 2 steps per phase, results under /tmp")
    args = p.parse_args(argv)
    for spec in args.variant:
        parts = spec.split(":", 2)
        if len(parts) < 2 or parts[1] not in ("none", "deterministic", "stochastic"):
            p.error(f"--variant {spec!r}: expected NAME:KIND[:path=value,...] with KIND none, "
                    f"deterministic or stochastic")
        VARIANTS[parts[0]] = (parts[1], [s for s in (parts[2].split(",") if len(parts) == 3 else []) if s])
    args.kinds = args.kinds or DEFAULT_KINDS
    unknown = [k for k in args.kinds if k not in VARIANTS]
    if unknown:
        p.error(f"--kinds: unknown variant {unknown[0]!r}; known: {', '.join(VARIANTS)}")
    if args.quick:
        args.out = args.out or QUICK_ROOT / "fashion_mnist_compare"
        args.work_dir = args.work_dir or QUICK_ROOT / "runs"
    args.out = args.out or DEFAULT_OUT
    args.work_dir = args.work_dir or DEFAULT_WORK
    return args


def base_config(args) -> dict:
    """The shared base settings after the budget flags and ``--set``."""
    raw = copy.deepcopy(BASE)
    if args.quick:
        raw["data"].update(train_limit=600, test_limit=300)
        raw["pretrain"].update(epochs=1, steps_per_epoch=2, batch_size=32)
        raw["finetune"].update(epochs=1, steps_per_epoch=2, batch_size=32)
    if args.pretrain_epochs is not None:
        raw["pretrain"]["epochs"] = args.pretrain_epochs
    if args.finetune_epochs is not None:
        raw["finetune"]["epochs"] = args.finetune_epochs
    if args.steps_per_epoch is not None:
        raw["pretrain"]["steps_per_epoch"] = args.steps_per_epoch
        raw["finetune"]["steps_per_epoch"] = args.steps_per_epoch
    if args.train_limit is not None:
        raw["data"]["train_limit"] = args.train_limit
    raw = apply_overrides(raw, args.overrides)
    parse_config(raw, "base config")  # reject a bad --set before any run starts
    return raw


def pretrain_steps(cfg) -> int:
    p = cfg.pretrain
    if p.steps_per_epoch:
        return p.epochs * p.steps_per_epoch
    n_train = cfg.data.train_limit or 54000  # Fashion-MNIST train minus the 10% validation split
    return p.epochs * max(1, math.ceil(n_train / p.batch_size))


def variant_config(base: dict, variant: str, seed: int):
    kind, settings = VARIANTS[variant]
    raw = apply_overrides(base, [f"modulation.kind={kind}", f"seed={seed}"])
    warmup_third = pretrain_steps(parse_config(raw)) // 3
    raw = apply_overrides(raw, [s.replace("{warmup_third}", str(warmup_third)) for s in settings])
    return parse_config(raw, f"variant {variant}")


def config_hash(cfg) -> str:
    text = json.dumps(config_to_dict(cfg), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def run_dir(work: Path, variant: str, cfg) -> Path:
    return work / f"{variant}-seed{cfg.seed}-{config_hash(cfg)}"


def pretrain_curve(out: Path) -> list[float]:
    """``pretrain/val/mean_f1`` after every pretraining epoch, from the checkpoint's history."""
    path = out / CHECKPOINT
    if not path.exists():
        return []
    history = load_checkpoint(path)["history"]
    return [e["pretrain/val/mean_f1"] for e in history if e.get("phase") == "pretrain"]


def mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


KEYS = {
    "test_f1": "test/mean_f1",
    "test_error": "test/mean_error",
    "pretrained_test_f1": "pretrained/test/mean_f1",
    "pretrained_test_error": "pretrained/test/mean_error",
    "val_f1": "val/mean_f1",
    "test_recall": "test/mean_recall",
    "test_precision": "test/mean_precision",
    "test_ece": "test/mean_ece",
}


def summarise_runs(runs: list[dict]) -> dict:
    out = {}
    for short in KEYS:
        vals = [r["metrics"][KEYS[short]] for r in runs if KEYS[short] in r["metrics"]]
        m, s = mean_std(vals)
        out[short] = {"mean": m, "std": s, "per_seed": vals}
    return out


def fmt(ms: dict, scale: float = 100.0, digits: int = 1) -> str:
    return f"{ms['mean'] * scale:.{digits}f} ± {ms['std'] * scale:.{digits}f}"


def verdict(summary: dict, headline: str | None) -> str:
    lines = []
    if headline is None or "deterministic" not in summary:
        return "No stochastic/deterministic pair was run; no verdict."
    st, de = summary[headline], summary["deterministic"]
    diff = [a - b for a, b in zip(st["test_f1"]["per_seed"], de["test_f1"]["per_seed"])]
    d_mean, d_std = mean_std(diff)
    spread = max(st["test_f1"]["std"], de["test_f1"]["std"])
    wins = sum(d > 0 for d in diff)
    se = d_std / math.sqrt(len(diff)) if len(diff) > 1 else float("inf")
    # a clear difference: the same sign in every seed and a mean beyond two standard errors
    if wins == len(diff) and d_mean > 2 * se:
        word = "beats"
    elif wins == 0 and -d_mean > 2 * se:
        word = "is worse than"
    else:
        word = "does not clearly differ from"
    lines.append(
        f"Stochastic comodulation (headline variant `{headline}`, chosen by validation F1) {word} "
        f"deterministic gain here: mean test F1 difference {d_mean * 100:+.1f} points "
        f"(paired over seeds: std {d_std * 100:.1f}, standard error {se * 100:.1f}; stochastic ahead in "
        f"{wins}/{len(diff)} seeds), "
        f"against a seed spread (std of test F1) of up to {spread * 100:.1f} points.")
    if "none" in summary:
        dn = [a - b for a, b in zip(st["test_f1"]["per_seed"], summary["none"]["test_f1"]["per_seed"])]
        m, s = mean_std(dn)
        lines.append(f"Against no modulation: {m * 100:+.1f} points (paired std {s * 100:.1f}).")
    return " ".join(lines)


def convergence_notes(runs: list[dict], kinds: list[str]) -> list[str]:
    """How far each variant's pretraining validation F1 still moved at the end."""
    notes = []
    for v in kinds:
        curves = [r["pretrain_val_f1_curve"] for r in runs if r["variant"] == v and len(r["pretrain_val_f1_curve"]) >= 2]
        if not curves:
            continue
        last_gain = [c[-1] - c[-2] for c in curves]
        n = len(curves[0])
        half = [c[-1] - c[n // 2 - 1] for c in curves]
        notes.append(f"`{v}` pretraining validation F1: last epoch {statistics.fmean(c[-1] for c in curves) * 100:.1f}, "
                     f"change over the last epoch {statistics.fmean(last_gain) * 100:+.1f} points "
                     f"(per seed: {', '.join(f'{g * 100:+.1f}' for g in last_gain)}), over the second half of "
                     f"pretraining {statistics.fmean(half) * 100:+.1f} points"
                     + (" (still rising: NOT converged)." if statistics.fmean(last_gain) > 0.01
                        or statistics.fmean(half) > 0.02 else " (roughly plateaued)."))
    skipped = [v for v in VARIANTS if VARIANTS[v][0] == "stochastic" and v not in kinds]
    if skipped:
        notes.append("Stochastic variants defined but not run in this invocation: "
                     + "; ".join(f"`{v}` ({', '.join(VARIANTS[v][1]) or 'defaults'})" for v in skipped)
                     + ". Add them to `--kinds` to run them (finished runs are read back, not retrained).")
    return notes


def write_report(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2, sort_keys=False) + "\n")
    s = result["summary"]
    L = ["# Fashion-MNIST: no modulation vs deterministic gain vs stochastic comodulation", ""]
    L += [f"Generated by `benchmarks/fashion_mnist_compare.py` ({result['command']}). "
          f"Real Fashion-MNIST, 10 one-vs-rest attributes (task set `attributes`), "
          f"{len(result['seeds'])} seeds ({', '.join(map(str, result['seeds']))}), the same budget for every "
          f"kind. Numbers are percentages, mean ± std over seeds. Test = "
          f"{'the official 10k test images' if not result['base_config']['data']['test_limit'] else 'a random ' + str(result['base_config']['data']['test_limit']) + ' of the official 10k test images'}; "
          f"validation = 10% of the training subset (model selection only); training subset, validation and "
          f"test subset are drawn with `data.split_seed` = {result['base_config']['data'].get('split_seed')}, "
          f"so every run sees the same data and the seeds vary initialisation, batch order and modulator "
          f"noise.", ""]
    L += ["| variant | test F1 (fine-tuned) | pretrained test F1 | test error (fine-tuned) | "
          "pretrained test error | val F1 | test recall | test precision |",
          "|---|---|---|---|---|---|---|---|"]
    for v in result["kinds"]:
        m = s[v]
        star = " **(headline)**" if v == result["headline_stochastic"] else ""
        L.append(f"| {v}{star} | {fmt(m['test_f1'])} | {fmt(m['pretrained_test_f1'])} | "
                 f"{fmt(m['test_error'], digits=2)} | {fmt(m['pretrained_test_error'], digits=2)} | "
                 f"{fmt(m['val_f1'])} | {fmt(m['test_recall'])} | {fmt(m['test_precision'])} |")
    L += ["", "## Per seed", "",
          "| variant | seed | test F1 | pretrained test F1 | test error | val F1 | "
          "pretrain val F1 per epoch | best fine-tune epoch | run seconds |",
          "|---|---|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        mt = r["metrics"]
        curve = " → ".join(f"{x * 100:.1f}" for x in r["pretrain_val_f1_curve"])
        L.append(f"| {r['variant']} | {r['seed']} | {mt['test/mean_f1'] * 100:.1f} | "
                 f"{mt['pretrained/test/mean_f1'] * 100:.1f} | {mt['test/mean_error'] * 100:.2f} | "
                 f"{mt['val/mean_f1'] * 100:.1f} | {curve} | {int(mt['finetune/best_epoch'])} | "
                 f"{r['seconds']:.0f} |")
    L += ["", "## Verdict", "", result["verdict"], ""]
    if result.get("notes"):
        L += ["## Notes", ""] + [f"- {n}" for n in result["notes"]] + [""]
    L += ["## Settings", "",
          f"Variants (applied on top of the base): " + "; ".join(
              f"`{v}`: kind={result['variants'][v]['kind']}"
              + (f", {', '.join(result['variants'][v]['settings'])}" if result['variants'][v]['settings'] else "")
              for v in result["kinds"]) + ".", "",
          f"Budget: pretraining {result['budget']['pretrain_steps']} steps "
          f"({result['budget']['pretrain_epochs']} epochs x {result['budget']['pretrain_steps_per_epoch']}), "
          f"fine-tuning {result['budget']['finetune_steps']} steps "
          f"({result['budget']['finetune_epochs']} epochs x {result['budget']['finetune_steps_per_epoch']}), "
          f"batch {result['budget']['batch_size']}, one task per step, training subset "
          f"{result['budget']['train_limit']} images. The `none` kind has no controller, so its "
          f"controller-only fine-tuning has nothing to train: its fine-tuned model is the pretrained one.", "",
          "Full base config (every run; `modulation.kind` and `seed` set per run):", "", "```yaml",
          yaml.safe_dump(result["base_config"], sort_keys=False).rstrip(), "```", "",
          f"Wall time: {result['train_seconds']:.0f} s ({result['train_seconds'] / 60:.1f} min) of training "
          f"summed over the {len(result['runs'])} runs, each as measured when it was trained "
          f"({result['environment']['cpu_threads']} torch thread(s), {result['environment']['device']}, on a "
          f"machine shared with other jobs, so times are inflated and noisy); this invocation took "
          f"{result['wall_seconds']:.0f} s ({sum(r['resumed'] for r in result['runs'])} runs read back "
          f"finished from the work dir, not retrained).", "",
          f"Environment: Python {result['environment']['python']}, torch {result['environment']['torch']}, "
          f"comod {result['environment']['comod']}, {result['environment']['platform']}.", ""]
    out.with_suffix(".md").write_text("\n".join(L))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    base = base_config(args)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    data_cache: dict[str, object] = {}
    runs = []
    for seed in args.seeds:
        for variant in args.kinds:
            cfg = variant_config(base, variant, seed)
            out = run_dir(args.work_dir, variant, cfg)
            key = json.dumps(config_to_dict(cfg)["data"], sort_keys=True)  # data depend on data.* only
            finished = (out / "metrics.json").exists()
            if key not in data_cache and not finished:
                data_cache.clear()  # one seed's data at a time
                data_cache[key] = load_data(cfg)
            t0 = time.perf_counter()
            print(f"[{variant} seed {seed}] {'reading' if finished else 'running'} {out}", flush=True)
            metrics = run_experiment(cfg, out, data=data_cache.get(key))
            took = time.perf_counter() - t0
            seconds = metrics.get("wall_seconds", took) if finished else took
            print(f"[{variant} seed {seed}] test F1 {metrics['test/mean_f1']:.4f} "
                  f"(pretrained {metrics['pretrained/test/mean_f1']:.4f}), val F1 {metrics['val/mean_f1']:.4f}, "
                  f"{seconds:.0f} s", flush=True)
            runs.append({"variant": variant, "seed": seed, "out_dir": str(out), "seconds": seconds,
                         "resumed": finished, "pretrain_val_f1_curve": pretrain_curve(out),
                         "metrics": metrics})
    summary = {v: summarise_runs([r for r in runs if r["variant"] == v]) for v in args.kinds}
    stoch = [v for v in args.kinds if VARIANTS[v][0] == "stochastic"]
    headline = max(stoch, key=lambda v: summary[v]["val_f1"]["mean"]) if stoch else None
    cfg0 = parse_config(base)
    result = {
        "command": "python benchmarks/fashion_mnist_compare.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "seeds": args.seeds,
        "kinds": args.kinds,
        "variants": {v: {"kind": VARIANTS[v][0], "settings": VARIANTS[v][1]} for v in args.kinds},
        "headline_stochastic": headline,
        "headline_rule": "the stochastic variant with the highest mean val/mean_f1 over seeds",
        "budget": {"pretrain_epochs": cfg0.pretrain.epochs, "pretrain_steps_per_epoch": cfg0.pretrain.steps_per_epoch,
                   "pretrain_steps": pretrain_steps(cfg0), "finetune_epochs": cfg0.finetune.epochs,
                   "finetune_steps_per_epoch": cfg0.finetune.steps_per_epoch,
                   "finetune_steps": cfg0.finetune.epochs * (cfg0.finetune.steps_per_epoch or 0),
                   "batch_size": cfg0.pretrain.batch_size, "train_limit": cfg0.data.train_limit},
        "base_config": config_to_dict(cfg0),
        "base_config_flat": flatten(cfg0),
        "overrides": args.overrides,
        "summary": summary,
        "verdict": verdict(summary, headline),
        "notes": [],
        "runs": runs,
        "train_seconds": sum(r["seconds"] for r in runs),
        "wall_seconds": time.perf_counter() - started,
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "comod": getattr(comod, "__version__", "?"), "platform": platform.platform(),
                        "cpu_threads": torch.get_num_threads(), "device": cfg0.device},
    }
    result["notes"] = convergence_notes(runs, args.kinds)
    write_report(result, args.out)
    print(f"wrote {args.out.with_suffix('.md')} and .json ({result['wall_seconds']:.0f} s)")
    print(result["verdict"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
