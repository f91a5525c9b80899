"""Modulator-guided readout: which decoder units co-vary with the modulator.

Units fed by modulated (task-relevant) channels inherit the modulator's
fluctuations, so their covariance with it labels task relevance
(Haimerl et al., Nat. Commun. 2023; Boeshertz, Haimerl & Savin 2023).
The gain is the rectified covariance, normalised to mean one over units.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-12


def readout_gain(z_mod: torch.Tensor, m: torch.Tensor, estimator: str = "covariance",
                 rectifier: str = "relu") -> torch.Tensor:
    """Readout gain ``a`` of shape ``[D]`` from ``z_mod [N, D]`` and modulator ``m [N]``.

    ``a_d = rect(s_d) / mean_d rect(s_d)`` with ``s`` the covariance (or
    correlation) of unit ``d`` with ``m`` over the batch, scaled by its mean
    magnitude so that softplus sees the same range whatever the activity's
    scale (relu is scale-free anyway). All ones when every ``rect(s_d)`` is 0.
    Differentiable in ``z_mod`` (``readout.gradient: covariance`` lets gradients reach the couplings
    through it; by default the label pass runs without autograd).
    """
    z = z_mod.float()
    m = m.float()
    zc = z - z.mean(0, keepdim=True)
    mc = m - m.mean()
    s = (zc * mc[:, None]).mean(0)
    if estimator == "correlation":
        s = s / (zc.pow(2).mean(0).sqrt() * mc.pow(2).mean().sqrt() + EPS)
    elif estimator != "covariance":
        raise ValueError(f"unknown readout estimator {estimator!r}; choose covariance or correlation")
    s = s / (s.abs().mean() + EPS)
    if rectifier == "relu":
        r = F.relu(s)
    elif rectifier == "softplus":
        r = F.softplus(s)
    else:
        raise ValueError(f"unknown readout rectifier {rectifier!r}; choose relu or softplus")
    total = r.mean()
    # torch.where instead of a Python branch: no host sync in the training step
    return torch.where(total > 0, r / total.clamp_min(EPS), torch.ones_like(r))


def mix_with_ones(a: torch.Tensor, lam: float) -> torch.Tensor:
    """``(1 - lam) + lam * a``: a readout gain that keeps part of every unit."""
    return a if lam == 1.0 else (1.0 - lam) + lam * a


RUNNING_RULES = ("capped_mean", "ema", "mean")


def blend_running(running: torch.Tensor, count: torch.Tensor, a: torch.Tensor, rule: str = "capped_mean",
                  momentum: float = 0.9, window: int = 100) -> torch.Tensor:
    """The running readout gain after one more batch gain ``a`` (``running`` has seen ``count`` batches).

    - ``capped_mean``: ``(running * tau + a) / (tau + 1)`` with ``tau = min(count + 1, window)``, then
      renormalised to mean one. The estimate starts at ones, weighted as one batch, so the first batch
      moves it half way; later batches weigh ``1 / (tau + 1)``, never less than ``1 / (window + 1)``.
    - ``ema``: the first batch replaces the ones, later ones move it by ``1 - momentum``.
    - ``mean``: the cumulative mean of the batch gains.
    """
    if rule == "capped_mean":
        tau = (count + 1).clamp_max(window).to(running.dtype)
        blended = (running * tau + a) / (tau + 1)
        return blended / blended.mean().clamp_min(EPS)
    if rule == "ema":
        weight = torch.where(count == 0, 1.0, 1.0 - momentum)
    elif rule == "mean":
        weight = 1.0 / (count + 1).float()
    else:
        raise ValueError(f"unknown running estimate {rule!r}; choose one of {', '.join(RUNNING_RULES)}")
    return running + weight * (a - running)
