"""comod: task adaptation by stochastic comodulation, as a PyTorch library.

A shared network is adapted to one task by modulating the gains of
task-relevant units of chosen layers: deterministically ("attention"), or
stochastically, read out through the covariance of downstream units with a
shared random modulator (Boeshertz, Haimerl & Savin, 2023).

The public names below are imported on first use (PEP 562), so reading and
checking a config (``comod.config``) does not import torch: a search driver
starts Ray while torch loads, and a bad config is reported at once.

Where to add:

- a mechanism kind: ``comod/mechanisms/NAME.py``, its line in
  ``comod.mechanisms.MECHANISMS`` and its name in ``comod.names.KINDS`` (the
  steps are in :mod:`comod.mechanisms`); ``comod/names.py`` holds the kind and
  site names, without torch, for the config to check;
- a dataset: ``comod/data/NAME.py`` exporting ``TASK_SETS`` and ``load`` (the
  contract is in :mod:`comod.data.registry`), its line in ``DATASETS`` there,
  and its name in the choices of the config's ``data.dataset``;
- a backbone: a ResNet depth is a line in ``comod.backbones.ARCHS`` and its
  name in the choices of the config's ``model.backbone``; another family is a
  module with the surface of :class:`comod.backbones.Backbone` (``stages``
  named by ``comod.names.BACKBONE_SITES``, ``channels``, ``out_features``,
  ``forward_stage``), built in ``comod.model.build_model``;
- a setting: a field with its docstring and its check in ``comod.config``;
  its dotted path is also its search-space key and its MLflow param.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_HOMES = {
    "comod.backbones": ("SITES", "Backbone"),
    "comod.config": ("ConfigError", "ExperimentConfig", "flatten", "load_config", "parse_config", "save_config"),
    "comod.data": ("DatasetNotFoundError", "TaskData", "TaskSpec", "load_data"),
    "comod.mechanisms": ("MECHANISMS", "Controller", "DeterministicGain", "Mechanism", "NoModulation",
                         "StochasticComodulation", "build_mechanism", "create_mechanism", "readout_gain"),
    "comod.metrics": ("summarise", "task_metrics"),
    "comod.model": ("MultiTaskModel", "TaskGains", "build_model", "task_gains"),
    "comod.train": ("Callbacks", "TrainingError", "evaluate", "load_checkpoint", "run_experiment"),
}
_WHERE = {name: module for module, names in _HOMES.items() for name in names}

__all__ = [name for names in _HOMES.values() for name in names]


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'comod' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
