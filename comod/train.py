"""One experiment: pretrain, fine-tune (task adaptation), evaluate.

Plain functions in the torchvision-references style: ``train_one_epoch``,
``evaluate`` and ``run_experiment``. Every epoch ends with an atomic
checkpoint (loadable with ``weights_only=True``) holding the model, the
optimiser, every random state and the history, so an interrupted run
resumes where it stopped and reaches the same metrics as an uninterrupted
one. Progress and per-epoch metrics go to callbacks; the core itself logs
nowhere (the platform attaches MLflow and Ray Tune).
"""
from __future__ import annotations

import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from comod.config import ExperimentConfig, config_to_dict, save_config
from comod.data import load_data
from comod.data.taskdata import IGNORE, Split, TaskData, normalise
from comod.metrics import selection_score, summarise, task_metrics
from comod.model import MultiTaskModel, build_model
from comod.pretrain_cache import entry_path, file_lock, set_aside

CHECKPOINT = "checkpoint.pt"
FORMAT = 1


class TrainingError(RuntimeError):
    """A run cannot go on (diverged loss, mismatched checkpoint, bad task names)."""


class DivergedError(TrainingError):
    """The training loss became NaN or infinite: the run stops with this reason."""


@dataclass
class Callbacks:
    """Hooks a caller attaches; each one is optional."""

    on_epoch: Callable[[str, int, int, dict], None] | None = None
    """(phase, epoch, global_step, metrics) after every epoch's validation."""
    on_step: Callable[[str, int, int], None] | None = None
    """(phase, step_in_epoch, steps_per_epoch) after every optimisation step."""
    on_phase: Callable[[str, int, int], None] | None = None
    """(phase, first_epoch, epochs) when a phase starts or resumes."""
    on_checkpoint: Callable[[Path, dict], None] | None = None
    """(path, state) after every checkpoint write."""
    on_eval: Callable[[str, int, dict], None] | None = None
    """(phase, global_step, metrics) for a validation point between epoch ends: fine-tuning's step 0
    (the pretrained model) and every ``finetune.eval_interval_steps`` steps (learning curves)."""
    on_wait: Callable[[str], None] | None = None
    """(what) about every second while the run waits for another run's pretraining (the cache's lock)."""


@dataclass
class RunState:
    phase_index: int = 0
    epochs_done: int = 0
    step: int = 0
    history: list = field(default_factory=list)
    best: dict | None = None
    metrics: dict | None = None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError(f"device: got {name!r} but no CUDA device is visible; use device: auto or cpu")
    return device


class Batcher:
    """Draws seeded batches of one task at a time from an in-memory split."""

    def __init__(self, split: Split, tasks: list[int], data: TaskData, device: torch.device,
                 generator: torch.Generator, channels_last: bool, samples_per_task: int | None = None,
                 subset_seed: int = 0):
        self.split, self.tasks, self.device, self.gen = split, tasks, device, generator
        self.pools = {k: split.task_indices(k) for k in tasks}
        if samples_per_task is not None:
            self.pools = {k: few_shot(pool, split.labels[pool, k], samples_per_task, subset_seed + k)
                          for k, pool in self.pools.items()}
        self.pools = {k: pool.to(split.images.device) for k, pool in self.pools.items()}
        empty = [data.tasks[k].name for k, pool in self.pools.items() if len(pool) == 0]
        if empty:
            raise TrainingError(f"tasks {', '.join(empty)} have no training samples in this split; "
                                f"raise data.train_limit or choose other tasks")
        shape = (1, -1, 1, 1)
        self.mean = torch.tensor(data.mean, device=device).view(shape)
        self.std = torch.tensor(data.std, device=device).view(shape)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def sample(self, batch_size: int) -> tuple[int, torch.Tensor, torch.Tensor]:
        task = self.tasks[int(torch.randint(len(self.tasks), (1,), generator=self.gen))]
        pool = self.pools[task]
        pick = torch.randint(len(pool), (batch_size,), generator=self.gen).to(pool.device)
        idx = pool[pick]
        x = normalise(self.split.images[idx].to(self.device, non_blocking=True), self.mean, self.std)
        y = self.split.labels[idx, task].to(self.device, non_blocking=True)
        return task, x.contiguous(memory_format=self.memory_format), y


