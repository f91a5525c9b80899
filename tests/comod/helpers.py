"""Tiny configs and models for the core's tests."""
from comod.config import parse_config
from comod.data.taskdata import TaskSpec
from comod.model import build_model

TASKS = [TaskSpec("a", 2), TaskSpec("b", 2), TaskSpec("c", 4)]


def tiny_config(**sections):
    raw = {
        "data": {"dataset": "synthetic", "tasks": "attributes", "train_limit": 256, "test_limit": 64},
        "model": {"stem": "small", "width": 0.125, "decoder_hidden": [16]},
        "modulation": {"kind": "stochastic", "sites": ["layer2"], "noise_scale": 0.5},
        "pretrain": {"epochs": 1, "steps_per_epoch": 4, "batch_size": 16},
        "finetune": {"epochs": 1, "steps_per_epoch": 4, "batch_size": 16},
        "eval": {"batch_size": 128},
    }
    for key, value in sections.items():
        if isinstance(value, dict):
            raw.setdefault(key, {}).update(value)
        else:
            raw[key] = value
    return parse_config(raw)


def tiny_model(kind="stochastic", sites=("layer2",), tasks=TASKS, **modulation):
    cfg = tiny_config(modulation={"kind": kind, "sites": list(sites), **modulation},
                      pretrain={"modulation_kind": "same"})
    return build_model(cfg, tasks, 3)
