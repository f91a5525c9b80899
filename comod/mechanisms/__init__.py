"""Gain-modulation mechanisms behind one interface, created by name.

Adding a kind: a file with a :class:`Mechanism` subclass and one line in
:data:`MECHANISMS` (its name also in :data:`comod.names.KINDS`, which the
config's ``modulation.kind`` choices match; a test checks the three agree).
"""
from __future__ import annotations

from comod.mechanisms.base import Mechanism
from comod.mechanisms.controller import Controller
from comod.mechanisms.deterministic import DeterministicGain, mean_gain
from comod.mechanisms.none import NoModulation
from comod.mechanisms.readout import blend_running, mix_with_ones, readout_gain
from comod.mechanisms.stochastic import StochasticComodulation, lognormal_gain

MECHANISMS: dict[str, type[Mechanism]] = {
    "none": NoModulation,
    "deterministic": DeterministicGain,
    "stochastic": StochasticComodulation,
}


def _kind_class(kind: str) -> type[Mechanism]:
    if kind not in MECHANISMS:
        raise ValueError(f"unknown modulation kind {kind!r}; choose one of {', '.join(MECHANISMS)}")
    return MECHANISMS[kind]


def create_mechanism(kind: str, num_tasks: int, site_channels: dict[str, int], decoder_dim: int,
                     **settings) -> Mechanism:
    """A mechanism by kind name; ``settings`` are the kind's own keyword arguments."""
    return _kind_class(kind)(num_tasks, site_channels, decoder_dim, **settings)


def build_mechanism(cfg, num_tasks: int, site_channels: dict[str, int], decoder_dim: int) -> Mechanism:
    """A mechanism from a :class:`comod.config.ModulationConfig`."""
    return _kind_class(cfg.kind).from_config(cfg, num_tasks, site_channels, decoder_dim)


__all__ = ["Mechanism", "Controller", "NoModulation", "DeterministicGain", "StochasticComodulation",
           "MECHANISMS", "create_mechanism", "build_mechanism", "readout_gain", "mix_with_ones",
           "blend_running", "lognormal_gain", "mean_gain"]
