"""One experiment: pretrain, fine-tune (task adaptation), evaluate.

Plain functions in the torchvision-references style: ``train_one_epoch``,
``evaluate`` and ``run_experiment``, whose steps (set up, resume, pretrain
or take the pretrained model from the cache, start fine-tuning, fine-tune,
finish) are the methods of one private ``_Run``, called in that order. Every
epoch ends with an atomic checkpoint (loadable with ``weights_only=True``;
its keys: :class:`comod.checkpoint.Checkpoint`) holding the model, the
optimiser, every random state and the history, so an interrupted run
resumes where it stopped and reaches the same metrics as an uninterrupted
one. Progress and per-epoch metrics go to callbacks; the core itself logs
nowhere (the platform attaches MLflow and Ray Tune).
"""
from __future__ import annotations

import dataclasses
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

from comod.checkpoint import (CHECKPOINT, FORMAT, Best, Checkpoint, PretrainedModel, cpu_state, rng_state,
                              set_rng_state)
from comod.config import ExperimentConfig, config_to_dict, pretraining_modulation, save_config
from comod.data import load_data
from comod.data.taskdata import IGNORE, Split, TaskData, normalise
from comod.metrics import selection_score, summarise, task_metrics
from comod.model import MultiTaskModel, build_model, load_pretrained
from comod.pretrain_cache import entry_path, file_lock, set_aside


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
    on_checkpoint: Callable[[Path, Checkpoint], None] | None = None
    """(path, payload) after every checkpoint write (the payload: :class:`comod.checkpoint.Checkpoint`)."""
    on_eval: Callable[[str, int, dict], None] | None = None
    """(phase, global_step, metrics) for a validation point between epoch ends: fine-tuning's step 0
    (the pretrained model) and every ``finetune.eval_interval_steps`` steps (learning curves)."""
    on_wait: Callable[[str], None] | None = None
    """(what) about every second while the run waits for another run's pretraining (the cache's lock)."""


@dataclass
class RunState:
    """A run's progress: what its checkpoint keeps besides the config, the weights and the random states."""

    phase_index: int = 0
    epochs_done: int = 0
    step: int = 0
    history: list = field(default_factory=list)
    best: Best | None = None


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


def cosine_factor(step: int, total: int) -> float:
    """The cosine schedule's share of the base rate at the phase's ``step`` of ``total``: 1 at the first
    step, 0 after the last."""
    return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1)))


def set_lr_factor(optimizer: torch.optim.Optimizer, factor: float) -> None:
    for group in optimizer.param_groups:
        group.setdefault("base_lr", group["lr"])
        group["lr"] = group["base_lr"] * factor


def train_one_epoch(model: MultiTaskModel, optimizer: torch.optim.Optimizer, batcher: Batcher,
                    steps: int, batch_size: int, autocast: torch.autocast, phase: str,
                    callbacks: Callbacks, every: int | None = None,
                    on_interval: Callable[[int], None] | None = None, offset: int = 0,
                    lr_factor: Callable[[int], float] | None = None) -> float:
    """``steps`` optimisation steps of one task each; returns the mean loss. ``on_interval(i)`` runs
    after the epoch's step ``i`` when the phase's step ``offset + i`` is a multiple of ``every``
    (not after the epoch's last step, which the epoch's own evaluation covers). ``lr_factor(t)`` scales
    every group's base rate at the phase's step ``t`` (a schedule; None: constant)."""
    model.train()
    total = torch.zeros((), device=batcher.device)
    for i in range(steps):
        if lr_factor is not None:
            set_lr_factor(optimizer, lr_factor(offset + i))
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


