"""The controller: task -> non-negative per-channel couplings at each site.

A ``T x C`` table of free parameters per site, passed through softplus or a
square so couplings stay non-negative. These are the only parameters that
task-adaptation fine-tuning trains by default, and the deterministic and
stochastic kinds share this one controller, so neither has extra parameters.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


COUPLINGS = ("softplus", "square")


def coupling_map(raw: torch.Tensor, coupling: str) -> torch.Tensor:
    """Couplings from the controller's free parameters ``raw``: ``softplus(raw)`` or ``raw ** 2``."""
    return F.softplus(raw) if coupling == "softplus" else raw * raw


def _inverse(coupling: str, value: float) -> float:
    if coupling == "softplus":
        return value + math.log(-math.expm1(-value))  # log(exp(v) - 1), stable for large v
    return math.sqrt(value)


class Controller(nn.Module):
    def __init__(self, num_tasks: int, site_channels: dict[str, int], coupling: str = "softplus",
                 init: float = 0.5):
        super().__init__()
        if coupling not in COUPLINGS:
            raise ValueError(f"unknown coupling map {coupling!r}; choose softplus or square")
        self.coupling = coupling
        raw = _inverse(coupling, init)
        self.table = nn.ParameterDict({
            site: nn.Parameter(torch.full((num_tasks, channels), raw)) for site, channels in site_channels.items()
        })

    def forward(self, task: int) -> dict[str, torch.Tensor]:
        """Couplings ``c_k`` of ``task``: ``{site: [C]}``, all >= 0."""
        return {site: coupling_map(raw[task], self.coupling) for site, raw in self.table.items()}

    def all_tasks(self) -> dict[str, torch.Tensor]:
        """Couplings of every task: ``{site: [T, C]}`` (for plots and reports)."""
        return {site: coupling_map(raw, self.coupling) for site, raw in self.table.items()}

    def extra_repr(self) -> str:
        shapes = ", ".join(f"{s}={tuple(p.shape)}" for s, p in self.table.items())
        return f"coupling={self.coupling}, {shapes}"
