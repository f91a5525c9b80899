"""The interface every gain-modulation mechanism implements.

A new kind is one file with a subclass (its ``kind`` name, ``from_config``,
``forward``, ``sample_gains``, ``expected_gain``), registered as the
:mod:`comod.mechanisms` docstring says. The contract suite
(tests/comod/test_mechanism_contract.py) runs every registered kind.

A mechanism turns the activity ``h0`` at the first modulation site into the
representation ``z`` that task ``k``'s head reads. It is given ``suffix``,
which runs the network from that site to the decoder's last hidden layer,
applying ``{site: gain}`` at every modulated site (gains of shape ``[C]`` or
``[B, C]``); ``suffix(h, gains, track_norm_stats=False)`` runs a pass that
leaves the batch-norm running statistics alone (a perturbed label pass). The
part of the network below the first site is computed once, by the model, and
shared by every pass a mechanism makes.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

Suffix = Callable[..., torch.Tensor]
"""``suffix(h, gains, track_norm_stats=True) -> z``: see the module's docstring."""


class Mechanism(nn.Module):
    kind: str = ""

    def __init__(self, num_tasks: int, site_channels: dict[str, int], decoder_dim: int):
        super().__init__()
        self.num_tasks = num_tasks
        self.site_channels = dict(site_channels)
        self.decoder_dim = decoder_dim
        self.controller: nn.Module | None = None

    @classmethod
    def from_config(cls, cfg, num_tasks: int, site_channels: dict[str, int], decoder_dim: int) -> "Mechanism":
        """The mechanism of a :class:`comod.config.ModulationConfig` (each kind reads its own settings)."""
        raise NotImplementedError

    def forward(self, suffix: Suffix, h0: torch.Tensor, task: int) -> torch.Tensor:
        raise NotImplementedError

    def forward_tasks(self, suffix: Suffix, h0: torch.Tensor, tasks: list[int]) -> dict[int, torch.Tensor]:
        """``z`` of several tasks on one batch; kinds whose passes do not depend on
        the task override this to share them."""
        return {k: self(suffix, h0, k) for k in tasks}

    def sample_gains(self, task: int, n: int) -> dict[str, torch.Tensor]:
        """``n`` draws of the per-channel gains the mechanism applies in training:
        ``{site: [n, C]}`` (draws differ only for a stochastic mechanism)."""
        raise NotImplementedError

    def expected_gain(self, task: int) -> dict[str, torch.Tensor]:
        """The mean gain per channel: ``{site: [C]}``."""
        raise NotImplementedError

    def readout_state(self) -> dict[str, torch.Tensor]:
        """Per-task readout gains used at evaluation (empty when the mechanism has none)."""
        return {}
