"""The checkpoint a run writes after every epoch, typed in one place.

``checkpoint.pt`` is a plain dict of tensors, numbers, strings, lists and
dicts, so that it loads with ``torch.load(..., weights_only=True)``;
:class:`Checkpoint` names every key (torchvision's references: a checkpoint
keeps the arguments that made it). An entry of the pretraining cache
(:mod:`comod.pretrain_cache`) is the smaller :class:`PretrainedModel`: what a
fine-tuning run starts from. :mod:`comod.train` writes both and reads them
back with :func:`comod.train.load_checkpoint`.

:data:`FORMAT` is written into every checkpoint. Raise it when a key changes
meaning, and keep reading the formats before it; a key added later is
``NotRequired``, since checkpoints written before it lack it.
"""
# no ``from __future__ import annotations``: a TypedDict tells its NotRequired keys only from evaluated
# annotations
from typing import Any, NotRequired, TypedDict

import torch
from torch import Tensor

CHECKPOINT = "checkpoint.pt"
"""The checkpoint's file name in a run's folder."""

FORMAT = 1

StateDict = dict[str, Tensor]


class RngState(TypedDict):
    """Every random state a run draws from, so a resumed run draws what the uninterrupted one would."""

    torch: Tensor
    """The CPU generator's state (``torch.get_rng_state``): the stochastic kind's modulator."""
    sampler: Tensor
    """The batch sampler's own generator (which task, which images)."""
    cuda: NotRequired[list[Tensor]]
    """Every CUDA device's state, when CUDA is available."""


class Best(TypedDict):
    """The fine-tuning epoch selection keeps (epoch 0: the pretrained model)."""

    score: float
    """``eval.select_metric`` on validation."""
    epoch: int
    model: StateDict


class Checkpoint(TypedDict):
    format: int
    """:data:`FORMAT` of the code that wrote it."""
    config: dict[str, Any]
    """The experiment config as plain data (:func:`comod.config.config_to_dict`); a run resumes only from
    a checkpoint of the same config."""
    phase_index: int
    """The phase in progress: 0 pretraining, 1 fine-tuning (:data:`comod.train.PHASES`)."""
    epochs_done: int
    """Epochs of that phase done."""
    step: int
    """Optimisation steps done, over both phases."""
    model: StateDict
    """The model's weights and buffers, on the CPU (the names of :class:`comod.model.MultiTaskModel`)."""
    optimizer: dict[str, Any] | None
    """The phase's optimiser state; None between the phases and at the end."""
    rng: RngState
    history: list[dict[str, Any]]
    """One entry per epoch (``phase``: pretrain or finetune), the pretrained model's test metrics
    (``pretrained``) and fine-tuning's validation points between epoch ends (``curve``)."""
    best: Best | None
    """The selected fine-tuning model so far; None before fine-tuning and in the final checkpoint (the
    model is the selected one then)."""
    metrics: dict[str, float] | None
    """The final metrics, once the run has finished; None before."""
    task_names: NotRequired[list[str]]
    """The task set's names, in the order of the model's heads (lacking in the earliest checkpoints)."""


class PretrainedModel(TypedDict):
    """An entry of the pretraining cache: the model after pretraining and how it got there."""

    model: StateDict
    step: int
    history: list[dict[str, Any]]
    rng: RngState


def rng_state(gen: torch.Generator) -> RngState:
    state: RngState = {"torch": torch.get_rng_state(), "sampler": gen.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: RngState, gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    gen.set_state(state["sampler"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def cpu_state(model: torch.nn.Module) -> StateDict:
    """A copy of ``model``'s state dict on the CPU (the checkpoint keeps no tensor on a device)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
