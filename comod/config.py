"""The experiment config: one typed tree, one dotted name per setting.

A setting's dotted path (``modulation.noise_scale``, ``finetune.lr.controller``)
is its YAML key, its ``--set`` name, its search-space key and its logged
parameter name. Loading rejects unknown keys, wrong types and impossible
values with the dotted path, the value received and what is allowed.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from comod.names import KINDS, SITE_CHOICES, decoder_layer, is_site_name
from comod.schema import ConfigError, check, from_dict, to_dict

GROUPS = ("backbone", "decoder", "heads", "controller")
"""Parameter groups, in the order fine-tuning may open them."""


@dataclass
class DataConfig:
    dataset: Literal["fashion_mnist", "fashion_mosaic", "celeba", "cifar100", "synthetic", "folder"] = "fashion_mnist"
    """folder: your own images, listed with their labels in ROOT/labels.csv (docs/guides/own-data.md)."""
    root: str | None = None
    """Folder holding the dataset; null searches $COMOD_DATA, ./data and the system's places.
    Required for folder: the folder holding labels.csv."""
    tasks: str | list[str] = "attributes"
    """Task set of the dataset (e.g. fashion_mnist: attributes, coarse_fine, groups); folder: all (also
    accepted as attributes, the default) or a list of labels.csv's task columns."""
    image_size: int | None = None
    """Square side images are resized to once at load; null keeps the native size."""
    train_limit: int | None = None
    """Keep a seeded random subset of this many training images (null: all)."""
    test_limit: int | None = None
    val_fraction: float = 0.1
    """Share of the training set held out for model selection when the dataset has no validation split
    (folder: of the rows without a split, and as many again for test when no row names test)."""
    split_seed: int = 0
    """Seed of the validation split and of the subsets; apart from the training seed, so runs
    over several seeds see the same data."""
    on_device: Literal["auto", "yes", "no"] = "auto"
    """Keep the uint8 images on the accelerator (auto: when it is a GPU)."""

    def validate(self, path: str):
        check(self.image_size is None or self.image_size >= 8, f"{path}.image_size", self.image_size,
              "an integer >= 8, or null for the native size")
        for key in ("train_limit", "test_limit"):
            value = getattr(self, key)
            check(value is None or value >= 1, f"{path}.{key}", value, "a positive integer or null")
        check(0.0 < self.val_fraction < 1.0, f"{path}.val_fraction", self.val_fraction,
              "a number with 0 < val_fraction < 1")
        from comod.data.registry import task_sets  # local: config stays importable without data deps

        choices = task_sets(self.dataset)
        if self.dataset != "folder":
            check(isinstance(self.tasks, str) and self.tasks in choices, f"{path}.tasks", self.tasks,
                  f"a task set of {self.dataset}: {', '.join(choices)}"
                  + ("" if isinstance(self.tasks, str) else " (a list of column names needs dataset folder)"))
            return
        check(self.root is not None, f"{path}.root", self.root,
              "the folder holding labels.csv (dataset folder has no default place)")
        if isinstance(self.tasks, str):
            check(self.tasks in choices, f"{path}.tasks", self.tasks,
                  f"all (every task column of labels.csv) or a list of its column names, "
                  f"e.g. [{self.tasks}]")
            return
        check(len(self.tasks) >= 1, f"{path}.tasks", self.tasks,
              "all, or a non-empty list of labels.csv's column names")
        check(len(set(self.tasks)) == len(self.tasks), f"{path}.tasks", self.tasks,
              "each column named once")
        check(not {"image", "split"} & set(self.tasks), f"{path}.tasks", self.tasks,
              "task columns of labels.csv (image and split are its reserved columns, not tasks)")


@dataclass
class ModelConfig:
    backbone: Literal["resnet18", "resnet34", "resnet50"] = "resnet18"
    residual: bool = True
    """False builds the plain variant: the same blocks without skip connections."""
    stem: Literal["imagenet", "small"] = "imagenet"
    """imagenet: 7x7 stride-2 conv and max-pool; small: 3x3 stride-1 conv, no pool (for small images)."""
    width: float = 1.0
    """Multiplier of every stage's channel count (64, 128, 256, 512 at 1.0)."""
    weights: str | None = None
    """Local file of ImageNet weights (a torchvision state dict); nothing is downloaded."""
    decoder_hidden: list[int] = field(default_factory=lambda: [256])
    """Hidden sizes of the decoder MLP; the last one is the readout dimension D."""
    channels_last: bool = False

    def validate(self, path: str):
        check(self.width > 0 and round(64 * self.width) >= 1, f"{path}.width", self.width,
              "a positive multiplier with 64 * width >= 1")
        check(len(self.decoder_hidden) >= 1 and all(h >= 1 for h in self.decoder_hidden),
              f"{path}.decoder_hidden", self.decoder_hidden, "a non-empty list of positive sizes")
        if self.weights is not None:
            check(self.width == 1.0, f"{path}.width", self.width,
                  "1.0 when model.weights loads ImageNet weights (their shapes fix the width)")


