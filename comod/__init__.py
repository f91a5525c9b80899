"""comod: task adaptation by stochastic comodulation, as a PyTorch library.

A shared network is adapted to one task by modulating the gains of
task-relevant units of chosen layers: deterministically ("attention"), or
stochastically, read out through the covariance of downstream units with a
shared random modulator (Boeshertz, Haimerl & Savin, 2023).
"""
from comod.backbones import SITES, Backbone
from comod.config import ConfigError, ExperimentConfig, flatten, load_config, parse_config, save_config
from comod.data import DatasetNotFoundError, TaskData, TaskSpec, load_data
from comod.mechanisms import (MECHANISMS, Controller, DeterministicGain, Mechanism, NoModulation,
                              StochasticComodulation, build_mechanism, create_mechanism, readout_gain)
from comod.metrics import summarise, task_metrics
from comod.model import MultiTaskModel, build_model
from comod.train import Callbacks, TrainingError, evaluate, load_checkpoint, run_experiment

__version__ = "0.1.0"

__all__ = [
    "SITES", "Backbone", "ConfigError", "ExperimentConfig", "flatten", "load_config", "parse_config",
    "save_config", "DatasetNotFoundError", "TaskData", "TaskSpec", "load_data", "MECHANISMS", "Controller",
    "DeterministicGain", "Mechanism", "NoModulation", "StochasticComodulation", "build_mechanism",
    "create_mechanism", "readout_gain", "summarise", "task_metrics", "MultiTaskModel", "build_model",
    "Callbacks", "TrainingError", "evaluate", "load_checkpoint", "run_experiment",
]
