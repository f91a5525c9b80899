"""Gain-modulation mechanisms behind one interface, created by name."""
from __future__ import annotations

from comod.mechanisms.base import Mechanism
from comod.mechanisms.controller import Controller
from comod.mechanisms.deterministic import DeterministicGain
from comod.mechanisms.none import NoModulation
from comod.mechanisms.readout import mix_with_ones, readout_gain
from comod.mechanisms.stochastic import StochasticComodulation, lognormal_gain

MECHANISMS = {cls.kind: cls for cls in (NoModulation, DeterministicGain, StochasticComodulation)}


def create_mechanism(kind: str, num_tasks: int, site_channels: dict[str, int], decoder_dim: int,
                     **settings) -> Mechanism:
    """A mechanism by kind name; ``settings`` are the kind's own keyword arguments."""
    if kind not in MECHANISMS:
        raise ValueError(f"unknown modulation kind {kind!r}; choose one of {', '.join(MECHANISMS)}")
    return MECHANISMS[kind](num_tasks, site_channels, decoder_dim, **settings)


def build_mechanism(cfg, num_tasks: int, site_channels: dict[str, int], decoder_dim: int) -> Mechanism:
    """A mechanism from a :class:`comod.config.ModulationConfig`."""
    if cfg.kind == "none":
        settings = {}
    elif cfg.kind == "deterministic":
        settings = dict(gain_form=cfg.gain_form, coupling=cfg.coupling, coupling_init=cfg.coupling_init)
    else:
        r = cfg.readout
        settings = dict(noise_scale=cfg.noise_scale, coupling=cfg.coupling, coupling_init=cfg.coupling_init,
                        estimator=r.estimator, rectifier=r.rectifier, mix=r.mix, running=r.running,
                        momentum=r.momentum, decision=r.decision, warmup_steps=r.warmup_steps, draws=r.draws)
    return create_mechanism(cfg.kind, num_tasks, site_channels, decoder_dim, **settings)


__all__ = ["Mechanism", "Controller", "NoModulation", "DeterministicGain", "StochasticComodulation",
           "MECHANISMS", "create_mechanism", "build_mechanism", "readout_gain", "mix_with_ones",
           "lognormal_gain"]