@dataclass
class ReadoutConfig:
    """How the stochastic kind turns unit-modulator covariances into readout gains (docs/method.md)."""

    estimator: Literal["covariance", "correlation"] = "covariance"
    rectifier: Literal["relu", "softplus"] = "relu"
    gradient: Literal["none", "covariance"] = "none"
    """none: the label pass runs without autograd (the predecessor model's choice); covariance: the
    gradient also reaches the couplings through the batch covariance."""
    mix: float = 1.0
    """lam in a = (1 - lam) + lam * a_hat: 1 uses the raw gain, 0 switches the readout off."""
    running: Literal["capped_mean", "ema", "mean"] = "capped_mean"
    """Running estimate kept per task: capped_mean a <- (a * tau + a_batch) / (tau + 1) with tau growing
    by one per batch up to ``window`` (the predecessor model's rule), exponential (``momentum``), or the
    cumulative mean."""
    window: int = 100
    """Largest weight tau of the running estimate under capped_mean."""
    momentum: float = 0.9
    decision: Literal["batch", "running"] = "running"
    """Gain used in training decisions: the running estimate (after this batch's update), or this
    batch's own gain."""
    warmup_steps: int = 0
    """Pretraining steps during which the decoder learns with readout gain 1."""
    draws: int = 1
    """Modulator draws per image for the covariance (more draws, less noise, more compute)."""
    shuffle: bool = False
    """A control for the readout's selection of units: apply each task's readout gain with its units
    permuted (a fixed permutation per task, drawn from the seed): the same values, no selection."""

    def validate(self, path: str):
        check(0.0 <= self.mix <= 1.0, f"{path}.mix", self.mix, "a number in [0, 1]")
        check(self.window >= 1, f"{path}.window", self.window, "an integer >= 1")
        check(0.0 <= self.momentum < 1.0, f"{path}.momentum", self.momentum, "a number in [0, 1)")
        check(self.warmup_steps >= 0, f"{path}.warmup_steps", self.warmup_steps, "an integer >= 0")
        check(self.draws >= 1, f"{path}.draws", self.draws, "an integer >= 1")


@dataclass
class ModulationConfig:
    kind: Literal[KINDS] = "stochastic"
    """The mechanism: a name of :data:`comod.names.KINDS` (:data:`comod.mechanisms.MECHANISMS` holds its class)."""
    sites: list[str] = field(default_factory=lambda: ["layer3"])
    """Where gains act: backbone stages stem, layer1 .. layer4 (per channel), the pooled backbone output
    pool and the decoder's hidden layers decoder1 .. decoderN (per unit)."""
    modulator_mean: float = 1.0
    """mu, the modulator's mean (both kinds): the mean gain is exp(mu c), the attention gain; 0 leaves
    the mean gain at 1, so the fluctuation only labels units."""
    noise_scale: float = 0.1
    """sigma, the standard deviation of the shared modulator (stochastic kind)."""
    gain_form: Literal["exp", "one_plus"] = "exp"
    """Deterministic gain: exp(mu c), the stochastic gain's mean, or 1 + mu c."""
    coupling: Literal["softplus", "square"] = "softplus"
    """Map from the controller's free parameters to non-negative couplings c."""
    coupling_init: float = 0.5
    """Initial coupling of every unit (both kinds start from the same couplings)."""
    readout: ReadoutConfig = field(default_factory=ReadoutConfig)

    def validate(self, path: str):
        check(self.noise_scale >= 0.0, f"{path}.noise_scale", self.noise_scale, "a number >= 0")
        check(math.isfinite(self.modulator_mean) and self.modulator_mean >= 0.0, f"{path}.modulator_mean",
              self.modulator_mean, "a number >= 0 (couplings are non-negative: a negative mean would make "
              "the gain suppress the task's units)")
        check(len(self.sites) >= 1, f"{path}.sites", self.sites, "at least one site")
        check(len(set(self.sites)) == len(self.sites), f"{path}.sites", self.sites, "distinct sites")
        for site in self.sites:
            check(is_site_name(site), f"{path}.sites", site, f"one of {SITE_CHOICES}")
        check(self.coupling_init > 0.0, f"{path}.coupling_init", self.coupling_init,
              "a number > 0 (at 0 the coupling map has no gradient)")


