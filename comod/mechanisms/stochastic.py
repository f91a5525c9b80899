"""Stochastic comodulation (Boeshertz, Haimerl & Savin 2023; docs/method.md).

The modulator ``m = mu + sigma * eps`` (``eps ~ N(0, 1)``, one per sample,
shared by all channels and sites) drives the gain
``g_k(m) = exp(m c_k - sigma^2 c_k^2 / 2)``, whose mean over ``eps`` is
``exp(mu c_k)``: the deterministic kind's attention gain. Training step on
a batch of task ``k``:

1. unperturbed pass ``z0 = f_post(h * exp(mu c_k))``: the decision and the
   loss read it, so the couplings learn through it as in the deterministic kind;
2. label pass ``z~ = f_post(h * g_k(m))`` (without autograd by default);
3. readout gain ``a = rect(cov(z~, m))`` normalised to mean one, blended into a
   per-task running estimate ``a_k`` (a buffer);
4. decision ``head_k(z0 * a_k)``.

Evaluation draws no noise: ``head_k(f_post(h * exp(mu c_k)) * a_k)``. The
stochastic kind is the deterministic kind plus this modulator-guided
readout, with no parameter beyond the shared controller. ``mu = 0`` (mean
gain one, decision on an ungained pass) with ``gradient: covariance``,
``running: ema`` and ``decision: batch`` is this project's earlier reading.
"""
from __future__ import annotations

import contextlib

import torch

from comod.mechanisms.base import Mechanism
from comod.mechanisms.controller import Controller
from comod.mechanisms.readout import RUNNING_RULES, blend_running, mix_with_ones, readout_gain

GRADIENTS = ("none", "covariance")
DECISIONS = ("batch", "running")


def lognormal_gain(c: torch.Tensor, m: torch.Tensor, noise_scale: float) -> torch.Tensor:
    """``exp(m c - sigma^2 c^2 / 2)`` for couplings ``c [C]`` and modulator ``m [N]`` (``[N, C]``);
    its mean over ``m ~ N(mu, sigma^2)`` is exactly ``exp(mu c)``."""
    return torch.exp(m[:, None] * c[None, :] - 0.5 * noise_scale ** 2 * c[None, :] ** 2)


