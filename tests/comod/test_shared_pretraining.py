"""The protocol of a fair comparison: one shared pretraining per seed, a readout that restarts when
fine-tuning starts, a label pass that leaves batch-norm alone, the shuffled-readout control and the
none kind's adaptation baselines (docs/method.md, "Pretraining designs")."""
import copy

import pytest
import torch

from comod.checkpoint import CHECKPOINT
from comod.config import pretraining_modulation
from comod.pretrain_cache import entry_path, pretrain_key
from comod.train import Callbacks, load_checkpoint, run_experiment
from tests.comod.helpers import tiny_config, tiny_model


def _x(n=16, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _norm_stats(model):
    return {k: v.clone() for k, v in model.state_dict().items()
            if not k.startswith("mechanism.") and ("running_" in k or "num_batches" in k)}


def test_the_label_pass_leaves_batch_norm_statistics_as_a_deterministic_step_does():
    torch.manual_seed(0)
    sto = tiny_model("stochastic", noise_scale=1.0)
    det = tiny_model("deterministic")
    det.load_state_dict(sto.state_dict(), strict=False)
    before = _norm_stats(sto)
    assert before.keys() == _norm_stats(det).keys()
    for model in (sto, det):
        model.set_trainable(["backbone", "decoder", "heads", "controller"])
        model.train()
        model(_x(), 0).pow(2).mean().backward()
    after_sto, after_det = _norm_stats(sto), _norm_stats(det)
    moved = [k for k in before if not torch.equal(before[k], after_det[k])]
    assert moved, "a training step should update the running statistics"
    for key in after_det:
        assert torch.equal(after_sto[key], after_det[key]), key


def test_the_label_pass_with_a_gradient_through_the_covariance_still_back_propagates():
    model = tiny_model("stochastic", readout={"gradient": "covariance"})
    model.set_trainable(["controller"])
    model.train()
    model(_x(), 0).pow(2).mean().backward()
    assert model.mechanism.controller.table["layer2"].grad.abs().sum() > 0


def test_a_shared_pretraining_key_ignores_the_fine_tuning_kind_and_its_settings():
    def key(kind, design, **modulation):
        return pretrain_key(tiny_config(modulation={"kind": kind, **modulation},
                                        pretrain={"modulation_kind": design}))

    for design in ("none", "deterministic"):
        assert key("none", design) == key("deterministic", design) == key("stochastic", design, noise_scale=1.0) \
            == key("stochastic", design, readout={"shuffle": True})
    assert key("deterministic", "same") != key("stochastic", "same")
    assert key("deterministic", "none") != key("deterministic", "deterministic")
    assert key("deterministic", "deterministic") != key("deterministic", "deterministic", modulator_mean=0.5)
    assert pretraining_modulation(tiny_config(pretrain={"modulation_kind": "none"})).kind == "none"


def _kind_config(kind, design, **finetune):
    return tiny_config(modulation={"kind": kind}, pretrain={"modulation_kind": design},
                       finetune={"eval_interval_steps": 2, **finetune})


@pytest.mark.parametrize("design", ["none", "deterministic"])
def test_every_kind_fine_tunes_from_one_pretrained_file(tmp_path, design):
    cache = tmp_path / "cache"
    kinds = {"deterministic": {}, "stochastic": {}, "none": {"trainable": ["heads"]}}
    metrics = {kind: run_experiment(_kind_config(kind, design, **ft), tmp_path / kind, pretrain_cache=cache)
               for kind, ft in kinds.items()}
    assert len(list(cache.glob("pretrained-*.pt"))) == 1
    pretrained = {kind: {k: v for k, v in m.items() if k.startswith("pretrained/")} for kind, m in metrics.items()}
    assert pretrained["deterministic"]
    assert metrics["deterministic"]["pretrain_seconds"] > 0
    assert metrics["stochastic"]["pretrain_seconds"] == 0 == metrics["none"]["pretrain_seconds"]
    # the stochastic kind is the deterministic kind plus a readout that starts at ones, on the same couplings
    # (pretrained ones, or fresh ones after a pretraining without modulation)
    assert pretrained["stochastic"] == pretrained["deterministic"]
    histories = {kind: load_checkpoint(tmp_path / kind / CHECKPOINT)["history"] for kind in kinds}
    pretraining = {kind: [h for h in hist if h["phase"] == "pretrain"] for kind, hist in histories.items()}
    assert pretraining["stochastic"] == pretraining["deterministic"] == pretraining["none"]


def test_the_same_design_pretrains_each_kind_with_its_own_mechanism(tmp_path):
    cache = tmp_path / "cache"
    for kind in ("deterministic", "stochastic"):
        run_experiment(_kind_config(kind, "same"), tmp_path / kind, pretrain_cache=cache)
    assert len(list(cache.glob("pretrained-*.pt"))) == 2


def test_step_zero_of_the_curve_is_the_pretrained_model_for_every_kind(tmp_path):
    points = {}
    for kind in ("deterministic", "stochastic"):
        seen = []
        run_experiment(_kind_config(kind, "deterministic"), tmp_path / kind, pretrain_cache=tmp_path / "cache",
                       callbacks=Callbacks(on_eval=lambda phase, step, m, seen=seen: seen.append(m)))
        points[kind] = seen[0]
    assert points["stochastic"] == points["deterministic"]


@pytest.mark.parametrize("reset", [True, False])
def test_the_readout_restarts_when_fine_tuning_starts(tmp_path, reset):
    cfg = tiny_config(pretrain={"modulation_kind": "same"},
                      finetune={"readout_reset": reset, "tasks": ["pattern_0"], "epochs": 2, "steps_per_epoch": 3})
    last = {}

    def on_checkpoint(path, payload):  # the checkpoint after fine-tuning's last epoch
        if payload["phase_index"] == 1 and payload["epochs_done"] == 2:
            last.setdefault("model", copy.deepcopy(payload["model"]))

    run_experiment(cfg, tmp_path, callbacks=Callbacks(on_checkpoint=on_checkpoint))
    count = last["model"]["mechanism.running_count"]
    finetune_steps = 2 * 3
    if reset:
        assert int(count[0]) == finetune_steps
    else:
        assert int(count[0]) > finetune_steps  # pretraining's batches of task a, then fine-tuning's
    assert int(count[1:].sum()) > 0  # tasks not fine-tuned keep pretraining's estimate


def test_the_shuffled_readout_applies_each_task_gain_to_permuted_units():
    torch.manual_seed(3)
    plain = tiny_model("stochastic")
    torch.manual_seed(3)
    shuffled = tiny_model("stochastic", readout={"shuffle": True})
    assert torch.equal(plain.backbone.stages["stem"][0].weight, shuffled.backbone.stages["stem"][0].weight)
    perm = shuffled.mechanism.readout_permutation
    d = plain.mechanism.decoder_dim
    assert all(torch.equal(p.sort().values, torch.arange(d)) for p in perm)
    assert not torch.equal(perm[0], torch.arange(d))
    gain = torch.rand(len(perm), d) + 0.5
    for model in (plain, shuffled):
        model.mechanism.running_gain.copy_(gain)
        model.eval()
    x = _x()
    with torch.no_grad():
        z = plain.suffix(plain.prefix(x), plain.mechanism.mean_gains(1))
        assert torch.allclose(shuffled(x, 1), shuffled._head(z * gain[1][perm[1]], 1))
        assert torch.allclose(plain(x, 1), plain._head(z * gain[1], 1))


@pytest.mark.parametrize("groups", [["heads"], ["decoder", "heads"]])
def test_the_none_kind_adapts_its_heads_or_decoder_with_the_same_budget(tmp_path, groups):
    cfg = _kind_config("none", "none", trainable=groups, epochs=2)
    last = {}

    def on_checkpoint(path, payload):
        if payload["phase_index"] == 1 and payload["epochs_done"] == 2:
            last.setdefault("model", copy.deepcopy(payload["model"]))

    run_experiment(cfg, tmp_path, pretrain_cache=tmp_path / "cache", callbacks=Callbacks(on_checkpoint=on_checkpoint))
    pretrained = torch.load(next((tmp_path / "cache").glob("pretrained-*.pt")), weights_only=True)["model"]
    changed = {k.split(".")[0] for k, v in last["model"].items()
               if v.is_floating_point() and not torch.equal(v, pretrained[k])}
    assert "heads" in changed and ("decoder" in changed) == ("decoder" in groups)
    assert "backbone" not in changed


def test_held_out_tasks_fine_tune_fresh_couplings_and_heads(tmp_path):
    cfg = tiny_config(modulation={"kind": "stochastic"},
                      pretrain={"modulation_kind": "deterministic", "tasks": ["pattern_0", "pattern_1"]},
                      finetune={"tasks": ["pattern_2"], "trainable": ["controller", "heads"]})
    init = float(tiny_model("stochastic").state_dict()["mechanism.controller.table.layer2"][0, 0])
    seen = {}

    def on_checkpoint(path, payload):
        if payload["phase_index"] == 1 and "start" not in seen:
            seen["start"] = copy.deepcopy(payload["model"])

    metrics = run_experiment(cfg, tmp_path, callbacks=Callbacks(on_checkpoint=on_checkpoint))
    start = seen["start"]
    table = start["mechanism.controller.table.layer2"]
    assert torch.all(table[2] == init)  # the held-out task's couplings: untouched by pretraining
    assert not torch.all(table[0] == init)  # a pretraining task's were pretrained
    assert {k.split("/")[1] for k in metrics if k.startswith("test/") and k.count("/") == 2} == {"pattern_2"}