@dataclass
class LearningRates:
    backbone: float = 1e-3
    decoder: float = 1e-3
    heads: float = 1e-3
    controller: float = 1e-2

    def validate(self, path: str):
        for group in GROUPS:
            value = getattr(self, group)
            check(value > 0, f"{path}.{group}", value, "a positive learning rate")


@dataclass
class PhaseConfig:
    """One training phase (pretraining or task-adaptation fine-tuning)."""

    epochs: int = 1
    steps_per_epoch: int | None = None
    """Steps counted as one epoch (one task per step); null: one pass over the training images."""
    batch_size: int = 128
    lr: LearningRates = field(default_factory=LearningRates)
    lr_schedule: Literal["constant", "cosine"] = "constant"
    """constant, or cosine: every group's rate decays from ``lr`` to 0 over the phase's steps (half a cosine),
    so the phase ends converged on its budget instead of wherever a constant rate leaves it."""
    weight_decay: float = 0.0
    trainable: list[str] = field(default_factory=lambda: list(GROUPS))
    tasks: list[str] = field(default_factory=list)
    """Tasks trained in this phase (names of the task set); empty: all."""

    def validate(self, path: str):
        check(self.epochs >= 0, f"{path}.epochs", self.epochs, "an integer >= 0")
        check(self.steps_per_epoch is None or self.steps_per_epoch >= 1, f"{path}.steps_per_epoch",
              self.steps_per_epoch, "a positive integer or null")
        check(self.batch_size >= 2, f"{path}.batch_size", self.batch_size,
              "an integer >= 2 (the readout covariance needs several samples)")
        check(self.weight_decay >= 0, f"{path}.weight_decay", self.weight_decay, "a number >= 0")
        for group in self.trainable:
            check(group in GROUPS, f"{path}.trainable", group, f"one of {', '.join(GROUPS)}")


PRETRAIN_KINDS = ("same", "none", "deterministic")


@dataclass
class PretrainConfig(PhaseConfig):
    """Pretraining: the whole network on all tasks."""

    modulation_kind: Literal[PRETRAIN_KINDS] = "none"
    """The mechanism active in pretraining. same: each kind pretrains with its own (the paper's pipeline,
    where a kind difference mixes pretraining with adaptation); none: one network pretrained without
    modulation; deterministic: the network and its couplings pretrained with the attention gain. With none
    or deterministic every kind of the same seed, data and model fine-tunes from the same pretrained file
    (docs/method.md, "Pretraining designs")."""


@dataclass
class FinetuneConfig(PhaseConfig):
    """Task-adaptation fine-tuning: only the controller (couplings) by default."""

    trainable: list[str] = field(default_factory=lambda: ["controller"])
    readout_reset: bool = True
    """Restart each fine-tuned task's readout estimate when fine-tuning starts (gain at ones, weight at
    one), as the predecessor model does; false carries pretraining's estimate over."""
    eval_interval_steps: int | None = None
    """Validate every this many fine-tuning steps, for learning curves (null: at epoch ends only)."""
    samples_per_task: int | None = None
    """K: fine-tune on K labelled training images per task (class-stratified, seeded by
    data.split_seed); validation and test are unchanged. null: every training image."""

    def validate(self, path: str):
        super().validate(path)
        check(self.eval_interval_steps is None or self.eval_interval_steps >= 1, f"{path}.eval_interval_steps",
              self.eval_interval_steps, "a positive integer or null")
        check(self.samples_per_task is None or self.samples_per_task >= 2, f"{path}.samples_per_task",
              self.samples_per_task, "an integer >= 2 (a binary task needs one image of each class), or null")


