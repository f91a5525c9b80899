"""The multi-task model: shared backbone, decoder, task heads, one mechanism.

The network is a chain of named stages, each one a possible modulation site
(:func:`comod.names.site_names`): the backbone's ``stem`` .. ``layer4``, the
pooled features ``pool`` and the decoder's hidden layers ``decoder1`` ..
``decoderN``. ``forward(x, task)`` computes the stages up to the first site
once (``prefix``), then lets the mechanism run the rest (``suffix``) as many
times as it needs: once for none and deterministic, twice (label and
unperturbed) for stochastic comodulation. A frozen prefix runs without autograd.
What the mechanism learned per task (its couplings, its readout gains) is read
with :func:`task_gains`, from a model or from a checkpoint's state dict.
"""
from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from comod.backbones import Backbone
from comod.data.taskdata import TaskSpec
from comod.mechanisms import Mechanism, build_mechanism, coupling_map
from comod.names import BACKBONE_SITES, POOL_SITE, decoder_layer, site_names


def _check_sites(sites: list[str], decoder_depth: int) -> list[str]:
    valid = site_names(decoder_depth)
    unknown = [s for s in sites if s not in valid]
    if unknown:
        raise ValueError(f"unknown modulation site {unknown[0]!r}; valid sites: {', '.join(valid)}")
    return sorted(sites, key=valid.index)


