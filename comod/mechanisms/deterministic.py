"""Deterministic gain modulation ("attention"): task-relevant channels scaled up.

``h' = h * g_k`` with ``g_k = 1 + c_k`` or ``exp(c_k)`` per channel.
"""
from __future__ import annotations

import torch

from comod.mechanisms.base import Mechanism
from comod.mechanisms.controller import Controller


class DeterministicGain(Mechanism):
    kind = "deterministic"

    def __init__(self, num_tasks, site_channels, decoder_dim, gain_form: str = "one_plus",
                 coupling: str = "softplus", coupling_init: float = 0.5):
        super().__init__(num_tasks, site_channels, decoder_dim)
        if gain_form not in ("one_plus", "exp"):
            raise ValueError(f"unknown gain form {gain_form!r}; choose one_plus or exp")
        self.gain_form = gain_form
        self.controller = Controller(num_tasks, site_channels, coupling, coupling_init)

    def gains(self, task: int) -> dict[str, torch.Tensor]:
        couplings = self.controller(task)
        if self.gain_form == "exp":
            return {s: torch.exp(c) for s, c in couplings.items()}
        return {s: 1.0 + c for s, c in couplings.items()}

    def forward(self, suffix, h0, task):
        return suffix(h0, self.gains(task))

    def sample_gains(self, task, n):
        return {s: g.expand(n, -1) for s, g in self.gains(task).items()}

    def expected_gain(self, task):
        return self.gains(task)

    def extra_repr(self) -> str:
        return f"gain_form={self.gain_form}"
