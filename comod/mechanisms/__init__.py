"""Gain-modulation mechanisms behind one interface, created by name.

Adding a kind ``NAME`` takes three edits:

1. a new file ``comod/mechanisms/NAME.py`` with a :class:`Mechanism` subclass
   (``kind = "NAME"``, ``from_config``, ``forward``, ``sample_gains``,
   ``expected_gain``; see :mod:`comod.mechanisms.base`). ``from_config`` reads
   the kind's settings from :class:`comod.config.ModulationConfig`; a setting
   of its own is a new field there, with its docstring and its check;
2. its import and its line in :data:`MECHANISMS`, below;
3. ``"NAME"`` in :data:`comod.names.KINDS`, the torch-free list of kind names,
   in the same position: the config's ``modulation.kind`` accepts exactly these.

tests/comod/test_mechanism_contract.py checks that the registry, the names
and the config's choices agree, and runs its contract suite on every kind.
"""
from __future__ import annotations

from comod.mechanisms.base import Mechanism
from comod.mechanisms.controller import Controller, coupling_map
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
           "blend_running", "lognormal_gain", "mean_gain", "coupling_map"]