class StochasticComodulation(Mechanism):
    kind = "stochastic"

    def __init__(self, num_tasks, site_channels, decoder_dim, noise_scale: float = 0.1,
                 modulator_mean: float = 1.0, coupling: str = "softplus", coupling_init: float = 0.5,
                 estimator: str = "covariance", rectifier: str = "relu", gradient: str = "none", mix: float = 1.0,
                 running: str = "capped_mean", window: int = 100, momentum: float = 0.9,
                 decision: str = "running", warmup_steps: int = 0, draws: int = 1, shuffle: bool = False):
        super().__init__(num_tasks, site_channels, decoder_dim)
        for name, value, allowed in (("running estimate", running, RUNNING_RULES),
                                     ("decision gain", decision, DECISIONS), ("readout gradient", gradient, GRADIENTS)):
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(allowed)}")
        self.controller = Controller(num_tasks, site_channels, coupling, coupling_init)
        self.noise_scale, self.modulator_mean = noise_scale, modulator_mean
        self.estimator, self.rectifier, self.gradient, self.mix = estimator, rectifier, gradient, mix
        self.running, self.window, self.momentum, self.decision = running, window, momentum, decision
        self.warmup_steps, self.draws, self.shuffle = warmup_steps, draws, shuffle
        if shuffle:  # the control: each task's gain on permuted units, drawn from the run's seed by a
            # generator of its own, so the network's initial weights stay those of the unshuffled kind
            gen = torch.Generator().manual_seed(torch.initial_seed())
            self.register_buffer("readout_permutation",
                                 torch.stack([torch.randperm(decoder_dim, generator=gen) for _ in range(num_tasks)]))
        self.register_buffer("running_gain", torch.ones(num_tasks, decoder_dim))
        self.register_buffer("running_count", torch.zeros(num_tasks, dtype=torch.long))
        self.register_buffer("train_steps", torch.zeros((), dtype=torch.long))

    @classmethod
    def from_config(cls, cfg, num_tasks, site_channels, decoder_dim):
        r = cfg.readout
        return cls(num_tasks, site_channels, decoder_dim, noise_scale=cfg.noise_scale,
                   modulator_mean=cfg.modulator_mean, coupling=cfg.coupling, coupling_init=cfg.coupling_init,
                   estimator=r.estimator, rectifier=r.rectifier, gradient=r.gradient, mix=r.mix, running=r.running,
                   window=r.window, momentum=r.momentum, decision=r.decision, warmup_steps=r.warmup_steps,
                   draws=r.draws, shuffle=r.shuffle)

    # -- gains ------------------------------------------------------------
    def mean_gains(self, task: int) -> dict[str, torch.Tensor] | None:
        """``exp(mu c_k)`` per site; None at ``mu = 0`` (gain one: the pass runs ungained)."""
        if self.modulator_mean == 0.0:
            return None
        return {s: torch.exp(self.modulator_mean * c) for s, c in self.controller(task).items()}

    def modulated_gains(self, task: int, m: torch.Tensor) -> dict[str, torch.Tensor]:
        return {s: lognormal_gain(c, m, self.noise_scale) for s, c in self.controller(task).items()}

    def sample_gains(self, task, n):
        return self.modulated_gains(task, self.modulator_mean + torch.randn(n) * self.noise_scale)

    def expected_gain(self, task):
        return {s: torch.exp(self.modulator_mean * c) for s, c in self.controller(task).items()}

    # -- passes -----------------------------------------------------------
    def _in_warmup(self) -> bool:
        return int(self.train_steps) <= self.warmup_steps if self.warmup_steps else False

    def _placed(self, a: torch.Tensor, task: int) -> torch.Tensor:
        """A readout gain on the units it was estimated for, or on permuted ones (``shuffle``)."""
        return a[self.readout_permutation[task]] if self.shuffle else a

    def _eval_gain(self, z: torch.Tensor, task: int) -> torch.Tensor:
        if self._in_warmup():
            return z
        return z * self._placed(mix_with_ones(self.running_gain[task], self.mix), task).to(z.dtype)

    def forward_tasks(self, suffix, h0, tasks):
        if self.training or self.modulator_mean != 0.0:
            return super().forward_tasks(suffix, h0, tasks)
        z = suffix(h0, None)  # mean gain one: one ungained pass serves every task's readout
        return {k: self._eval_gain(z, k) for k in tasks}

    def forward(self, suffix, h0, task):
        if not self.training:
            return self._eval_gain(suffix(h0, self.mean_gains(task)), task)
        self.train_steps += 1
        h_rep = h0.repeat(self.draws, *([1] * (h0.dim() - 1))) if self.draws > 1 else h0
        m = self.modulator_mean + torch.randn(h_rep.shape[0], device=h0.device) * self.noise_scale
        label_grad = torch.no_grad() if self.gradient == "none" else contextlib.nullcontext()
        with label_grad:
            z_label = suffix(h_rep, self.modulated_gains(task, m), track_norm_stats=False)
            a_batch = readout_gain(z_label, m, self.estimator, self.rectifier)
        z = suffix(h0, self.mean_gains(task))
        self._update_running(task, a_batch.detach())
        if self._in_warmup():
            return z
        a = mix_with_ones(a_batch, self.mix)
        if self.decision == "running":
            # the running estimate's value, with this batch's gradient when the label pass carries one
            a = mix_with_ones(self.running_gain[task], self.mix) + (a - a.detach())
        return z * self._placed(a, task).to(z.dtype)

    @torch.no_grad()
    def reset_readout(self, tasks: list[int]) -> None:
        """Restart the running readout of ``tasks``: gain at ones, weighted as one batch."""
        self.running_gain[tasks] = 1.0
        self.running_count[tasks] = 0

    @torch.no_grad()
    def _update_running(self, task: int, a: torch.Tensor) -> None:
        self.running_gain[task] = blend_running(self.running_gain[task], self.running_count[task], a, self.running,
                                                self.momentum, self.window)
        self.running_count[task] += 1

    def readout_state(self):
        return {"running_gain": self.running_gain, "running_count": self.running_count}

    def extra_repr(self) -> str:
        return (f"noise_scale={self.noise_scale}, modulator_mean={self.modulator_mean}, "
                f"estimator={self.estimator}, rectifier={self.rectifier}, gradient={self.gradient}, "
                f"mix={self.mix}, running={self.running}, window={self.window}, decision={self.decision}, "
                f"warmup_steps={self.warmup_steps}, draws={self.draws}, shuffle={self.shuffle}")
