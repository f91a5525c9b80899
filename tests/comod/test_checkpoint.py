"""The checkpoint's typed payload (comod/checkpoint.py): what a run writes is what the types say, and
checkpoints of the same format written before still load and resume."""
import typing

import pytest
import torch

from comod.checkpoint import CHECKPOINT, FORMAT, Best, Checkpoint, PretrainedModel, RngState
from comod.config import config_to_dict
from comod.data import load_data
from comod.pretrain_cache import entry_path
from comod.train import Callbacks, load_checkpoint, run_experiment
from helpers import tiny_config

FORMAT_1_KEYS = {"format", "config", "phase_index", "epochs_done", "step", "model", "optimizer", "rng", "history",
                 "best", "metrics", "task_names"}
"""The keys of a format-1 checkpoint as comod has written them (``task_names`` since the search
commands; the earliest lack it)."""


def _keys(typed_dict) -> set[str]:
    return set(typed_dict.__required_keys__ | typed_dict.__optional_keys__)


def _check_rng(rng):
    assert RngState.__required_keys__ <= set(rng) <= _keys(RngState)
    assert all(isinstance(rng[k], torch.Tensor) for k in RngState.__required_keys__)


def _check_state_dict(state):
    assert state and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())
    assert all(v.device.type == "cpu" for v in state.values())


def test_the_typed_keys_are_the_format_1_keys():
    assert FORMAT == 1
    assert _keys(Checkpoint) == FORMAT_1_KEYS
    assert Checkpoint.__optional_keys__ == {"task_names"}  # lacking in the earliest format-1 checkpoints
    assert set(typing.get_type_hints(Checkpoint)) == FORMAT_1_KEYS  # every annotation resolves


def test_a_saved_checkpoint_loads_back_with_every_typed_field(tmp_path):
    cfg = tiny_config(finetune={"epochs": 2})
    payloads = []
    metrics = run_experiment(cfg, tmp_path, pretrain_cache=tmp_path / "cache",
                             callbacks=Callbacks(on_checkpoint=lambda path, p: payloads.append((path, p))))
    assert {path for path, _ in payloads} == {tmp_path / CHECKPOINT}
    # pretraining's epoch, fine-tuning's epoch 0 (the pretrained model), two epochs, the final metrics
    assert [(p["phase_index"], p["epochs_done"]) for _, p in payloads] == [(0, 1), (1, 0), (1, 1), (1, 2), (1, 2)]
    for _, p in payloads:
        assert set(p) == FORMAT_1_KEYS
    epoch, selected = payloads[2][1], payloads[3][1]
    assert isinstance(epoch["optimizer"], dict) and {"state", "param_groups"} <= set(epoch["optimizer"])
    assert set(selected["best"]) == _keys(Best) and selected["best"]["epoch"] in (0, 1, 2)
    _check_state_dict(selected["best"]["model"])
    assert payloads[1][1]["best"]["epoch"] == 0 and payloads[0][1]["best"] is None

    ckpt = load_checkpoint(tmp_path / CHECKPOINT)
    assert set(ckpt) == FORMAT_1_KEYS
    assert ckpt["format"] == FORMAT and ckpt["config"] == config_to_dict(cfg)
    assert (ckpt["phase_index"], ckpt["epochs_done"]) == (1, 2)
    assert ckpt["step"] == cfg.pretrain.epochs * 4 + 2 * 4 and isinstance(ckpt["step"], int)
    _check_state_dict(ckpt["model"])
    assert ckpt["optimizer"] is None and ckpt["best"] is None  # the final checkpoint keeps neither
    _check_rng(ckpt["rng"])
    assert [h["phase"] for h in ckpt["history"]] == ["pretrain", "pretrained", "curve", "finetune", "finetune"]
    assert ckpt["metrics"] == pytest.approx(metrics)
    assert ckpt["task_names"] == load_data(cfg).task_names
    last = payloads[-1][1]
    assert all(torch.equal(last["model"][k], ckpt["model"][k]) for k in ckpt["model"])

    entry = load_checkpoint(entry_path(tmp_path / "cache", cfg))
    assert set(entry) == _keys(PretrainedModel)
    _check_state_dict(entry["model"])
    _check_rng(entry["rng"])
    assert entry["step"] == cfg.pretrain.epochs * 4 and [h["phase"] for h in entry["history"]] == ["pretrain"]


class Interrupt(Exception):
    pass


def _without_task_names(path):
    """The checkpoint at ``path`` as the earliest format-1 writer wrote it (no ``task_names``)."""
    saved = torch.load(path, weights_only=True)
    del saved["task_names"]
    torch.save(saved, path)


def test_a_format_1_checkpoint_without_task_names_still_loads_and_resumes(tmp_path):
    cfg = tiny_config(pretrain={"epochs": 2})
    reference = run_experiment(cfg, tmp_path / "reference")

    def stop(phase, epoch, step, metrics):
        raise Interrupt

    with pytest.raises(Interrupt):
        run_experiment(cfg, tmp_path / "run", callbacks=Callbacks(on_epoch=stop))
    _without_task_names(tmp_path / "run" / CHECKPOINT)
    assert "task_names" not in load_checkpoint(tmp_path / "run" / CHECKPOINT)
    resumed = run_experiment(cfg, tmp_path / "run")
    same = {k: v for k, v in reference.items() if not k.endswith("seconds")}
    assert {k: resumed[k] for k in same} == same

    _without_task_names(tmp_path / "run" / CHECKPOINT)  # a finished run's: its metrics, nothing trained
    again = run_experiment(cfg, tmp_path / "run", callbacks=Callbacks(on_step=lambda *a: pytest.fail("trained")))
    assert again == resumed
