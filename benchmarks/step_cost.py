"""Time per controller-only fine-tuning step of each modulation mechanism.

Measured: ResNet-18 (ImageNet stem, width 1.0, decoder [256]) on 64x64 RGB
input, batch 64, with the modulation site at layer2, layer3 and layer4 in
turn. A fine-tuning step is the one of ``comod.train``: only the controller
is trainable (``model.set_trainable(["controller"])``), the model is in
training mode, and the step is forward ``model(x, task)``, the binary
cross-entropy ``comod.train.task_loss``, ``zero_grad``, ``backward`` and an
AdamW ``step`` over the controller's parameters. The ``none`` mechanism has
no controller, so for it only forward + loss is timed (nothing to
back-propagate into). Each configuration is warmed up, then timed over
several repeats (the mechanisms interleaved, so that load from other
processes hits all of them alike) and the median is reported. The
stochastic/deterministic ratio is the median over repeats of the ratio of the
two steps timed back to back (their order alternating), which stays stable
when the machine's load changes during the run; the ratio of the two medians
is reported beside it.

The stochastic kind runs with its defaults (docs/method.md): the label pass
runs without autograd (``modulation.readout.gradient: none``), so its step
is the deterministic step plus one forward of the suffix. Also computed, per
site, that FLOP bound, ``(det step + suffix forward) / det step``, with
``suffix`` the forward FLOPs from after the site to the decoder output, and
the FLOP ratio of the two whole steps (forward and backward) as counted by
``torch.utils.flop_counter.FlopCounterMode``.

Target: stochastic / deterministic time per step at most 1.15 at the layer3
site for controller-only fine-tuning. The last line printed is machine
readable: ``RESULT layer3_sto/det=X.XXX layer2_sto/det=... ...`` (fp32 rows
of the first device).

Runs on the CPU, and also on CUDA when a GPU is visible (timings synchronised;
an extra CUDA row uses bf16 autocast and channels_last). Results go to
``benchmarks/results/step_cost_<device>.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from comod.config import parse_config
from comod.data.taskdata import TaskSpec
from comod.model import build_model
from comod.train import task_loss

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine, write_results  # noqa: E402

KINDS = ("none", "deterministic", "stochastic")
TARGET_SITE = "layer3"
TARGET_RATIO = 1.15


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sites", nargs="+", default=["layer2", "layer3", "layer4"],
                   help="modulation sites, one at a time (default: layer2 layer3 layer4)")
    p.add_argument("--batch", type=int, default=64, help="batch size (default 64)")
    p.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    p.add_argument("--tasks", type=int, default=4, help="number of binary tasks (default 4)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per mechanism (default 3)")
    p.add_argument("--repeats", type=int, default=25, help="timed steps per mechanism (default 25)")
    p.add_argument("--quick", action="store_true", help="1 warm-up and 3 timed steps (about 30 s on 2 cores)")
    p.add_argument("--devices", nargs="+", choices=["cpu", "cuda"], default=None,
                   help="devices to run on (default: cpu, and cuda when available)")
    p.add_argument("--out", type=Path, default=RESULTS, help=f"results folder (default {RESULTS})")
    p.add_argument("--profile", action="store_true",
                   help="also print a torch.profiler table of one step of each kind at the target site")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.quick:
        args.warmup, args.repeats = 1, 3
    if args.devices is None:
        args.devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if "cuda" in args.devices and not torch.cuda.is_available():
        p.error("--devices cuda: no CUDA device is visible")
    if args.repeats < 1 or args.warmup < 0:
        p.error("--repeats must be >= 1 and --warmup >= 0")
    return args


def make_config(kind: str, site: str, channels_last: bool) -> dict:
    return {
        "model": {"backbone": "resnet18", "stem": "imagenet", "width": 1.0, "decoder_hidden": [256],
                  "channels_last": channels_last},
        "modulation": {"kind": kind, "sites": [site]},
        "finetune": {"trainable": ["controller"]},
    }


def make_model(kind: str, site: str, num_tasks: int, device: torch.device, channels_last: bool):
    """A model in controller-only fine-tuning mode and its optimiser (None for ``none``)."""
    cfg = parse_config(make_config(kind, site, channels_last))
    tasks = [TaskSpec(f"task{i}", 2) for i in range(num_tasks)]
    model = build_model(cfg, tasks, 3).to(device)
    model.set_trainable(["controller"])
    model.train()
    params = model.parameter_groups()["controller"]
    optimizer = torch.optim.AdamW(params, lr=cfg.finetune.lr.controller) if params else None
    return model, optimizer


def step(model, optimizer, x, y, task: int, autocast: torch.autocast) -> None:
    """One fine-tuning step (forward + loss only when there is nothing to train)."""
    with autocast:
        logits = model(x, task)
    loss = task_loss(logits, y, binary=True)
    if optimizer is None:
        return
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def count_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def site_flops(site: str, num_tasks: int, x: torch.Tensor, y: torch.Tensor) -> dict:
    """Forward FLOPs of prefix and suffix, the forward bound, and whole-step FLOPs per kind (CPU)."""
    model, _ = make_model("none", site, num_tasks, torch.device("cpu"), False)
    with torch.no_grad():
        h0 = model.prefix(x)
        prefix = count_flops(lambda: model.prefix(x))
        suffix = count_flops(lambda: model.suffix(h0, None))
    off = torch.autocast("cpu", enabled=False)
    steps = {}
    for kind in ("deterministic", "stochastic"):
        m, opt = make_model(kind, site, num_tasks, torch.device("cpu"), False)
        steps[kind] = count_flops(lambda: step(m, opt, x, y, 0, off))
    return {
        "prefix": prefix, "suffix": suffix,
        "bound": (steps["deterministic"] + suffix) / steps["deterministic"],
        "step_deterministic": steps["deterministic"], "step_stochastic": steps["stochastic"],
        "step_ratio": steps["stochastic"] / steps["deterministic"],
    }


def time_site(site: str, args, device: torch.device, bf16_cl: bool) -> dict:
    """Median ms per step of every kind at ``site``; kinds interleaved repeat by repeat."""
    fmt = torch.channels_last if bf16_cl else torch.contiguous_format
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16_cl)
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=gen).to(device)
    x = x.contiguous(memory_format=fmt)
    y = torch.randint(0, 2, (args.batch,), generator=gen).to(device)
    torch.manual_seed(args.seed)
    models = {kind: make_model(kind, site, args.tasks, device, bf16_cl) for kind in KINDS}
    counter = 0
    for kind in KINDS:
        for _ in range(args.warmup):
            step(*models[kind], x, y, counter % args.tasks, autocast)
            counter += 1
    sync(device)
    times = {kind: [] for kind in KINDS}
    for r in range(args.repeats):
        for kind in (KINDS if r % 2 == 0 else KINDS[::-1]):  # det and sto adjacent, order alternating
            task = counter % args.tasks
            counter += 1
            sync(device)
            start = time.perf_counter()
            step(*models[kind], x, y, task, autocast)
            sync(device)
            times[kind].append(1000.0 * (time.perf_counter() - start))
    if args.profile and site == TARGET_SITE:
        profile_site(models, x, y, autocast, device)
    median = {kind: statistics.median(t) for kind, t in times.items()}
    paired = [s / d for s, d in zip(times["stochastic"], times["deterministic"])]
    return {"ms": median, "ms_min": {kind: min(t) for kind, t in times.items()}, "ms_all": times,
            "ratio": statistics.median(paired),
            "ratio_of_medians": median["stochastic"] / median["deterministic"]}


def profile_site(models: dict, x, y, autocast, device: torch.device) -> None:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort = "device_time_total" if device.type == "cuda" else "cpu_time_total"
    for kind in ("deterministic", "stochastic"):
        with profile(activities=activities) as prof:
            step(*models[kind], x, y, 0, autocast)
            sync(device)
        print(f"\n-- profile of one {kind} step at {TARGET_SITE} on {device.type} --")
        print(prof.key_averages().table(sort_by=sort, row_limit=15))


def machine_info(device: torch.device) -> dict:
    info = {
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "threads": torch.get_num_threads(),
        **machine(),
        "load_average": list(os.getloadavg()),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def run_device(name: str, args, flops: dict) -> dict:
    device = torch.device(name)
    variants = [("fp32", False)] + ([("bf16+channels_last", True)] if device.type == "cuda" else [])
    rows = []
    load_before = list(os.getloadavg())
    for site in args.sites:
        for variant, bf16_cl in variants:
            t0 = time.perf_counter()
            res = time_site(site, args, device, bf16_cl)
            rows.append({"site": site, "variant": variant, **res, "flop_bound": flops[site]["bound"],
                         "step_flop_ratio": flops[site]["step_ratio"]})
            ms = res["ms"]
            print(f"  {name} {site:6s} {variant:18s} none {ms['none']:8.1f}  det {ms['deterministic']:8.1f}  "
                  f"sto {ms['stochastic']:8.1f} ms  ratio {res['ratio']:.3f} "
                  f"(of medians {res['ratio_of_medians']:.3f})  "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    info = machine_info(device)
    info["load_average_before"] = load_before
    checks = []
    for r in rows:
        if r["site"] == TARGET_SITE:
            checks.append({"variant": r["variant"], "ratio": r["ratio"], "target": TARGET_RATIO,
                           "pass": r["ratio"] <= TARGET_RATIO})
    return {"device": name, "machine": info,
            "settings": {"backbone": "resnet18", "stem": "imagenet", "width": 1.0, "decoder_hidden": [256],
                         "batch": args.batch, "image": [3, args.size, args.size], "tasks": args.tasks,
                         "warmup": args.warmup, "repeats": args.repeats, "quick": args.quick},
            "flops": flops, "rows": rows, "target": checks}


def table(result: dict) -> str:
    lines = ["| site | variant | none ms (fwd+loss) | deterministic ms | stochastic ms | sto/det "
             "| sto/det of medians | FLOP bound | FLOP ratio (step) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        ms = r["ms"]
        lines.append(f"| {r['site']} | {r['variant']} | {ms['none']:.1f} | {ms['deterministic']:.1f} "
                     f"| {ms['stochastic']:.1f} | {r['ratio']:.3f} | {r['ratio_of_medians']:.3f} "
                     f"| {r['flop_bound']:.3f} "
                     f"| {r['step_flop_ratio']:.3f} |")
    return "\n".join(lines)


def target_lines(result: dict) -> list[str]:
    return [f"{'PASS' if c['pass'] else 'FAIL'}: stochastic/deterministic at {TARGET_SITE} "
            f"({result['device']}, {c['variant']}) = {c['ratio']:.3f} (target <= {c['target']})"
            for c in result["target"]]


def flops_table(flops: dict) -> str:
    lines = ["| site | prefix GFLOP | suffix GFLOP | det step GFLOP | sto step GFLOP |",
             "|---|---:|---:|---:|---:|"]
    for site, f in flops.items():
        lines.append(f"| {site} | {f['prefix'] / 1e9:.2f} | {f['suffix'] / 1e9:.2f} "
                     f"| {f['step_deterministic'] / 1e9:.2f} | {f['step_stochastic'] / 1e9:.2f} |")
    return "\n".join(lines)


def fmt_load(load: list[float]) -> str:
    return "/".join(f"{v:.1f}" for v in load)


def markdown(result: dict, seconds: float) -> str:
    m, s = result["machine"], result["settings"]
    where = f"{m['processor']}, {m['cpu_count']} CPUs" + (f", {m['gpu']}" if "gpu" in m else "")
    return "\n".join([
        f"# Fine-tuning step cost on {result['device']}",
        "",
        f"ResNet-18 (imagenet stem, width 1.0, decoder [256]), {s['image'][1]}x{s['image'][2]} RGB, "
        f"batch {s['batch']}, {s['tasks']} binary tasks; controller-only fine-tuning step "
        f"(forward, BCE loss, zero_grad, backward, AdamW step). `none` has no controller: forward + loss "
        f"only. Median of {s['repeats']} timed steps after {s['warmup']} warm-up steps.",
        "",
        f"Machine: {where}; {m['platform']}; torch {m['torch']}, {m['threads']} threads; "
        f"total run {seconds:.0f} s; 1/5/15-min load average {fmt_load(m['load_average_before'])} before, "
        f"{fmt_load(m['load_average'])} after.",
        "",
        table(result),
        "",
        "ms = median per step. sto/det = median over repeats of the ratio of the stochastic and the "
        "deterministic step timed back to back (robust to load from other processes that changes during "
        "the run; the target is checked on it); sto/det of medians = ratio of the two medians. "
        "FLOP bound = (deterministic step + one suffix forward) / deterministic step: the label pass "
        "runs forward only; "
        "FLOP ratio (step) = FLOPs of the whole stochastic step over the deterministic one.",
        "",
        flops_table(result["flops"]),
        "",
        *[f"**{line}**" for line in target_lines(result)],
        "",
    ])


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    where = machine()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{where['processor']}, {where['cpu_count']} CPUs", flush=True)
    print("'none' has no controller to train: its time is forward + loss only (no backward, no step).")
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=gen)
    y = torch.randint(0, 2, (args.batch,), generator=gen)
    flops = {site: site_flops(site, args.tasks, x, y) for site in args.sites}
    for site, f in flops.items():
        print(f"  {site}: prefix {f['prefix'] / 1e9:.2f} GFLOP, suffix {f['suffix'] / 1e9:.2f} GFLOP, "
              f"bound {f['bound']:.3f}, step FLOP ratio {f['step_ratio']:.3f}")
    args.out.mkdir(parents=True, exist_ok=True)
    failed = False
    first = None
    for name in args.devices:
        t0 = time.perf_counter()
        result = run_device(name, args, flops)
        seconds = time.perf_counter() - t0
        result["seconds"] = seconds
        first = first or result
        print(f"\n{name}: ms per step (median of {args.repeats})")
        print(table(result))
        for line in target_lines(result):
            print(line)
        failed |= not all(c["pass"] for c in result["target"])
        write_results(args.out, f"step_cost_{name}", result, markdown(result, seconds))
    print(f"total {time.perf_counter() - start:.0f} s")
    print(result_line(first))
    return 1 if failed else 0


def result_line(result: dict) -> str:
    """``RESULT layer3_sto/det=X.XXX ...``: the target site first, fp32 rows."""
    rows = sorted((r for r in result["rows"] if r["variant"] == "fp32"), key=lambda r: r["site"] != TARGET_SITE)
    return "RESULT " + " ".join(f"{r['site']}_sto/det={r['ratio']:.3f}" for r in rows)


if __name__ == "__main__":
    raise SystemExit(main())
