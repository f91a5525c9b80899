"""Stochastic comodulation (Boeshertz, Haimerl & Savin 2023).

Training step, per batch of one task ``k``:
1. one modulator ``m_n ~ N(0, sigma^2)`` per sample, shared by all channels
   and sites; modulated pass with the log-normal, mean-one gain
   ``exp(m c_k - sigma^2 c_k^2 / 2)``;
2. readout gain ``a`` from the covariance of each decoder unit with ``m``;
3. clean pass (no modulation); the decision reads ``z * a``.
A running estimate of ``a`` per task is kept as a buffer; evaluation draws no
noise and uses it, so it is deterministic. No parameters beyond the
controller that the deterministic kind has too.
"""
from __future__ import annotations

import torch

from comod.mechanisms.base import Mechanism
from comod.mechanisms.controller import Controller
from comod.mechanisms.readout import mix_with_ones, readout_gain


def lognormal_gain(c: torch.Tensor, m: torch.Tensor, noise_scale: float) -> torch.Tensor:
    """``exp(m c - sigma^2 c^2 / 2)`` for couplings ``c [C]`` and modulator ``m [N]``
    (``[N, C]``); its mean over ``m ~ N(0, sigma^2)`` is exactly one."""
    return torch.exp(m[:, None] * c[None, :] - 0.5 * noise_scale ** 2 * c[None, :] ** 2)


class StochasticComodulation(Mechanism):
    kind = "stochastic"

    def __init__(self, num_tasks, site_channels, decoder_dim, noise_scale: float = 0.5,
                 coupling: str = "softplus", coupling_init: float = 0.5, estimator: str = "covariance",
                 rectifier: str = "relu", mix: float = 1.0, running: str = "ema", momentum: float = 0.9,
                 decision: str = "batch", warmup_steps: int = 0, draws: int = 1):
        super().__init__(num_tasks, site_channels, decoder_dim)
        if running not in ("ema", "mean"):
            raise ValueError(f"unknown running estimate {running!r}; choose ema or mean")
        if decision not in ("batch", "running"):
            raise ValueError(f"unknown decision gain {decision!r}; choose batch or running")
        self.controller = Controller(num_tasks, site_channels, coupling, coupling_init)
        self.noise_scale = noise_scale
        self.estimator, self.rectifier, self.mix = estimator, rectifier, mix
        self.running, self.momentum, self.decision = running, momentum, decision
        self.warmup_steps, self.draws = warmup_steps, draws
        self.register_buffer("running_gain", torch.ones(num_tasks, decoder_dim))
        self.register_buffer("running_count", torch.zeros(num_tasks, dtype=torch.long))
        self.register_buffer("train_steps", torch.zeros((), dtype=torch.long))

    def modulated_gains(self, task: int, m: torch.Tensor) -> dict[str, torch.Tensor]:
        return {s: lognormal_gain(c, m, self.noise_scale) for s, c in self.controller(task).items()}

    def _in_warmup(self) -> bool:
        return int(self.train_steps) <= self.warmup_steps if self.warmup_steps else False

    def _eval_gain(self, z: torch.Tensor, task: int) -> torch.Tensor:
        if self._in_warmup():
            return z
        return z * mix_with_ones(self.running_gain[task], self.mix).to(z.dtype)

    def forward_tasks(self, suffix, h0, tasks):
        if self.training:
            return super().forward_tasks(suffix, h0, tasks)
        z = suffix(h0, None)  # evaluation: one clean pass serves every task's readout
        return {k: self._eval_gain(z, k) for k in tasks}

    def forward(self, suffix, h0, task):
        if not self.training:
            return self._eval_gain(suffix(h0, None), task)
        self.train_steps += 1
        h_rep = h0.repeat(self.draws, *([1] * (h0.dim() - 1))) if self.draws > 1 else h0
        m = torch.randn(h_rep.shape[0], device=h0.device) * self.noise_scale
        z_mod = suffix(h_rep, self.modulated_gains(task, m))
        z = suffix(h0, None)
        a_batch = readout_gain(z_mod, m, self.estimator, self.rectifier)
        self._update_running(task, a_batch.detach())
        if self._in_warmup():
            return z
        a = mix_with_ones(a_batch, self.mix)
        if self.decision == "running":
            a = mix_with_ones(self.running_gain[task], self.mix) + (a - a.detach())
        return z * a.to(z.dtype)

    @torch.no_grad()
    def _update_running(self, task: int, a: torch.Tensor) -> None:
        count = self.running_count[task]
        if self.running == "ema":
            weight = torch.where(count == 0, 1.0, 1.0 - self.momentum)
        else:
            weight = 1.0 / (count + 1).float()
        self.running_gain[task] += weight * (a - self.running_gain[task])
        self.running_count[task] += 1

    def sample_gains(self, task, n):
        m = torch.randn(n) * self.noise_scale
        return self.modulated_gains(task, m)

    def expected_gain(self, task):
        return {s: torch.ones_like(c) for s, c in self.controller(task).items()}

    def readout_state(self):
        return {"running_gain": self.running_gain, "running_count": self.running_count}

    def extra_repr(self) -> str:
        return (f"noise_scale={self.noise_scale}, estimator={self.estimator}, rectifier={self.rectifier}, "
                f"mix={self.mix}, running={self.running}, decision={self.decision}, "
                f"warmup_steps={self.warmup_steps}, draws={self.draws}")
