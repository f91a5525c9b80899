"""The GPU path of comod's core, checked and measured in one short call (issue 27).

GPU time is scarce, so this one script does, in at most 8 minutes on one H100:

1. **Correctness**: the core's tests marked ``gpu`` (through pytest when it is
   importable), and a short ``run_experiment`` (synthetic data, tiny model,
   fp32, deterministic and stochastic kinds) on the CPU and on the device,
   whose losses and metrics must agree within tolerance. The stochastic kind's
   noise is drawn on the CPU from one seeded generator for both runs, so the
   comparison isolates the arithmetic; TF32 is off for it.
2. **Trial throughput** (images per second) of the CelebA-sized model
   (ResNet-18, imagenet stem, width 1.0, decoder [256], 64x64 RGB, 40 binary
   tasks, batch 256, uint8 images held on the device and normalised as comod
   does): comod's own ``train_one_epoch`` with a ``Batcher``, in pretraining
   (all groups trainable; kinds none, deterministic, stochastic) and in
   controller-only fine-tuning (deterministic, stochastic), at fp32, bf16
   autocast and bf16 + channels_last, each beside a plain PyTorch loop of
   torchvision's resnet18 (fc replaced by a 256-unit decoder, 40 one-logit
   heads, one task per batch, every parameter trained) at the same precision.
   All configurations are warmed up, then timed in interleaved blocks (CUDA
   synchronised); medians over blocks. Targets: deterministic / plain at
   least 0.8 in pretraining (the same training work on both sides);
   stochastic / deterministic at most its FLOP bound ``(det step + one
   suffix forward) / det step`` (counted with FlopCounterMode, as
   ``step_cost.py`` does).
3. **Packing**: 1, 2, 4 and 8 trial processes (this script in worker mode)
   sharing the device, each running the same fine-tuning loop for a fixed
   time on its own CelebA-sized data: total images per second and the memory
   each takes. Target: 4 trials at least 2.5x one trial.
4. **Recommended settings** for CelebA-sized trials, derived from the above.

Needs only PyTorch and torchvision (it adds the repository root to
``sys.path``, so a plain checkout works without ``pip install``); imports
nothing from ``comod_platform``. ``--device cpu --quick`` runs the same code
paths on the CPU with a tiny model, as a dry run. Results:
``benchmarks/results/gpu_check_<device>.json`` and ``.md`` (or ``--out``).
The last line printed is ``RESULT det/plain_bf16=X.XX sto/det_bf16=X.XX
pack4/pack1=X.XX`` (``nan`` where not measured).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import random
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(Path(__file__).resolve().parent)]  # a plain checkout: no pip install needed

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import comod.mechanisms.stochastic as stochastic_module  # noqa: E402
from _common import code_version, machine, results_folder, write_results  # noqa: E402
from comod.config import parse_config  # noqa: E402
from comod.data.taskdata import Split, TaskData, TaskSpec, normalise  # noqa: E402
from comod.model import build_model  # noqa: E402
from comod.train import (Batcher, Callbacks, _build_optimizer, load_checkpoint, run_experiment,  # noqa: E402
                         train_one_epoch)

PRECISIONS = {"fp32": (False, False), "bf16": (True, False), "bf16_cl": (True, True)}
"""name -> (bf16 autocast, channels_last)."""
PHASE_KINDS = {"pretrain": ("none", "deterministic", "stochastic"), "finetune": ("deterministic", "stochastic")}
CELEBA_IMAGES = 202_599
"""CelebA's images (train, val and test: comod's ``data.on_device`` puts all three splits on the GPU)."""
DET_PLAIN_TARGET, PACK_TARGET = 0.8, 2.5
LOSS_RTOL, METRIC_ATOL = 1e-3, 0.03
RECOMMENDATIONS = "## Recommended settings for CelebA-sized trials"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cuda (default; one GPU), or cpu for a dry run (with --quick: under 2 minutes)")
    p.add_argument("--quick", action="store_true",
                   help="tiny model (width 0.125, 32x32, batch 8), few steps, packing 1 and 2 trials only")
    p.add_argument("--out", type=Path, default=None,
                   help="results folder (default benchmarks/results; with --quick nothing is written unless --out)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default 256; quick 8)")
    p.add_argument("--site", default="layer3", help="modulation site (default layer3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per configuration (default 10; quick 1)")
    p.add_argument("--steps", type=int, default=None, help="steps per timed block (default 20; quick 2)")
    p.add_argument("--repeats", type=int, default=None, help="timed blocks per configuration (default 5; quick 3)")
    p.add_argument("--pack", type=int, nargs="+", default=None,
                   help="trial processes sharing the device (default 1 2 4 8; quick 1 2)")
    p.add_argument("--pack-seconds", type=float, default=None,
                   help="seconds each packing round runs (default 15; quick 3)")
    p.add_argument("--pack-precision", choices=list(PRECISIONS), default=None,
                   help="precision of the packed trials (default: the fastest measured for fine-tuning)")
    p.add_argument("--images", type=int, default=None,
                   help=f"images held on the device per trial (default CelebA's {CELEBA_IMAGES} on cuda, "
                        "4096 on cpu, 256 quick)")
    p.add_argument("--skip-tests", action="store_true", help="do not run the tests marked gpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worker", help=argparse.SUPPRESS)  # a packed trial: JSON settings from the parent
    args = p.parse_args(argv)
    if args.worker:
        return args
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible; for a dry run on the CPU pass --device cpu --quick")
    q = args.quick
    defaults = {"batch": 8 if q else 256, "warmup": 1 if q else 10, "steps": 2 if q else 20,
                "repeats": 3 if q else 5, "pack": [1, 2] if q else [1, 2, 4, 8], "pack_seconds": 3.0 if q else 15.0,
                "images": 256 if q else (CELEBA_IMAGES if args.device == "cuda" else 4096)}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.width, args.size, args.decoder, args.tasks = (0.125, 32, 32, 40) if q else (1.0, 64, 256, 40)
    for key in ("batch", "steps", "repeats", "images"):
        if getattr(args, key) < (2 if key == "batch" else 1):
            p.error(f"--{key}: got {getattr(args, key)}; expected a positive integer (batch: at least 2)")
    return args


def settings(args) -> dict:
    """What a worker needs to build the same trial, and what the results record."""
    return {k: getattr(args, k) for k in ("device", "quick", "batch", "site", "width", "size", "decoder", "tasks",
                                          "images", "seed")}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------- building trials

def synthetic_data(s: dict, device: torch.device) -> TaskData:
    """CelebA's shape (``images`` uint8 RGB images, 40 binary labels), made on the device."""
    gen = torch.Generator(device=device).manual_seed(s["seed"])
    shape = (s["images"], 3, s["size"], s["size"])
    images = torch.randint(0, 256, shape, generator=gen, device=device, dtype=torch.uint8)
    labels = torch.randint(0, 2, (s["images"], s["tasks"]), generator=gen, device=device)
    split = Split(images, labels)
    tasks = [TaskSpec(f"attribute_{k}", 2) for k in range(s["tasks"])]
    return TaskData("celeba_shaped", tasks, split, split, split, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def experiment_config(s: dict, kind: str, precision: str):
    bf16, channels_last = PRECISIONS[precision]
    return parse_config({
        "device": s["device"], "precision": "bf16" if bf16 else "fp32", "seed": s["seed"],
        "data": {"dataset": "synthetic"},
        "model": {"backbone": "resnet18", "stem": "imagenet", "width": s["width"], "decoder_hidden": [s["decoder"]],
                  "channels_last": channels_last},
        "modulation": {"kind": kind, "sites": [s["site"]]},
        "pretrain": {"batch_size": s["batch"], "weight_decay": 1e-4},
        "finetune": {"batch_size": s["batch"], "trainable": ["controller"]},
    })


def comod_trial(s: dict, data: TaskData, phase: str, kind: str, precision: str, device: torch.device):
    """``run(steps)``: comod's own training loop (``train_one_epoch``: a Batcher, forward, task_loss, AdamW)
    for one phase, with the optimiser ``run_experiment`` builds; and the model."""
    cfg = experiment_config(s, kind, precision)
    torch.manual_seed(s["seed"])
    model = build_model(cfg, data.tasks, 3).to(device)
    optimizer = _build_optimizer(model, getattr(cfg, phase))
    batcher = Batcher(data.train, list(range(len(data.tasks))), data, device,
                      torch.Generator().manual_seed(s["seed"]), cfg.model.channels_last)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
    callbacks = Callbacks()

    def run(steps: int) -> None:
        train_one_epoch(model, optimizer, batcher, steps, s["batch"], autocast, phase, callbacks)

    return run, model, batcher


class PlainNet(nn.Module):
    """torchvision's resnet18, fc replaced by a ReLU decoder layer, and one linear head per binary task."""

    def __init__(self, width: float, decoder: int, num_tasks: int):
        super().__init__()
        import torchvision
        from torchvision.models.resnet import BasicBlock

        if width == 1.0:
            trunk = torchvision.models.resnet18()
        else:  # --quick only: torchvision's ResNet class at comod's reduced stage widths
            from comod.backbones import _WidthResNet

            trunk = _WidthResNet(BasicBlock, (2, 2, 2, 2), width, False, 3)
            trunk.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        features = trunk.layer4[-1].bn2.num_features
        trunk.fc = nn.Sequential(nn.Linear(features, decoder), nn.ReLU(inplace=True))
        self.trunk = trunk
        self.heads = nn.ModuleList(nn.Linear(decoder, 1) for _ in range(num_tasks))

    def forward(self, x: torch.Tensor, task: int) -> torch.Tensor:
        return self.heads[task](self.trunk(x)).squeeze(-1)


def plain_trial(s: dict, data: TaskData, precision: str, device: torch.device):
    """``run(steps)``: the loop a user would write for the same network: every parameter trained, indices
    drawn on the device, the task by Python's random (no host sync), AdamW with comod's learning rate."""
    bf16, channels_last = PRECISIONS[precision]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    torch.manual_seed(s["seed"])
    net = PlainNet(s["width"], s["decoder"], s["tasks"]).to(device, memory_format=fmt)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-4)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    images, labels = data.train.images, data.train.labels
    mean = torch.tensor(data.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(data.std, device=device).view(1, -1, 1, 1)
    rng = random.Random(s["seed"])

    def run(steps: int) -> None:
        net.train()
        for _ in range(steps):
            idx = torch.randint(len(images), (s["batch"],), device=device)
            task = rng.randrange(s["tasks"])
            x = normalise(images[idx], mean, std).contiguous(memory_format=fmt)
            with autocast:
                logits = net(x, task)
            loss = F.binary_cross_entropy_with_logits(logits.float(), labels[idx, task].float())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    return run


# ------------------------------------------------------------------- correctness

def run_gpu_tests(timeout: float) -> dict:
    """The core's tests marked gpu, through pytest in a subprocess (skipped, with the reason, without pytest)."""
    if importlib.util.find_spec("pytest") is None:
        return {"status": "skipped", "reason": "pytest is not installed here; run `python -m pytest -m gpu "
                                                "tests/comod` where it is"}
    files = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests" / "comod").rglob("test_*.py")
                   if "mark.gpu" in p.read_text())
    if not files:
        return {"status": "skipped", "reason": "no test in tests/comod is marked gpu"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", *files]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "failed", "reason": f"timed out after {timeout:.0f} s", "files": files}
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    summary = next((line for line in reversed(lines) if re.search(r"\d+ (passed|failed|skipped|error)", line)),
                   lines[-1] if lines else "")
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", summary)}
    if proc.returncode != 0:
        status = "failed"
    else:
        status = "passed" if counts.get("passed") else "skipped"
    result = {"status": status, "files": files, "command": " ".join(cmd[1:]), "summary": summary.strip("= "),
              "counts": counts, "seconds": round(time.perf_counter() - started, 1)}
    if status == "skipped":
        result["reason"] = "no CUDA device is visible (tests/conftest.py skips the gpu tests)"
    if status == "failed":
        result["output_tail"] = "\n".join(lines[-40:])
    return result


class _NoiseOnCpu:
    """``torch`` for the stochastic mechanism's module, except that ``randn`` draws on the CPU from one
    seeded generator and moves the draw to the device: CPU and CUDA runs then see the same noise."""

    def __init__(self, seed: int):
        self._gen = torch.Generator().manual_seed(seed)

    def __getattr__(self, name):
        return getattr(torch, name)

    def randn(self, *size, device=None, **kwargs):
        return torch.randn(*size, generator=self._gen, **kwargs).to(device)


@contextlib.contextmanager
def exact_fp32():
    """fp32 without TF32 (cuDNN's convolutions use TF32 by default) and with the same noise on every device."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    stochastic_module.torch = _NoiseOnCpu(0)
    try:
        yield
    finally:
        stochastic_module.torch = torch
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def tiny_run(kind: str, device: str, out: Path) -> dict:
    cfg = parse_config({
        "device": device, "precision": "fp32", "seed": 0,
        "data": {"dataset": "synthetic", "tasks": "attributes", "train_limit": 256, "test_limit": 64},
        "model": {"stem": "small", "width": 0.125, "decoder_hidden": [16]},
        "modulation": {"kind": kind, "sites": ["layer2"], "noise_scale": 0.5},
        "pretrain": {"epochs": 1, "steps_per_epoch": 4, "batch_size": 16},
        "finetune": {"epochs": 1, "steps_per_epoch": 4, "batch_size": 16},
        "eval": {"batch_size": 128},
    })
    with exact_fp32():
        metrics = run_experiment(cfg, out)
    saved = load_checkpoint(out / "checkpoint.pt")
    losses = {f"{h['phase']}{h['epoch']}": h[f"{h['phase']}/train_loss"] for h in saved["history"]
              if h["phase"] in ("pretrain", "finetune")}
    means = {k: v for k, v in metrics.items() if "/mean_" in k and k.startswith(("test/", "val/", "pretrained/"))}
    return {"losses": losses, "metrics": means, "weights": saved["model"]}


def compare_devices(device: str) -> dict:
    """A tiny run_experiment (fp32) of each modulating kind on the CPU and on ``device``: losses within a
    relative LOSS_RTOL, mean metrics within METRIC_ATOL; the weights' largest difference is reported."""
    kinds = {}
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        for kind in ("deterministic", "stochastic"):
            a, b = (tiny_run(kind, dev, Path(tmp) / f"{kind}_{i}") for i, dev in enumerate(("cpu", device)))
            loss_rel = max(abs(a["losses"][k] - b["losses"][k]) / max(abs(a["losses"][k]), 1e-12) for k in a["losses"])
            metric_abs = max(abs(a["metrics"][k] - b["metrics"][k]) for k in a["metrics"])
            weight_abs = max(float((a["weights"][k].float() - b["weights"][k].float()).abs().max())
                             for k in a["weights"] if a["weights"][k].is_floating_point())
            kinds[kind] = {"loss_max_rel_diff": loss_rel, "metric_max_abs_diff": metric_abs,
                           "weight_max_abs_diff": weight_abs, "losses_cpu": a["losses"], "losses_device": b["losses"],
                           "pass": loss_rel <= LOSS_RTOL and metric_abs <= METRIC_ATOL}
    return {"compared": f"cpu vs {device}" + (" (the same device twice: a dry run of the check)"
                                               if device == "cpu" else ""),
            "settings": "run_experiment, synthetic attributes, 256 train / 64 test images, small stem, width 0.125, "
                        "decoder [16], site layer2, noise_scale 0.5, 4 pretraining + 4 fine-tuning steps of batch 16, "
                        "fp32 without TF32, the stochastic noise drawn on the CPU for both",
            "tolerance": {"loss_rel": LOSS_RTOL, "mean_metric_abs": METRIC_ATOL},
            "kinds": kinds, "pass": all(k["pass"] for k in kinds.values())}


# ------------------------------------------------------------------- FLOPs and throughput

def count_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def flop_bounds(s: dict, data: TaskData, device: torch.device) -> dict:
    """Per phase: FLOPs of a deterministic and a stochastic step and of one suffix forward, and the bound
    ``(det step + suffix forward) / det step`` (fp32; the counts do not depend on precision)."""
    out = {}
    for phase in PHASE_KINDS:
        steps = {}
        for kind in ("deterministic", "stochastic"):
            run, model, batcher = comod_trial(s, data, phase, kind, "fp32", device)
            steps[kind] = count_flops(lambda: run(1))
        _, x, _ = batcher.sample(s["batch"])
        with torch.no_grad():
            h0 = model.prefix(x)
            suffix = count_flops(lambda: model.suffix(h0, None))
        det = steps["deterministic"]
        out[phase] = {"step_deterministic": det, "step_stochastic": steps["stochastic"], "suffix_forward": suffix,
                      "bound": (det + suffix) / det, "step_ratio": steps["stochastic"] / det}
    return out


def time_blocks(runs: dict, args, device: torch.device) -> dict:
    """Seconds per block of ``args.steps`` steps for every run, after ``args.warmup`` steps each; runs
    interleaved block by block (the order rotating and alternating) so load changes hit all alike."""
    for run in runs.values():
        run(args.warmup)
    sync(device)
    names, secs = list(runs), {name: [] for name in runs}
    for r in range(args.repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in (order if r % 2 == 0 else order[::-1]):
            sync(device)
            start = time.perf_counter()
            runs[name](args.steps)
            sync(device)
            secs[name].append(time.perf_counter() - start)
    return secs


def throughput(args, s: dict, data: TaskData, device: torch.device, flops: dict) -> dict:
    runs = {}
    for precision in PRECISIONS:
        for phase, kinds in PHASE_KINDS.items():
            for kind in kinds:
                runs[(precision, phase, kind)] = comod_trial(s, data, phase, kind, precision, device)[0]
        runs[(precision, "plain")] = plain_trial(s, data, precision, device)
    secs = time_blocks(runs, args, device)
    rate = {key: [args.steps * args.batch / t for t in ts] for key, ts in secs.items()}

    def paired(a, b):  # a's images/s over b's, per block: for det over sto, sto's step time over det's
        return statistics.median(x / y for x, y in zip(rate[a], rate[b]))

    rows = []
    for precision in PRECISIONS:
        plain = (precision, "plain")
        for phase, kinds in PHASE_KINDS.items():
            det, sto = (precision, phase, "deterministic"), (precision, phase, "stochastic")
            rows.append({"precision": precision, "phase": phase,
                         "comod": {kind: statistics.median(rate[(precision, phase, kind)]) for kind in kinds},
                         "plain": statistics.median(rate[plain]),
                         "det/plain": paired(det, plain), "sto/det": paired(det, sto),
                         "flop_bound": flops[phase]["bound"]})
    targets = []
    for r in rows:
        if r["phase"] == "pretrain":
            targets.append({"what": f"det/plain {r['precision']} pretrain", "value": r["det/plain"],
                            "target": f">= {DET_PLAIN_TARGET}", "pass": r["det/plain"] >= DET_PLAIN_TARGET})
        targets.append({"what": f"sto/det step time {r['precision']} {r['phase']}", "value": r["sto/det"],
                        "target": f"<= the FLOP bound {r['flop_bound']:.3f}", "pass": r["sto/det"] <= r["flop_bound"]})
    return {"rows": rows, "targets": targets, "images_per_s_all": {"/".join(k): v for k, v in rate.items()},
            "warmup": args.warmup, "steps": args.steps, "repeats": args.repeats}


# ------------------------------------------------------------------- packing

def worker(spec: dict) -> None:
    """One packed trial: build, warm up, say READY, wait for GO on stdin, train for ``seconds``, report."""
    s, device = spec["settings"], torch.device(spec["settings"]["device"])
    torch.set_num_threads(spec["threads"])
    data = synthetic_data(s, device)
    run, _, _ = comod_trial(s, data, "finetune", spec["kind"], spec["precision"], device)
    run(spec["warmup"])
    sync(device)
    print("READY", flush=True)
    sys.stdin.readline()
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < spec["seconds"]:
        run(spec["chunk"])  # train_one_epoch ends with a host sync: the clock reads finished work
        steps += spec["chunk"]
    sync(device)
    seconds = time.perf_counter() - start
    report = {"pid": os.getpid(), "steps": steps, "seconds": seconds, "images_per_s": steps * s["batch"] / seconds,
              "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        report["max_memory_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
        report["max_memory_reserved_mib"] = torch.cuda.max_memory_reserved(device) / 2 ** 20
    print("PACKRESULT " + json.dumps(report), flush=True)


def nvidia_smi(*query: str) -> list[list[str]]:
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", *query, "--format=csv,noheader,nounits"], capture_output=True,
                             text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [[f.strip() for f in line.split(",")] for line in out.splitlines() if line.strip()]


def pack_round(n: int, spec: dict, seconds: float) -> dict:
    """``n`` workers started together; all warm, they train for ``seconds`` at once."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    procs = [subprocess.Popen(cmd, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(n)]
    logs: list[list[str]] = [[] for _ in procs]
    util, apps, stop = [], {}, threading.Event()

    def read_until(i: int, prefix: str) -> str:
        for line in procs[i].stdout:
            if line.startswith(prefix):
                return line
            logs[i].append(line.rstrip())
        raise RuntimeError(f"packed trial {i + 1} of {n} exited before {prefix}:\n" + "\n".join(logs[i][-30:]))

    try:
        for i in range(n):
            read_until(i, "READY")
        for p in procs:
            p.stdin.write("GO\n")
            p.stdin.flush()

        def sample():
            while not stop.wait(1.0):
                util.extend(float(r[0]) for r in nvidia_smi("--query-gpu=utilization.gpu") if r and r[0].isdigit())
                for pid, mib in (r for r in nvidia_smi("--query-compute-apps=pid,used_memory") if len(r) == 2):
                    if mib.isdigit():
                        apps[int(pid)] = max(apps.get(int(pid), 0), int(mib))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        reports = [json.loads(read_until(i, "PACKRESULT ")[len("PACKRESULT "):]) for i in range(n)]
    finally:
        stop.set()
        for p in procs:
            with contextlib.suppress(Exception):
                p.stdin.close()
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
    for r in reports:
        r["nvidia_smi_mib"] = apps.get(r["pid"])
    return {"trials": n, "total_images_per_s": sum(r["images_per_s"] for r in reports),
            "gpu_util_mean": statistics.fmean(util) if util else None, "workers": reports}


def packing(args, s: dict, precision: str, device: torch.device) -> dict:
    threads = max(1, (os.cpu_count() or 1) // max(args.pack)) if device.type == "cuda" else torch.get_num_threads()
    spec = {"settings": s, "kind": "stochastic", "precision": precision, "threads": threads,
            "warmup": args.warmup, "chunk": max(1, args.steps // 2), "seconds": args.pack_seconds}
    rows = []
    for n in args.pack:
        t0 = time.perf_counter()
        rows.append(pack_round(n, spec, args.pack_seconds))
        print(f"  packing {n} trial(s): {rows[-1]['total_images_per_s']:.0f} images/s in total "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    one = next((r["total_images_per_s"] for r in rows if r["trials"] == 1), None)
    for r in rows:
        r["vs_one"] = r["total_images_per_s"] / one if one else None
    four = next((r["vs_one"] for r in rows if r["trials"] == 4), None)
    return {"kind": "stochastic", "phase": "finetune", "precision": precision, "seconds": args.pack_seconds,
            "threads_per_trial": threads, "rows": rows, "pack4/pack1": four,
            "target": {"value": four, "target": f">= {PACK_TARGET}",
                       "pass": None if four is None else four >= PACK_TARGET,
                       "why_not": why_not_packing(rows, four)}}


def why_not_packing(rows: list[dict], four: float | None) -> str | None:
    if four is None:
        return "4 trials were not run (--quick runs 1 and 2)"
    if four >= PACK_TARGET:
        return None
    util = next((r["gpu_util_mean"] for r in rows if r["trials"] == 1), None)
    if util is not None and util >= 80:
        return (f"one trial already keeps the GPU busy {util:.0f}% of the time (nvidia-smi): more trials "
                f"time-share its kernels instead of filling idle gaps, so 4 give {four:.2f}x")
    if util is not None:
        return (f"one trial keeps the GPU busy {util:.0f}% of the time, yet 4 give only {four:.2f}x: the "
                "trials contend for something else (the host's cores or memory bandwidth)")
    return f"4 trials give {four:.2f}x; no GPU utilisation was available to tell why"


# ------------------------------------------------------------------- recommendation and report

def recommend(throughput_rows: list[dict], pack: dict, device: str, batch: int, gpu_mib: float | None) -> dict:
    """Precision and channels_last from the fastest stochastic fine-tuning row; trials per GPU the fewest whose
    total throughput is within 10% of the best packing, cut to what fits in 90% of the device's memory."""
    fine = {r["precision"]: r["comod"]["stochastic"] for r in throughput_rows if r["phase"] == "finetune"}
    best = max(fine, key=fine.get)
    bf16, channels_last = PRECISIONS[best]
    totals = {r["trials"]: r["total_images_per_s"] for r in pack["rows"]}
    trials = min(n for n, t in totals.items() if t >= 0.9 * max(totals.values()))
    per_trial = [w.get("nvidia_smi_mib") or (w.get("max_memory_reserved_mib") or 0) + 512  # + a CUDA context
                 for r in pack["rows"] for w in r["workers"]] if device == "cuda" else []
    mib = max(per_trial) if per_trial else None
    while mib and gpu_mib and trials > 1 and trials * mib > 0.9 * gpu_mib:
        trials //= 2
    basis = [f"precision {best}: the fastest stochastic fine-tuning ({fine[best]:.0f} images/s; "
             + ", ".join(f"{p} {v:.0f}" for p, v in fine.items()) + ")",
             f"{trials} trial(s) per GPU: total images/s by trials "
             + ", ".join(f"{n}: {t:.0f}" for n, t in totals.items())
             + (f"; about {mib:.0f} MiB each (CelebA-sized data on the device)" if mib else ""),
             f"batch {batch}: the only batch measured" + (" (the CelebA protocol's)" if batch == 256 else "")]
    return {"measured_on_gpu": device == "cuda", "precision": "bf16" if bf16 else "fp32",
            "channels_last": channels_last, "batch_size": batch, "trials_per_gpu": trials,
            "search.resources.gpu": round(1 / trials, 4), "memory_per_trial_mib": mib, "basis": basis}


def result_line(tp: dict, pack: dict) -> str:
    row = next(r for r in tp["rows"] if r["precision"] == "bf16" and r["phase"] == "pretrain")
    fine = next(r for r in tp["rows"] if r["precision"] == "bf16" and r["phase"] == "finetune")
    four = pack["pack4/pack1"]
    return (f"RESULT det/plain_bf16={row['det/plain']:.2f} sto/det_bf16={fine['sto/det']:.2f} "
            f"pack4/pack1={'nan' if four is None else f'{four:.2f}'}")


def fmt(v, spec=".0f") -> str:
    return "-" if v is None else format(v, spec)


def markdown(res: dict) -> str:
    m, s, c = res["machine"], res["settings"], res["correctness"]
    cpu = res["device"] == "cpu"
    lines = [f"# GPU check on {m.get('gpu', res['device'])}", ""]
    if cpu:
        lines += ["**A CPU dry run: no figure here is a GPU measurement.**", ""]
    lines += [f"Machine: {m['processor']}, {m['cpu_count']} CPUs, torch {m['torch']}"
              + (f", {m['gpu']} ({m['gpu_mib']:.0f} MiB), CUDA {m['cuda']}" if "gpu" in m else "")
              + f"; commit {res['code'].get('commit')}; total run {res['seconds']:.0f} s"
              + (" (--quick)" if s["quick"] else "") + ".", "",
              "## Correctness", ""]
    t = c["gpu_tests"]
    lines.append(f"- tests marked gpu: **{t['status']}**" + (f" ({t['summary']})" if t.get("summary") else "")
                 + (f"; {t['reason']}" if t.get("reason") else ""))
    d = c["cpu_vs_device"]
    lines.append(f"- short run, {d['compared']}: **{'pass' if d['pass'] else 'FAIL'}** ({d['settings']})")
    for kind, k in d["kinds"].items():
        lines.append(f"  - {kind}: losses differ by {k['loss_max_rel_diff']:.2e} (relative, tolerance "
                     f"{LOSS_RTOL}), mean metrics by {k['metric_max_abs_diff']:.4f} (tolerance {METRIC_ATOL}), "
                     f"weights by {k['weight_max_abs_diff']:.2e} at most")
    tp = res["throughput"]
    lines += ["", "## Trial throughput (images/s)", "",
              f"ResNet-18 (imagenet stem, width {s['width']}, decoder [{s['decoder']}]), {s['size']}x{s['size']} RGB, "
              f"{s['tasks']} binary tasks, batch {s['batch']}, site {s['site']}, {s['images']} uint8 images on the "
              f"device. comod: `train_one_epoch` with a `Batcher`; plain: torchvision's resnet18 with a "
              f"{s['decoder']}-unit decoder and one-logit heads, every parameter trained (the same plain loop is "
              f"the reference of both phases). Median of {tp['repeats']} interleaved blocks of {tp['steps']} steps "
              f"after {tp['warmup']} warm-up steps; ratios are medians of per-block ratios.", "",
              "| precision | phase | plain | none | deterministic | stochastic | det/plain | sto/det time "
              "| FLOP bound |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in tp["rows"]:
        cm = r["comod"]
        lines.append(f"| {r['precision']} | {r['phase']} | {r['plain']:.0f} | {fmt(cm.get('none'))} "
                     f"| {cm['deterministic']:.0f} | {cm['stochastic']:.0f} | {r['det/plain']:.2f} "
                     f"| {r['sto/det']:.3f} | {r['flop_bound']:.3f} |")
    lines += ["", "sto/det time = stochastic step time / deterministic step time. FLOP bound = (det step + one "
              "suffix forward) / det step, per phase (FlopCounterMode). Fine-tuning trains the controller only, "
              "so its det/plain compares unequal work and has no target.", ""]
    lines += [f"- {'PASS' if t['pass'] else 'FAIL'}: {t['what']} = {t['value']:.3f} (target {t['target']})"
              for t in tp["targets"]]
    pk = res["packing"]
    lines += ["", "## Packing: trials sharing one device", "",
              f"Each trial a process of its own (as Ray's fractional GPUs), stochastic fine-tuning at "
              f"{pk['precision']}, {pk['threads_per_trial']} CPU thread(s) each, {pk['seconds']:.0f} s together "
              f"after warm-up, each with its own {s['images']} images on the device.", "",
              "| trials | total images/s | vs 1 trial | per trial images/s | max allocated MiB | nvidia-smi MiB "
              "| GPU busy % |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in pk["rows"]:
        w = r["workers"]
        alloc = [x.get("max_memory_allocated_mib") for x in w]
        smi = [x.get("nvidia_smi_mib") for x in w]
        lines.append(f"| {r['trials']} | {r['total_images_per_s']:.0f} | {r['vs_one']:.2f} "
                     f"| {statistics.fmean(x['images_per_s'] for x in w):.0f} "
                     f"| {fmt(max(alloc) if all(a is not None for a in alloc) else None)} "
                     f"| {fmt(max(smi) if all(a is not None for a in smi) else None)} "
                     f"| {fmt(r['gpu_util_mean'])} |")
    tg = pk["target"]
    lines += ["", f"- {'-' if tg['pass'] is None else 'PASS' if tg['pass'] else 'FAIL'}: 4 trials / 1 trial = "
              f"{fmt(tg['value'], '.2f')} (target {tg['target']})" + (f": {tg['why_not']}" if tg["why_not"] else "")]
    rec = res["recommendation"]
    lines += ["", RECOMMENDATIONS, ""]
    if not rec["measured_on_gpu"]:
        lines += ["These come from a CPU dry run, **not from GPU measurements**: they show how the settings are "
                  "derived, not what to use on a GPU.", ""]
    lines += [f"- precision: `{rec['precision']}`", f"- model.channels_last: `{str(rec['channels_last']).lower()}`",
              f"- batch size: {rec['batch_size']}",
              f"- trials per GPU: {rec['trials_per_gpu']}, "
              f"i.e. `search.resources.gpu: {rec['search.resources.gpu']:g}`",
              "", "Why: " + "; ".join(rec["basis"]) + ".", ""]
    return "\n".join(lines)


def machine_info(device: torch.device) -> dict:
    info = {**machine(), "torch": torch.__version__, "python": sys.version.split()[0],
            "threads": torch.get_num_threads(), "load_average": list(os.getloadavg()),
            "cudnn_benchmark": torch.backends.cudnn.benchmark, "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_mib=props.total_memory / 2 ** 20, cuda=torch.version.cuda)
    return info


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return 0
    start = time.perf_counter()
    device, s = torch.device(args.device), settings(args)
    print(f"gpu_check on {args.device}{' (--quick)' if args.quick else ''}: torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads", flush=True)
    t0 = time.perf_counter()
    tests = ({"status": "skipped", "reason": "--skip-tests"} if args.skip_tests
             else run_gpu_tests(timeout=180))
    print(f"  tests marked gpu: {tests['status']} {tests.get('summary', tests.get('reason', ''))} "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    t0 = time.perf_counter()
    cmp = compare_devices(args.device)
    print(f"  short run, {cmp['compared']}: {'pass' if cmp['pass'] else 'FAIL'} "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    correctness = {"gpu_tests": tests, "cpu_vs_device": cmp, "pass": cmp["pass"] and tests["status"] != "failed"}
    t0 = time.perf_counter()
    data = synthetic_data(s, device)
    flops = flop_bounds(s, data, device)
    tp = throughput(args, s, data, device, flops)
    del data
    print(f"  throughput ({time.perf_counter() - t0:.0f} s):", flush=True)
    for r in tp["rows"]:
        print(f"    {r['precision']:8s} {r['phase']:8s} plain {r['plain']:8.0f}  det {r['comod']['deterministic']:8.0f}"
              f"  sto {r['comod']['stochastic']:8.0f} images/s  det/plain {r['det/plain']:.2f}  "
              f"sto/det time {r['sto/det']:.3f} (bound {r['flop_bound']:.3f})", flush=True)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    fine = {r["precision"]: r["comod"]["stochastic"] for r in tp["rows"] if r["phase"] == "finetune"}
    pack = packing(args, s, args.pack_precision or max(fine, key=fine.get), device)
    info = machine_info(device)
    rec = recommend(tp["rows"], pack, args.device, args.batch, info.get("gpu_mib"))
    result = {"device": args.device, "quick": args.quick, "machine": info, "code": code_version(), "settings": s,
              "correctness": correctness, "flops": flops, "throughput": tp, "packing": pack,
              "recommendation": rec, "seconds": time.perf_counter() - start}
    result["result"] = result_line(tp, pack)
    folder = results_folder(args.out, args.quick)
    if folder is not None:
        write_results(folder, f"gpu_check_{args.device}", result, markdown(result))
    print(f"total {result['seconds']:.0f} s; correctness {'pass' if correctness['pass'] else 'FAIL'}")
    if args.device == "cpu":
        print("(a CPU dry run: the ratios below were measured on the CPU, not a GPU"
              + ("; pack4/pack1 is nan: --quick packs 1 and 2 trials only)" if pack["pack4/pack1"] is None else ")"))
    print(result["result"], flush=True)
    return 0 if correctness["pass"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