def few_shot(pool: torch.Tensor, labels: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """``k`` of a task's training images ``pool`` (with their ``labels``), class-stratified and seeded:
    classes keep their shares of ``k`` (largest remainder), and every class at least one image while
    ``k`` allows (taken from the largest class)."""
    if k >= len(pool):
        return pool
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))
    y = labels[order]
    classes, counts = y.unique(return_counts=True)
    if k < len(classes):
        return pool[order[:k].sort().values]
    share = counts.double() / counts.sum() * k
    quota = share.floor().long()
    quota[torch.argsort(share - share.floor(), descending=True)[:k - int(quota.sum())]] += 1
    for c in torch.nonzero(quota == 0).flatten().tolist():
        quota[int(torch.argmax(quota))] -= 1
        quota[c] = 1
    picked = torch.cat([order[y == c][:q] for c, q in zip(classes.tolist(), quota.tolist())])
    return pool[picked.sort().values]


def task_loss(logits: torch.Tensor, y: torch.Tensor, binary: bool) -> torch.Tensor:
    if binary:
        return F.binary_cross_entropy_with_logits(logits.float(), y.float())
    return F.cross_entropy(logits.float(), y)


def train_one_epoch(model: MultiTaskModel, optimizer: torch.optim.Optimizer, batcher: Batcher,
                    steps: int, batch_size: int, autocast: torch.autocast, phase: str,
                    callbacks: Callbacks, every: int | None = None,
                    on_interval: Callable[[int], None] | None = None, offset: int = 0) -> float:
    """``steps`` optimisation steps of one task each; returns the mean loss. ``on_interval(i)`` runs
    after the epoch's step ``i`` when the phase's step ``offset + i`` is a multiple of ``every``
    (not after the epoch's last step, which the epoch's own evaluation covers)."""
    model.train()
    total = torch.zeros((), device=batcher.device)
    for i in range(steps):
        task, x, y = batcher.sample(batch_size)
        with autocast:
            logits = model(x, task)
        loss = task_loss(logits, y, model.tasks[task].binary)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.detach()
        if callbacks.on_step:
            callbacks.on_step(phase, i + 1, steps)
        if every and on_interval is not None and (offset + i + 1) % every == 0 and i + 1 < steps:
            on_interval(i + 1)
            model.train()
    mean = float(total) / max(steps, 1)  # one host sync per epoch, not per step
    if not math.isfinite(mean):
        raise DivergedError(f"{phase}: the training loss became {mean} (diverged); "
                            f"lower the learning rates of {phase}.lr or the noise scale")
    return mean


@torch.no_grad()
def evaluate(model: MultiTaskModel, split: Split, tasks: list[int], data: TaskData, device: torch.device,
             batch_size: int, autocast: torch.autocast, ece_bins: int, channels_last: bool = False) -> dict:
    """Per-task metrics of ``tasks`` on ``split`` (samples outside a task ignored)."""
    model.eval()
    shape = (1, -1, 1, 1)
    mean = torch.tensor(data.mean, device=device).view(shape)
    std = torch.tensor(data.std, device=device).view(shape)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    logits: dict[int, list] = {k: [] for k in tasks}
    for start in range(0, len(split), batch_size):
        x = normalise(split.images[start:start + batch_size].to(device), mean, std).contiguous(memory_format=fmt)
        with autocast:
            out = model.forward_tasks(x, tasks)
        for k in tasks:
            logits[k].append(out[k].float().cpu())
    labels = split.labels.cpu()
    result = {}
    for k in tasks:
        keep = labels[:, k] != IGNORE
        result[data.tasks[k].name] = task_metrics(torch.cat(logits[k])[keep], labels[keep, k], data.tasks[k],
                                                  ece_bins)
    return result


