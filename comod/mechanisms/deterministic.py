"""Deterministic gain modulation ("attention"): task-relevant channels scaled up.

``h' = h * g_k`` per channel, with ``g_k = exp(mu c_k)`` (the mean of the
stochastic kind's gain, so the two kinds share their mean gain) or
``1 + mu c_k``; ``mu`` is ``modulation.modulator_mean`` (docs/method.md).
"""
from __future__ import annotations

import torch

from comod.mechanisms.base import Mechanism
from comod.mechanisms.controller import Controller

GAIN_FORMS = ("exp", "one_plus")


def mean_gain(c: torch.Tensor, modulator_mean: float, gain_form: str = "exp") -> torch.Tensor:
    """The attention gain of couplings ``c``: ``exp(mu c)`` or ``1 + mu c``."""
    if gain_form == "exp":
        return torch.exp(modulator_mean * c)
    return 1.0 + modulator_mean * c


class DeterministicGain(Mechanism):
    kind = "deterministic"

    def __init__(self, num_tasks, site_channels, decoder_dim, gain_form: str = "exp", modulator_mean: float = 1.0,
                 coupling: str = "softplus", coupling_init: float = 0.5):
        super().__init__(num_tasks, site_channels, decoder_dim)
        if gain_form not in GAIN_FORMS:
            raise ValueError(f"unknown gain form {gain_form!r}; choose one of {', '.join(GAIN_FORMS)}")
        self.gain_form, self.modulator_mean = gain_form, modulator_mean
        self.controller = Controller(num_tasks, site_channels, coupling, coupling_init)

    @classmethod
    def from_config(cls, cfg, num_tasks, site_channels, decoder_dim):
        return cls(num_tasks, site_channels, decoder_dim, gain_form=cfg.gain_form,
                   modulator_mean=cfg.modulator_mean, coupling=cfg.coupling, coupling_init=cfg.coupling_init)

    def gains(self, task: int) -> dict[str, torch.Tensor]:
        return {s: mean_gain(c, self.modulator_mean, self.gain_form) for s, c in self.controller(task).items()}

    def forward(self, suffix, h0, task):
        return suffix(h0, self.gains(task))

    def sample_gains(self, task, n):
        return {s: g.expand(n, -1) for s, g in self.gains(task).items()}

    def expected_gain(self, task):
        return self.gains(task)

    def extra_repr(self) -> str:
        return f"gain_form={self.gain_form}, modulator_mean={self.modulator_mean}"