@dataclass
class EvalConfig:
    batch_size: int = 512
    select_metric: str = "mean_f1"
    """Validation metric (higher is better) that picks the fine-tuning epoch kept for testing."""
    ece_bins: int = 15

    def validate(self, path: str):
        from comod.metric_names import SELECTABLE

        check(self.batch_size >= 1, f"{path}.batch_size", self.batch_size, "a positive integer")
        check(self.select_metric in SELECTABLE, f"{path}.select_metric", self.select_metric,
              f"one of {', '.join(SELECTABLE)}")
        check(self.ece_bins >= 1, f"{path}.ece_bins", self.ece_bins, "a positive integer")


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    seed: int = 0
    device: str = "auto"
    """auto (CUDA when present, else CPU), cpu, cuda or cuda:N."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """bf16 runs forward passes under autocast; the readout statistics stay in fp32."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    modulation: ModulationConfig = field(default_factory=ModulationConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self, path: str):
        check(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
              "device", self.device, "auto, cpu, cuda or cuda:N")
        warmup = self.modulation.readout.warmup_steps
        check(warmup == 0 or self.pretrain.modulation_kind == "same", "modulation.readout.warmup_steps", warmup,
              "0 unless pretrain.modulation_kind is same (the warm-up counts the stochastic kind's "
              "pretraining steps; a shared pretraining has none)")
        depth = len(self.model.decoder_hidden)
        for site in self.modulation.sites:
            layer = decoder_layer(site)
            check(layer is None or layer <= depth, "modulation.sites", site,
                  f"decoder1 .. decoder{depth}: model.decoder_hidden has {depth} hidden layer(s)")


PRETRAIN_MODULATION = {"none": (), "deterministic": ("sites", "modulator_mean", "gain_form", "coupling",
                                                       "coupling_init")}
"""Settings of ``modulation`` that a shared pretraining (``pretrain.modulation_kind`` none or deterministic)
takes from the experiment; the others keep their defaults, so that kinds differing in them share it."""


def pretraining_modulation(cfg: ExperimentConfig) -> ModulationConfig:
    """The mechanism active in ``cfg``'s pretraining: the experiment's own when
    ``pretrain.modulation_kind`` is same, else the shared pretraining's (the kind and the settings of
    :data:`PRETRAIN_MODULATION`; the sites kept for none too, where they only place the cut)."""
    kind = cfg.pretrain.modulation_kind
    if kind == "same":
        return cfg.modulation
    kept = {"sites": cfg.modulation.sites, **{k: getattr(cfg.modulation, k) for k in PRETRAIN_MODULATION[kind]}}
    return ModulationConfig(kind=kind, **copy.deepcopy(kept))


def parse_config(raw: Any, source: str = "config") -> ExperimentConfig:
    """Build and validate an :class:`ExperimentConfig` from plain data."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of settings at the top level, "
                          f"got {type(raw).__name__}")
    return from_dict(ExperimentConfig, raw, "")


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Load an experiment from YAML, apply ``path=value`` overrides, validate."""
    raw = read_yaml(path)
    raw = apply_overrides(raw, overrides or [])
    return parse_config(raw, str(path))


def read_yaml(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file; pass the path of a YAML file "
                          f"(examples are in configs/)")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(f"{path}: malformed YAML{where}: {problem}; fix the file's syntax") from None


def apply_overrides(raw: Any, overrides: list[str]) -> dict:
    """Apply ``dotted.path=value`` settings (values parsed as YAML)."""
    raw = copy.deepcopy(raw) if raw is not None else {}
    if not isinstance(raw, dict):
        raise ConfigError(f"expected a mapping of settings at the top level, got {type(raw).__name__}")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected path=value, e.g. modulation.noise_scale=0.3")
        key, text = item.split("=", 1)
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        set_path(raw, key.strip(), value)
    return raw


def set_path(raw: dict, dotted: str, value: Any) -> None:
    """Set ``raw[a][b][c] = value`` for ``dotted == "a.b.c"``, creating mappings."""
    parts = dotted.split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(parts[:i + 1])}: is a value ({child!r}), "
                              f"so {dotted} cannot be set inside it")
        node = child
    node[parts[-1]] = value


def config_to_dict(cfg: ExperimentConfig) -> dict:
    return to_dict(cfg)


def flatten(cfg: ExperimentConfig | dict, prefix: str = "") -> dict[str, Any]:
    """The config as ``{dotted.path: value}`` (lists kept as lists)."""
    raw = to_dict(cfg) if dataclasses.is_dataclass(cfg) else cfg
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def save_config(cfg: ExperimentConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


__all__ = [
    "GROUPS", "ConfigError", "DataConfig", "ModelConfig", "ReadoutConfig", "ModulationConfig",
    "LearningRates", "PhaseConfig", "PRETRAIN_KINDS", "PretrainConfig", "PRETRAIN_MODULATION",
    "pretraining_modulation", "FinetuneConfig", "EvalConfig", "ExperimentConfig", "parse_config", "load_config",
    "read_yaml", "apply_overrides", "set_path", "config_to_dict", "flatten", "save_config",
]