def task_indices(data: TaskData, names: list[str], where: str) -> list[int]:
    if not names:
        return list(range(len(data.tasks)))
    unknown = [n for n in names if n not in data.task_names]
    if unknown:
        raise TrainingError(f"{where}: got unknown task {unknown[0]!r}; tasks of {data.name} "
                            f"({len(data.tasks)}): {', '.join(data.task_names)}")
    return [data.task_index(n) for n in names]


def _build_optimizer(model: MultiTaskModel, phase_cfg) -> torch.optim.Optimizer | None:
    model.set_trainable(phase_cfg.trainable)
    groups = [{"params": params, "lr": getattr(phase_cfg.lr, name), "name": name}
              for name, params in model.parameter_groups().items()
              if name in phase_cfg.trainable and params]
    if not groups:
        return None
    return torch.optim.AdamW(groups, weight_decay=phase_cfg.weight_decay)


def _rng_state(gen: torch.Generator) -> dict:
    state = {"torch": torch.get_rng_state(), "sampler": gen.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict, gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    gen.set_state(state["sampler"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _cpu_state(model: torch.nn.Module) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def config_difference(a: Any, b: Any, path: str = "") -> str | None:
    """The first setting where two config dicts differ, as ``path: old in the checkpoint, new now``."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            diff = config_difference(a.get(key), b.get(key), f"{path}.{key}" if path else key)
            if diff:
                return diff
        return None
    return None if a == b else f"{path}: {a!r} in the checkpoint, {b!r} now"


def means(metrics: dict[str, float]) -> dict[str, float]:
    """The means over tasks of summarised metrics (what is reported per epoch)."""
    return {k: v for k, v in metrics.items() if "/mean_" in k}


class DamagedFile(TrainingError):
    """A checkpoint or cache entry that does not load (a write cut short, a full disk, another format)."""


def load_checkpoint(path: Path, fix: str = "delete it, or start the run again with --restart") -> dict:
    """A checkpoint written by :func:`_save_atomic`; a damaged one raises :class:`DamagedFile` naming the file."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:  # noqa: BLE001 - torch raises many kinds for a truncated or foreign file
        raise DamagedFile(f"{path} is damaged and cannot be read ({type(err).__name__}: "
                          f"{str(err).strip().splitlines()[0][:160] if str(err).strip() else 'no detail'}); "
                          f"{fix}") from None
    if not isinstance(saved, dict):
        raise DamagedFile(f"{path} is not a comod checkpoint; {fix}")
    return saved


PHASES = ("pretrain", "finetune")


def _cached(entry: Path) -> dict | None:
    """A pretraining cache entry, or None when it is damaged: then it is set aside (kept, renamed) and the
    caller pretrains again, once, in its place."""
    try:
        cached = load_checkpoint(entry)
        if not {"model", "step", "history", "rng"} <= set(cached):
            raise DamagedFile(f"{entry} lacks the parts of a pretrained model")
        return cached
    except DamagedFile as err:
        aside = set_aside(entry)
        warnings.warn(f"{err}: set aside as {aside.name}; pretraining again", RuntimeWarning, stacklevel=2)
        return None


def run_experiment(cfg: ExperimentConfig, out_dir: str | Path, data: TaskData | None = None,
                   callbacks: Callbacks | None = None, resume: bool = True,
                   pretrain_cache: str | Path | None = None, cache_wait_s: float | None = None
                   ) -> dict[str, float]:
    """Run (or resume) one experiment in ``out_dir``; returns the final metrics.

    Writes ``config.yaml``, ``checkpoint.pt`` (every epoch) and ``metrics.json``.
    ``data`` may be passed in by a caller that shares one loaded dataset.
    ``pretrain_cache`` (a folder) shares pretrained models between runs whose
    pretraining settings are equal (see :mod:`comod.pretrain_cache`); a run waits at most ``cache_wait_s``
    (None: no limit) for another run that is making the entry it needs, saying so through
    ``callbacks.on_wait``. A damaged checkpoint raises :class:`DamagedFile`; a damaged cache entry is
    set aside and pretrained again.
    """
    callbacks = callbacks or Callbacks()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / CHECKPOINT
    cfg_dict = config_to_dict(cfg)
    saved = load_checkpoint(ckpt_path) if resume and ckpt_path.exists() else None
    if saved is not None:
        diff = config_difference(saved["config"], cfg_dict)
        if diff:
            raise TrainingError(f"{out} holds a run of another config ({diff}); "
                                f"choose another output folder, or restart it from scratch")
        if saved.get("metrics") is not None:
            return saved["metrics"]
    save_config(cfg, out / "config.yaml")

    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    if data is None:
        data = load_data(cfg)
    on_device = cfg.data.on_device == "yes" or (cfg.data.on_device == "auto" and device.type == "cuda")
    splits = {name: getattr(data, name) for name in ("train", "val", "test")}
    if on_device:
        splits = {name: s.to(device) for name, s in splits.items()}
    model = build_model(cfg, data.tasks, data.image_shape[0]).to(device)
    cl = cfg.model.channels_last
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
    eval_tasks = task_indices(data, cfg.finetune.tasks, "finetune.tasks")
    steps_of = {phase: getattr(cfg, phase).steps_per_epoch
                or max(1, math.ceil(len(data.train) / getattr(cfg, phase).batch_size)) for phase in PHASES}
    warmup = cfg.modulation.readout.warmup_steps
    if cfg.modulation.kind == "stochastic" and warmup and warmup >= cfg.pretrain.epochs * steps_of["pretrain"]:
        raise TrainingError(f"modulation.readout.warmup_steps: got {warmup}; expected fewer than the "
                            f"{cfg.pretrain.epochs * steps_of['pretrain']} pretraining steps, else fine-tuning "
                            f"runs inside the warm-up and the couplings get no gradient")

    state = RunState()
    if saved is not None:
        model.load_state_dict(saved["model"])
        state = RunState(saved["phase_index"], saved["epochs_done"], saved["step"], saved["history"],
                         saved["best"])
        _set_rng_state(saved["rng"], gen)

    def checkpoint(optimizer, metrics=None):
        payload = {"format": FORMAT, "config": cfg_dict, "phase_index": state.phase_index,
                   "epochs_done": state.epochs_done, "step": state.step, "model": _cpu_state(model),
                   "optimizer": optimizer.state_dict() if optimizer is not None else None,
                   "rng": _rng_state(gen), "history": state.history, "best": state.best, "metrics": metrics,
                   "task_names": data.task_names}
        _save_atomic(payload, ckpt_path)
        if callbacks.on_checkpoint:
            callbacks.on_checkpoint(ckpt_path, payload)

    def measure(split: str, tasks: list[int], prefix: str) -> dict[str, float]:
        return summarise(evaluate(model, splits[split], tasks, data, device, cfg.eval.batch_size, autocast,
                                  cfg.eval.ece_bins, cl), prefix)

    def curve_point(tasks: list[int], step: int, finetune_step: int, val: dict | None = None) -> None:
        """A fine-tuning validation point between epoch ends (learning curves)."""
        point = means(val if val is not None else measure("val", tasks, "finetune/val"))
        state.history.append({"phase": "curve", "step": step, "finetune_step": finetune_step, **point})
        if callbacks.on_eval:
            callbacks.on_eval("finetune", step, point)

    def run_phase(phase_index: int) -> None:
        phase = PHASES[phase_index]
        pcfg = getattr(cfg, phase)
        tasks = task_indices(data, pcfg.tasks, f"{phase}.tasks")
        optimizer = _build_optimizer(model, pcfg)
        first_epoch = state.epochs_done if phase_index == state.phase_index else 0
        if saved is not None and phase_index == saved["phase_index"] and optimizer is not None \
                and saved["optimizer"] is not None:
            optimizer.load_state_dict(saved["optimizer"])
        state.phase_index, state.epochs_done = phase_index, first_epoch
        epochs = pcfg.epochs if optimizer is not None else 0
        if callbacks.on_phase:
            callbacks.on_phase(phase, first_epoch, epochs)
        finetuning = phase == "finetune"
        batcher = Batcher(splits["train"], tasks, data, device, gen, cl,
                          samples_per_task=cfg.finetune.samples_per_task if finetuning else None,
                          subset_seed=cfg.data.split_seed)
        steps = steps_of[phase]
        for epoch in range(first_epoch, epochs):
            loss = train_one_epoch(model, optimizer, batcher, steps, pcfg.batch_size, autocast, phase, callbacks,
                                   every=cfg.finetune.eval_interval_steps if finetuning else None,
                                   on_interval=lambda i: curve_point(tasks, state.step + i, epoch * steps + i),
                                   offset=epoch * steps)
            state.step += steps
            val = measure("val", tasks, f"{phase}/val")
            metrics = {f"{phase}/train_loss": loss, **means(val)}
            state.epochs_done = epoch + 1
            state.history.append({"phase": phase, "epoch": epoch + 1, "step": state.step, **metrics})
            if phase == "finetune":
                score = selection_score(val, f"{phase}/val", cfg.eval.select_metric)
                if state.best is None or score > state.best["score"]:
                    state.best = {"score": score, "epoch": epoch + 1, "model": _cpu_state(model)}
            checkpoint(optimizer)
            if callbacks.on_epoch:
                callbacks.on_epoch(phase, epoch + 1, state.step, metrics)

    def pretrain_from_cache(entry: Path, cached: dict) -> None:
        model.load_state_dict(cached["model"])
        state.step, state.history = cached["step"], list(cached["history"])
        _set_rng_state(cached["rng"], gen)
        if callbacks.on_phase:
            callbacks.on_phase("pretrain", cfg.pretrain.epochs, cfg.pretrain.epochs)
        for entry_metrics in state.history:  # replayed, so every run reports the same epochs
            if callbacks.on_epoch:
                metrics = {k: v for k, v in entry_metrics.items() if k not in ("phase", "epoch", "step")}
                callbacks.on_epoch("pretrain", entry_metrics["epoch"], entry_metrics["step"], metrics)

    started = time.perf_counter()
    if state.phase_index == 0:
        if pretrain_cache is None:
            run_phase(0)
        else:
            entry = entry_path(pretrain_cache, cfg)
            with file_lock(entry, on_wait=callbacks.on_wait, timeout=cache_wait_s):
                cached = _cached(entry) if entry.exists() and state.epochs_done == 0 else None
                if cached is not None:
                    pretrain_from_cache(entry, cached)
                else:
                    run_phase(0)
                    _save_atomic({"model": _cpu_state(model), "step": state.step, "history": state.history,
                                  "rng": _rng_state(gen)}, entry)
        state.phase_index, state.epochs_done = 1, 0
        # the pretrained model is fine-tuning's epoch 0: selection keeps it unless an epoch beats it
        val = measure("val", eval_tasks, "finetune/val")
        state.best = {"score": selection_score(val, "finetune/val", cfg.eval.select_metric), "epoch": 0,
                      "model": _cpu_state(model)}
        pre = measure("test", eval_tasks, "pretrained/test")
        state.history.append({"phase": "pretrained", "step": state.step, **means(pre)})
        curve_point(eval_tasks, state.step, 0, val)  # fine-tuning's step 0
        checkpoint(None)
    run_phase(1)

    if state.best is not None:
        model.load_state_dict(state.best["model"])
    final: dict[str, float] = {}
    final.update(measure("val", eval_tasks, "val"))
    final.update(measure("test", eval_tasks, "test"))
    for entry in state.history:
        if entry["phase"] == "pretrained":
            final.update({k: v for k, v in entry.items() if k.startswith("pretrained/")})
    # 0 when no fine-tuning epoch beat the pretrained model on validation
    final["finetune/best_epoch"] = float(state.best["epoch"]) if state.best else 0.0
    final["steps"] = float(state.step)
    final["wall_seconds"] = time.perf_counter() - started
    (out / "metrics.json").write_text(json.dumps(final, indent=2, sort_keys=True))
    state.best = None  # the selected weights are the model's now; keep the checkpoint small
    checkpoint(None, metrics=final)
    return final
