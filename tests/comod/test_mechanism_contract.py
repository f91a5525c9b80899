"""The contract every mechanism keeps (style.md): one suite, run by each kind."""
import copy

import pytest
import torch

from comod.mechanisms import MECHANISMS
from helpers import TASKS, tiny_model

KINDS = sorted(MECHANISMS)


def _x(n=16, seed=0):
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("sites", [("layer2",), ("layer1", "layer3")])
def test_gain_keeps_shape(kind, sites):
    model = tiny_model(kind, sites)
    h0 = model.prefix(_x())
    for site, gain in model.mechanism.sample_gains(0, h0.shape[0]).items():
        assert gain.shape == (h0.shape[0], model.backbone.channels[site])
    z = model.mechanism(model.suffix, h0, 0)
    assert z.shape == (16, 16)
    assert model(_x(), 0).shape == (16,)
    assert model(_x(), 2).shape == (16, 4)


@pytest.mark.parametrize("kind", KINDS)
def test_eval_is_deterministic(kind):
    torch.manual_seed(0)
    model = tiny_model(kind)
    model.train()
    model(_x(), 0)  # one training step's statistics, so the stochastic kind has a running gain
    model.eval()
    state = torch.get_rng_state()
    first = model(_x(), 0)
    second = model(_x(), 0)
    assert torch.equal(first, second)
    assert torch.equal(state, torch.get_rng_state()), "evaluation must draw no noise"


@pytest.mark.parametrize("kind", KINDS)
def test_mean_gain_matches_expectation_on_large_seeded_batch(kind):
    torch.manual_seed(0)
    model = tiny_model(kind, noise_scale=0.8, coupling_init=1.0)
    with torch.no_grad():
        draws = model.mechanism.sample_gains(1, 200_000)
        expected = model.mechanism.expected_gain(1)
    for site, gain in draws.items():
        mean = gain.mean(0)
        assert torch.allclose(mean, expected[site], atol=0.02), (site, mean[:4], expected[site][:4])
        if kind == "stochastic":
            # log-normal, mean one; spread sigma * c shows noise was drawn at all
            assert torch.allclose(mean, torch.ones_like(mean), atol=0.02)
            assert gain.log().std(0).mean().item() == pytest.approx(0.8 * 1.0, rel=0.02)


def test_stochastic_with_modulator_off_equals_clean_forward():
    torch.manual_seed(0)
    model = tiny_model("stochastic", noise_scale=0.0)
    model.train()
    x = _x()
    out = model(x, 1)
    with torch.no_grad():
        clean = model._head(model.suffix(model.prefix(x), None), 1)
    assert torch.allclose(out, clean, atol=1e-6)


def test_stochastic_adds_no_parameter_over_deterministic():
    det, sto = tiny_model("deterministic"), tiny_model("stochastic")
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(det) == count(sto)
    assert [n for n, _ in det.named_parameters()] == [n for n, _ in sto.named_parameters()]
    assert count(tiny_model("none")) < count(det)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("groups", [["backbone", "decoder", "heads", "controller"], ["controller"]])
def test_every_trainable_parameter_gets_a_gradient(kind, groups):
    torch.manual_seed(0)
    model = tiny_model(kind, sites=("layer1", "layer3"))
    model.set_trainable(groups)
    model.train()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        assert kind == "none" and groups == ["controller"]
        return
    loss = 0
    for task in range(len(TASKS)):  # every head
        out = model(_x(), task)
        loss = loss + out.float().pow(2).mean()
    loss.backward()
    missing = [n for n, p in trainable if p.grad is None or not torch.any(p.grad != 0)]
    assert not missing, f"no gradient reached {missing}"


@pytest.mark.parametrize("kind", ["deterministic", "stochastic"])
def test_controller_only_finetuning_changes_only_the_controller(kind):
    torch.manual_seed(0)
    model = tiny_model(kind)
    model.set_trainable(["controller"])
    model.train()
    before = copy.deepcopy(model.state_dict())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for step in range(3):
        opt.zero_grad()
        model(_x(seed=step), 0).pow(2).mean().backward()
        opt.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    # the readout's running estimate is the mechanism's evaluation state, not a weight
    readout = {"mechanism.running_gain", "mechanism.running_count", "mechanism.train_steps"}
    assert changed - readout == {"mechanism.controller.table.layer2"}, changed
    assert "mechanism.controller.table.layer2" in changed


def test_prefix_runs_without_autograd_when_frozen():
    model = tiny_model("stochastic")
    model.set_trainable(["controller"])
    model.train()
    assert not model.prefix(_x()).requires_grad
    model.set_trainable(["backbone", "controller"])
    assert model.prefix(_x()).requires_grad


def test_stochastic_computes_the_prefix_once_per_step():
    model = tiny_model("stochastic", sites=("layer2",))
    model.train()
    calls = {"stem": 0, "layer3": 0}
    for name in calls:
        model.backbone.stages[name].register_forward_hook(
            lambda *a, name=name: calls.__setitem__(name, calls[name] + 1))
    model(_x(), 0)
    assert calls == {"stem": 1, "layer3": 2}  # prefix once; suffix modulated + clean


def test_stochastic_running_estimate_is_saved_and_used_in_eval():
    torch.manual_seed(0)
    model = tiny_model("stochastic", noise_scale=1.0, coupling_init=2.0)
    model.train()
    for _ in range(3):
        model(_x(64), 0)
    mech = model.mechanism
    assert int(mech.running_count[0]) == 3 and int(mech.running_count[1]) == 0
    assert mech.running_gain[0].mean().item() == pytest.approx(1.0, abs=1e-4)
    assert not torch.allclose(mech.running_gain[0], torch.ones_like(mech.running_gain[0]))
    state = model.state_dict()
    assert "mechanism.running_gain" in state
    clone = tiny_model("stochastic", noise_scale=1.0, coupling_init=2.0)
    clone.load_state_dict(state)
    model.eval(), clone.eval()
    assert torch.equal(model(_x(), 0), clone(_x(), 0))


def test_readout_warmup_uses_unit_gain():
    torch.manual_seed(0)
    model = tiny_model("stochastic", readout={"warmup_steps": 2})
    model.train()
    x = _x()
    with torch.no_grad():
        clean = model._head(model.suffix(model.prefix(x), None), 0)
        assert torch.allclose(model(x, 0), clean, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_forward_tasks_equals_one_forward_per_task(kind):
    torch.manual_seed(0)
    model = tiny_model(kind)
    model.train()
    model(_x(), 0), model(_x(), 1)  # give the stochastic kind running gains
    model.eval()
    together = model.forward_tasks(_x(), [0, 1, 2])
    for k in range(3):
        assert torch.allclose(together[k], model(_x(), k), atol=1e-6)