def _save_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def config_difference(a: Any, b: Any, path: str = "") -> str | None:
    """The first setting where two config dicts differ, as ``path: old in the checkpoint, new now``."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            diff = config_difference(a.get(key), b.get(key), f"{path}.{key}" if path else key)
            if diff:
                return diff
        return None
    return None if a == b else f"{path}: {a!r} in the checkpoint, {b!r} now"


def check_same_config(saved: Checkpoint, cfg: ExperimentConfig, out: Path, fix: str) -> None:
    """Refuse to resume ``saved`` (the checkpoint in ``out``) with another config: the error names the
    first setting that differs, then ``fix``."""
    diff = config_difference(saved["config"], config_to_dict(cfg))
    if diff:
        raise TrainingError(f"{out} holds a run of another config ({diff}); {fix}")


def means(metrics: dict[str, float]) -> dict[str, float]:
    """The means over tasks of summarised metrics (what is reported per epoch)."""
    return {k: v for k, v in metrics.items() if "/mean_" in k}


class DamagedFile(TrainingError):
    """A checkpoint or cache entry that does not load (a write cut short, a full disk, another format)."""


def load_checkpoint(path: Path, fix: str = "delete it, or start the run again with --restart") -> Checkpoint:
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


def _cached(entry: Path) -> PretrainedModel | None:
    """A pretraining cache entry, or None when it is damaged: then it is set aside (kept, renamed) and the
    caller pretrains again, once, in its place."""
    try:
        cached = load_checkpoint(entry)
        if not PretrainedModel.__required_keys__ <= set(cached):
            raise DamagedFile(f"{entry} lacks the parts of a pretrained model")
        return cached
    except DamagedFile as err:
        aside = set_aside(entry)
        warnings.warn(f"{err}: set aside as {aside.name}; pretraining again", RuntimeWarning, stacklevel=3)
        return None


class _Run:
    """One experiment's fixed parts (config, data, model, device) and its progress (``state``), with the
    steps :func:`run_experiment` takes, in its order: set up, resume, pretrain (or take the pretrained model
    from the cache), start fine-tuning from the pretrained model, fine-tune, finish."""

    def __init__(self, cfg: ExperimentConfig, out: Path, data: TaskData | None, callbacks: Callbacks):
        """Set up: the device, the seeds, the data (``data``, when the caller shares one), the model, the
        phases' lengths; settings that cannot work together fail here, before any training."""
        self.cfg, self.out, self.callbacks = cfg, out, callbacks
        self.ckpt_path = out / CHECKPOINT
        self.cfg_dict = config_to_dict(cfg)
        self.device = device = resolve_device(cfg.device)
        torch.manual_seed(cfg.seed)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.data = data = data if data is not None else load_data(cfg)
        on_device = cfg.data.on_device == "yes" or (cfg.data.on_device == "auto" and device.type == "cuda")
        self.splits = {name: getattr(data, name) for name in ("train", "val", "test")}
        if on_device:
            self.splits = {name: s.to(device) for name, s in self.splits.items()}
        # the pretraining model first, so a shared pretraining's weights do not depend on the fine-tuning kind
        self.pretrain_cfg = dataclasses.replace(cfg, modulation=pretraining_modulation(cfg))
        self.pretrain_model = build_model(self.pretrain_cfg, data.tasks, data.image_shape[0]).to(device)
        self.finetune_model = (self.pretrain_model if cfg.pretrain.modulation_kind == "same"
                               else build_model(cfg, data.tasks, data.image_shape[0]).to(device))
        self.model = self.pretrain_model
        """The model in training: pretraining's until fine-tuning starts (:meth:`start_finetuning`)."""
        self.timing = {"pretrain_seconds": 0.0, "pretrain_wait_seconds": 0.0}
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
        self.eval_tasks = task_indices(data, cfg.finetune.tasks, "finetune.tasks")
        self.steps_of = {phase: getattr(cfg, phase).steps_per_epoch
                         or max(1, math.ceil(len(data.train) / getattr(cfg, phase).batch_size))
                         for phase in PHASES}
        pretrain_steps = cfg.pretrain.epochs * self.steps_of["pretrain"]
        warmup = cfg.modulation.readout.warmup_steps
        if self.pretrain_cfg.modulation.kind == "stochastic" and warmup and warmup >= pretrain_steps:
            raise TrainingError(f"modulation.readout.warmup_steps: got {warmup}; expected fewer than the "
                                f"{pretrain_steps} pretraining steps, else fine-tuning runs inside the warm-up "
                                f"and the couplings get no gradient")
        self.state = RunState()
        # (phase index, state) of the optimiser in the checkpoint resumed from, for that phase to load
        self.saved_optimizer: tuple[int, dict] | None = None

    # -- checkpoints ------------------------------------------------------
    def resume(self, saved: Checkpoint) -> None:
        if saved["phase_index"] > 0:
            self.model = self.finetune_model
        self.model.load_state_dict(saved["model"])
        self.state = RunState(saved["phase_index"], saved["epochs_done"], saved["step"], saved["history"],
                              saved["best"])
        if saved["optimizer"] is not None:
            self.saved_optimizer = (saved["phase_index"], saved["optimizer"])
        set_rng_state(saved["rng"], self.gen)

    def checkpoint(self, optimizer: torch.optim.Optimizer | None,
                   metrics: dict[str, float] | None = None) -> None:
        state = self.state
        payload: Checkpoint = {
            "format": FORMAT, "config": self.cfg_dict, "phase_index": state.phase_index,
            "epochs_done": state.epochs_done, "step": state.step, "model": cpu_state(self.model),
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "rng": rng_state(self.gen), "history": state.history, "best": state.best, "metrics": metrics,
            "task_names": self.data.task_names}
        _save_atomic(payload, self.ckpt_path)
        if self.callbacks.on_checkpoint:
            self.callbacks.on_checkpoint(self.ckpt_path, payload)

    # -- evaluation -------------------------------------------------------
    def measure(self, split: str, tasks: list[int], prefix: str) -> dict[str, float]:
        """The summarised metrics of ``tasks`` on ``split`` (train, val or test), named ``prefix/...``."""
        cfg = self.cfg
        metrics = evaluate(self.model, self.splits[split], tasks, self.data, self.device, cfg.eval.batch_size,
                           self.autocast, cfg.eval.ece_bins, cfg.model.channels_last)
        return summarise(metrics, prefix)

    def curve_point(self, tasks: list[int], step: int, finetune_step: int, val: dict | None = None) -> None:
        """A fine-tuning validation point between epoch ends (learning curves)."""
        point = means(val if val is not None else self.measure("val", tasks, "finetune/val"))
        self.state.history.append({"phase": "curve", "step": step, "finetune_step": finetune_step, **point})
        if self.callbacks.on_eval:
            self.callbacks.on_eval("finetune", step, point)

    # -- phases -----------------------------------------------------------
    def pretrain(self, cache: str | Path | None, wait_s: float | None) -> None:
        """Pretraining, or its result from the cache (``cache`` None: no cache), which then holds it."""
        if cache is None:
            self._timed_pretraining()
            return
        entry = entry_path(cache, self.cfg)
        asked = time.perf_counter()
        with file_lock(entry, on_wait=self.callbacks.on_wait, timeout=wait_s):
            self.timing["pretrain_wait_seconds"] = time.perf_counter() - asked
            cached = _cached(entry) if entry.exists() and self.state.epochs_done == 0 else None
            if cached is not None:
                self.pretrained_from(cached)
            else:
                self._timed_pretraining()
                entry_state: PretrainedModel = {"model": cpu_state(self.model), "step": self.state.step,
                                                "history": self.state.history, "rng": rng_state(self.gen)}
                _save_atomic(entry_state, entry)

    def _timed_pretraining(self) -> None:
        started = time.perf_counter()
        self.train_phase(0)
        self.timing["pretrain_seconds"] = time.perf_counter() - started

    def pretrained_from(self, cached: PretrainedModel) -> None:
        """Take the pretrained model from a cache entry; its epochs are replayed to the callbacks, so that
        every run reports the same epochs."""
        state, callbacks, epochs = self.state, self.callbacks, self.cfg.pretrain.epochs
        self.model.load_state_dict(cached["model"])
        state.step, state.history = cached["step"], list(cached["history"])
        set_rng_state(cached["rng"], self.gen)
        if callbacks.on_phase:
            callbacks.on_phase("pretrain", epochs, epochs)
        for entry in state.history:
            if callbacks.on_epoch:
                metrics = {k: v for k, v in entry.items() if k not in ("phase", "epoch", "step")}
                callbacks.on_epoch("pretrain", entry["epoch"], entry["step"], metrics)

    def start_finetuning(self) -> None:
        """The pretrained model is fine-tuning's epoch 0: selection keeps it unless an epoch beats it. Its
        test metrics are kept (``pretrained/test/...``) and its validation is the curve's step 0."""
        state, cfg = self.state, self.cfg
        state.phase_index, state.epochs_done = 1, 0
        if self.finetune_model is not self.pretrain_model:
            load_pretrained(self.finetune_model, self.pretrain_model.state_dict())
            self.model, self.pretrain_model = self.finetune_model, None
        if cfg.finetune.readout_reset and hasattr(self.model.mechanism, "reset_readout"):
            self.model.mechanism.reset_readout(task_indices(self.data, cfg.finetune.tasks, "finetune.tasks"))
        val = self.measure("val", self.eval_tasks, "finetune/val")
        state.best = {"score": selection_score(val, "finetune/val", cfg.eval.select_metric), "epoch": 0,
                      "model": cpu_state(self.model)}
        pre = self.measure("test", self.eval_tasks, "pretrained/test")
        state.history.append({"phase": "pretrained", "step": state.step, **means(pre), **self.timing})
        self.curve_point(self.eval_tasks, state.step, 0, val)
        self.checkpoint(None)

    def train_phase(self, phase_index: int) -> None:
        """The phase's epochs (from where a resumed run stopped), each validated, checkpointed, reported."""
        cfg, state, callbacks = self.cfg, self.state, self.callbacks
        phase = PHASES[phase_index]
        pcfg = getattr(cfg, phase)
        finetuning = phase == "finetune"
        tasks = task_indices(self.data, pcfg.tasks, f"{phase}.tasks")
        optimizer = _build_optimizer(self.model, pcfg)
        first_epoch = state.epochs_done if phase_index == state.phase_index else 0
        saved, self.saved_optimizer = self.saved_optimizer, None
        if optimizer is not None and saved is not None and saved[0] == phase_index:
            optimizer.load_state_dict(saved[1])
        state.phase_index, state.epochs_done = phase_index, first_epoch
        epochs = pcfg.epochs if optimizer is not None else 0
        if callbacks.on_phase:
            callbacks.on_phase(phase, first_epoch, epochs)
        batcher = Batcher(self.splits["train"], tasks, self.data, self.device, self.gen,
                          cfg.model.channels_last,
                          samples_per_task=cfg.finetune.samples_per_task if finetuning else None,
                          subset_seed=cfg.data.split_seed)
        steps = self.steps_of[phase]
        lr_factor = (lambda t: cosine_factor(t, epochs * steps)) if pcfg.lr_schedule == "cosine" else None
        for epoch in range(first_epoch, epochs):
            loss = train_one_epoch(self.model, optimizer, batcher, steps, pcfg.batch_size, self.autocast, phase,
                                   callbacks, every=cfg.finetune.eval_interval_steps if finetuning else None,
                                   on_interval=lambda i: self.curve_point(tasks, state.step + i, epoch * steps + i),
                                   offset=epoch * steps, lr_factor=lr_factor)
            state.step += steps
            val = self.measure("val", tasks, f"{phase}/val")
            metrics = {f"{phase}/train_loss": loss, **means(val)}
            state.epochs_done = epoch + 1
            state.history.append({"phase": phase, "epoch": epoch + 1, "step": state.step, **metrics})
            if finetuning:
                score = selection_score(val, f"{phase}/val", cfg.eval.select_metric)
                if state.best is None or score > state.best["score"]:
                    state.best = {"score": score, "epoch": epoch + 1, "model": cpu_state(self.model)}
            self.checkpoint(optimizer)
            if callbacks.on_epoch:
                callbacks.on_epoch(phase, epoch + 1, state.step, metrics)

    def finish(self, wall_seconds: float) -> dict[str, float]:
        """The selected model's validation and test metrics, with the pretrained model's, the selected epoch
        (0 when no fine-tuning epoch beat the pretrained model), the steps and the wall time; written to
        ``metrics.json`` and into the last checkpoint."""
        state = self.state
        if state.best is not None:
            self.model.load_state_dict(state.best["model"])
        final: dict[str, float] = {}
        final.update(self.measure("val", self.eval_tasks, "val"))
        final.update(self.measure("test", self.eval_tasks, "test"))
        for entry in state.history:
            if entry["phase"] == "pretrained":
                final.update({k: v for k, v in entry.items() if k.startswith("pretrained/") or k in self.timing})
        final["finetune/best_epoch"] = float(state.best["epoch"]) if state.best else 0.0
        final["steps"] = float(state.step)
        final["wall_seconds"] = wall_seconds
        (self.out / "metrics.json").write_text(json.dumps(final, indent=2, sort_keys=True))
        state.best = None  # the selected weights are the model's now; keep the checkpoint small
        self.checkpoint(None, metrics=final)
        return final


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
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    saved = load_checkpoint(out / CHECKPOINT) if resume and (out / CHECKPOINT).exists() else None
    if saved is not None:
        check_same_config(saved, cfg, out, "choose another output folder, or restart it from scratch")
        if saved.get("metrics") is not None:
            return saved["metrics"]
    save_config(cfg, out / "config.yaml")

    run = _Run(cfg, out, data, callbacks or Callbacks())
    if saved is not None:
        run.resume(saved)
    started = time.perf_counter()
    if run.state.phase_index == 0:
        run.pretrain(pretrain_cache, cache_wait_s)
        run.start_finetuning()
    run.train_phase(1)
    return run.finish(time.perf_counter() - started)