class Decoder(nn.Sequential):
    """MLP from pooled backbone features to the readout layer ``z`` (ReLU after every layer)."""

    def __init__(self, in_features: int, hidden: list[int]):
        layers: list[nn.Module] = []
        for width in hidden:
            layers += [nn.Linear(in_features, width), nn.ReLU(inplace=True)]
            in_features = width
        super().__init__(*layers)
        self.out_features = in_features
        self.widths = list(hidden)

    def forward_layer(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Hidden layer ``index`` (1-based) with its ReLU."""
        return self[2 * index - 1](self[2 * index - 2](x))


class MultiTaskModel(nn.Module):
    def __init__(self, backbone: Backbone, decoder_hidden: list[int], tasks: list[TaskSpec],
                 sites: list[str], mechanism: Mechanism):
        super().__init__()
        self.backbone = backbone
        self.decoder = Decoder(backbone.out_features, decoder_hidden)
        self.heads = nn.ModuleList(nn.Linear(self.decoder.out_features, t.num_outputs) for t in tasks)
        self.tasks = list(tasks)
        self.stage_names = site_names(len(decoder_hidden))
        self.sites = _check_sites(sites, len(decoder_hidden))
        self.mechanism = mechanism
        first = self.stage_names.index(self.sites[0])
        self.prefix_stages = list(self.stage_names[:first + 1])
        self.suffix_stages = list(self.stage_names[first + 1:])
        self.pool = nn.AdaptiveAvgPool2d(1)

    # -- the stages -----------------------------------------------------
    def forward_stage(self, name: str, x: torch.Tensor) -> torch.Tensor:
        if name in BACKBONE_SITES:
            return self.backbone.forward_stage(name, x)
        if name == POOL_SITE:
            return torch.flatten(self.pool(x), 1)
        return self.decoder.forward_layer(decoder_layer(name), x)

    def _stage_parameters(self, name: str):
        if name in BACKBONE_SITES:
            return self.backbone.stages[name].parameters()
        if name == POOL_SITE:
            return iter(())
        return self.decoder[2 * decoder_layer(name) - 2].parameters()

    def prefix(self, x: torch.Tensor) -> torch.Tensor:
        """Activity at the first site, before its gain."""
        frozen = not any(p.requires_grad for name in self.prefix_stages for p in self._stage_parameters(name))
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            for name in self.prefix_stages:
                x = self.forward_stage(name, x)
        return x

    def suffix(self, h: torch.Tensor, gains: dict[str, torch.Tensor] | None,
               track_norm_stats: bool = True) -> torch.Tensor:
        """From the first site's activity to the decoder's last hidden layer ``z [B, D]``.
        ``track_norm_stats=False`` (the stochastic kind's label pass) normalises with the batch's
        statistics as usual in training but leaves every running statistic as it was."""
        with contextlib.nullcontext() if track_norm_stats else self._norm_stats_kept():
            h = self._gain(h, self.sites[0], gains)
            for name in self.suffix_stages:
                h = self._gain(self.forward_stage(name, h), name, gains)
        return h

    @contextlib.contextmanager
    def _norm_stats_kept(self):
        """Run with copies of the suffix's batch-norm running statistics, then put the originals back (a
        perturbed pass must not move them: it would be a second update per step, growing with the noise).
        Copies, not a restore in place: the pass's autograd graph may hold the tensors it updated."""
        names = ("running_mean", "running_var", "num_batches_tracked")
        norms = [m for name in self.suffix_stages if name in BACKBONE_SITES
                 for m in self.backbone.stages[name].modules()
                 if isinstance(m, nn.BatchNorm2d) and m.track_running_stats and m.training]
        kept = [{n: getattr(m, n) for n in names} for m in norms]
        for m, originals in zip(norms, kept):
            for n, tensor in originals.items():
                setattr(m, n, tensor.clone())
        try:
            yield
        finally:
            for m, originals in zip(norms, kept):
                for n, tensor in originals.items():
                    setattr(m, n, tensor)

    @staticmethod
    def _gain(h: torch.Tensor, site: str, gains: dict[str, torch.Tensor] | None) -> torch.Tensor:
        if not gains or site not in gains:
            return h
        g = gains[site]
        g = g[None] if g.dim() == 1 else g
        return h * g.view(*g.shape, *([1] * (h.dim() - 2))).to(h.dtype)  # per channel or per unit

    # -- decisions ------------------------------------------------------
    def forward(self, x: torch.Tensor, task: int) -> torch.Tensor:
        """Logits of ``task`` for batch ``x``: ``[B]`` for a binary task, ``[B, K]`` otherwise."""
        z = self.mechanism(self.suffix, self.prefix(x), task)
        return self._head(z, task)

    def forward_tasks(self, x: torch.Tensor, tasks: list[int]) -> dict[int, torch.Tensor]:
        """Logits of several tasks on one batch, sharing the prefix (and whatever
        passes the mechanism can share between tasks)."""
        z = self.mechanism.forward_tasks(self.suffix, self.prefix(x), tasks)
        return {k: self._head(z[k], k) for k in tasks}

    def _head(self, z: torch.Tensor, task: int) -> torch.Tensor:
        out = self.heads[task](z)
        return out.squeeze(-1) if self.tasks[task].binary else out

    # -- parameter groups -----------------------------------------------
    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        controller = self.mechanism.controller
        return {
            "backbone": list(self.backbone.parameters()),
            "decoder": list(self.decoder.parameters()),
            "heads": list(self.heads.parameters()),
            "controller": list(controller.parameters()) if controller is not None else [],
        }

    def group_modules(self) -> dict[str, list[nn.Module]]:
        return {"backbone": [self.backbone], "decoder": [self.decoder], "heads": [self.heads],
                "controller": [self.mechanism]}

    def set_trainable(self, groups: list[str]) -> None:
        """Open ``groups`` to training; frozen groups also stop updating their
        batch-norm statistics (they are put in eval mode by :meth:`train`)."""
        self._trainable = set(groups)
        for name, params in self.parameter_groups().items():
            for p in params:
                p.requires_grad_(name in self._trainable)

    def train(self, mode: bool = True):
        super().train(mode)
        trainable = getattr(self, "_trainable", None)
        if mode and trainable is not None:
            for name, modules in self.group_modules().items():
                if name not in trainable and name != "controller":
                    for m in modules:
                        m.eval()
        return self


def site_width(backbone: Backbone, decoder_hidden: list[int], site: str) -> int:
    """Channels (backbone stages) or units (pool, decoder layers) a site's gain acts on."""
    if site in BACKBONE_SITES:
        return backbone.channels[site]
    if site == POOL_SITE:
        return backbone.out_features
    return decoder_hidden[decoder_layer(site) - 1]


def build_model(cfg, tasks: list[TaskSpec], in_channels: int) -> MultiTaskModel:
    """The model of an :class:`comod.config.ExperimentConfig` for ``tasks``."""
    m = cfg.model
    backbone = Backbone(m.backbone, residual=m.residual, stem=m.stem, width=m.width, in_channels=in_channels)
    if m.weights:
        backbone.load_imagenet(m.weights)
    sites = _check_sites(cfg.modulation.sites, len(m.decoder_hidden))
    mechanism = build_mechanism(cfg.modulation, len(tasks), {s: site_width(backbone, m.decoder_hidden, s)
                                                             for s in sites}, m.decoder_hidden[-1])
    model = MultiTaskModel(backbone, m.decoder_hidden, tasks, sites, mechanism)
    if m.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def load_pretrained(model: MultiTaskModel, state: Mapping[str, torch.Tensor]) -> None:
    """Start ``model`` from a pretrained state dict of another kind (a shared pretraining): the backbone,
    decoder and heads always, the couplings where both kinds have them. What only ``model``'s kind has
    (couplings after a pretraining without modulation, the stochastic kind's readout) keeps its
    initial value; what only the pretrained kind had (couplings, for the none kind) is left out."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    shared = [k for k in (*missing, *unexpected) if not k.startswith("mechanism.")]
    assert not shared, f"pretrained state does not fit the model outside its mechanism: {shared[:5]}"


COUPLING_TABLE = "mechanism.controller.table."
"""State-dict prefix of the controller's free parameters, one ``[T, C]`` table per site
(``MultiTaskModel.mechanism.controller.table``)."""
READOUT_GAIN = "mechanism.running_gain"
"""State-dict key of the stochastic kind's running readout gains, ``[T, D]``."""


@dataclass
class TaskGains:
    """What a model's mechanism learned, per task, as float32 tensors on the CPU."""

    couplings: dict[str, torch.Tensor]
    """``{site: [T, C]}``: the couplings ``c_k`` of every task at each site (empty for the none kind)."""
    readout: torch.Tensor | None
    """``[T, D]``: the running readout gain of every task over the decoder's units (stochastic kind only)."""


def task_gains(source: MultiTaskModel | Mapping[str, torch.Tensor], coupling: str | None = None) -> TaskGains:
    """The couplings and readout gains per task of a model, or of its state dict (a checkpoint's
    ``model``); a state dict holds the controller's free parameters, so it needs ``coupling``, the map
    that made couplings of them (the config's ``modulation.coupling``)."""
    if isinstance(source, MultiTaskModel):
        controller = source.mechanism.controller
        coupling = controller.coupling if controller is not None else coupling
        source = source.state_dict()
    tables = {key[len(COUPLING_TABLE):]: raw for key, raw in source.items() if key.startswith(COUPLING_TABLE)}
    if tables and coupling is None:
        raise ValueError("task_gains: a state dict's couplings need their coupling map; pass coupling= "
                         "(the config's modulation.coupling: softplus or square)")
    couplings = {site: coupling_map(raw.detach().float().cpu(), coupling) for site, raw in tables.items()}
    readout = source.get(READOUT_GAIN)
    return TaskGains(couplings, readout.detach().float().cpu() if readout is not None else None)
