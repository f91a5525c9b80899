"""The contract every mechanism keeps (docs/method.md): one suite, run by each kind."""
import copy
import typing

import pytest
import torch

from comod.config import ModulationConfig
from comod.mechanisms import MECHANISMS, blend_running, readout_gain
from comod.names import KINDS as KIND_NAMES
from helpers import TASKS, tiny_model

KINDS = sorted(MECHANISMS)
SITE_SETS = [("layer2",), ("layer1", "layer3"), ("pool",), ("decoder1",), ("layer3", "decoder1")]


def _x(n=16, seed=0):
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def _same_weights(target, source):
    """Copy ``source``'s weights into ``target`` (buffers the kinds do not share stay as they are)."""
    target.load_state_dict(source.state_dict(), strict=False)
    return target


def test_registry_names_every_kind_the_config_accepts():
    choices = typing.get_args(typing.get_type_hints(ModulationConfig)["kind"])
    assert tuple(MECHANISMS) == KIND_NAMES == choices
    assert all(cls.kind == kind for kind, cls in MECHANISMS.items())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("sites", SITE_SETS)
def test_gain_keeps_shape(kind, sites):
    model = tiny_model(kind, sites)
    widths = {"pool": model.backbone.out_features, "decoder1": 16, **model.backbone.channels}
    h0 = model.prefix(_x())
    for site, gain in model.mechanism.sample_gains(0, h0.shape[0]).items():
        assert gain.shape == (h0.shape[0], widths[site])
    model.train()
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
@pytest.mark.parametrize("modulator_mean", [1.0, 0.0])
def test_mean_gain_matches_expectation_on_large_seeded_batch(kind, modulator_mean):
    torch.manual_seed(0)
    model = tiny_model(kind, noise_scale=0.8, coupling_init=1.0, modulator_mean=modulator_mean)
    with torch.no_grad():
        draws = model.mechanism.sample_gains(1, 200_000)
        expected = model.mechanism.expected_gain(1)
    for site, gain in draws.items():
        mean = gain.mean(0)
        assert torch.allclose(mean, expected[site], rtol=0.02), (site, mean[:4], expected[site][:4])
        if kind != "none":
            # the attention gain exp(mu c) at c = 1
            assert torch.allclose(mean, torch.full_like(mean, float(torch.exp(torch.tensor(modulator_mean)))),
                                  rtol=0.02)
        if kind == "stochastic":  # log-normal: spread sigma * c shows noise was drawn at all
            assert gain.log().std(0).mean().item() == pytest.approx(0.8 * 1.0, rel=0.02)


def test_stochastic_and_deterministic_share_their_mean_gain():
    det, sto = tiny_model("deterministic", coupling_init=0.7), tiny_model("stochastic", coupling_init=0.7)
    _same_weights(sto, det)
    for site, gain in det.mechanism.expected_gain(0).items():
        assert torch.allclose(sto.mechanism.expected_gain(0)[site], gain)


@pytest.mark.parametrize("sites", [("layer2",), ("layer1", "decoder1")])
def test_stochastic_with_readout_gain_at_ones_equals_deterministic(sites):
    torch.manual_seed(0)
    det = tiny_model("deterministic", sites, coupling_init=0.8)
    sto = _same_weights(tiny_model("stochastic", sites, coupling_init=0.8, readout={"mix": 0.0}), det)
    det.train(), sto.train()
    x = _x()
    train_det = det(x, 1)
    train_sto = sto(x, 1)  # mix 0: the readout gain is all ones
    assert torch.allclose(train_sto, train_det, atol=1e-6)
    # evaluation: a fresh stochastic model's running gain is all ones
    sto_eval = _same_weights(tiny_model("stochastic", sites, coupling_init=0.8), det)
    det.eval(), sto_eval.eval()
    for k in range(len(TASKS)):
        assert torch.allclose(sto_eval(x, k), det(x, k), atol=1e-6)


def test_stochastic_without_noise_equals_deterministic():
    """sigma = 0: the covariance is zero, the readout gain all ones, the decision the attention pass."""
    torch.manual_seed(0)
    det = tiny_model("deterministic")
    sto = _same_weights(tiny_model("stochastic", noise_scale=0.0), det)
    det.train(), sto.train()
    x = _x()
    assert torch.allclose(sto(x, 1), det(x, 1), atol=1e-6)


@pytest.mark.parametrize("gradient, label_graph", [("none", False), ("covariance", True)])
def test_label_pass_builds_an_autograd_graph_only_when_asked(gradient, label_graph):
    model = tiny_model("stochastic", readout={"gradient": gradient})
    model.set_trainable(["controller"])
    model.train()
    seen = []
    model.backbone.stages["layer3"].register_forward_hook(lambda m, i, out: seen.append(out.requires_grad))
    model(_x(), 0)
    assert seen == [label_graph, True]  # label pass first, then the unperturbed pass the loss reads


def _reference_mean_zero_step(model, x, task, noise_scale, momentum=0.9):
    """The earlier reading, frozen as a reference: mean-one gain, decision on an ungained pass times
    this batch's readout gain, gradient through the covariance, exponential running estimate (with the
    label pass leaving batch-norm statistics alone)."""
    mech = model.mechanism
    h0 = model.prefix(x)
    m = torch.randn(h0.shape[0]) * noise_scale
    gains = {s: torch.exp(m[:, None] * c[None] - 0.5 * noise_scale ** 2 * c[None] ** 2)
             for s, c in mech.controller(task).items()}
    z_mod = model.suffix(h0, gains, track_norm_stats=False)
    z = model.suffix(h0, None)
    a = readout_gain(z_mod, m)
    with torch.no_grad():
        count = mech.running_count[task]
        weight = 1.0 if int(count) == 0 else 1.0 - momentum
        mech.running_gain[task] += weight * (a.detach() - mech.running_gain[task])
        mech.running_count[task] += 1
    return model._head(z * a, task)


def test_modulator_mean_zero_reproduces_the_earlier_kind_exactly():
    settings = dict(modulator_mean=0.0, noise_scale=0.5,
                    readout={"gradient": "covariance", "running": "ema", "decision": "batch"})
    torch.manual_seed(0)
    new = tiny_model("stochastic", **settings)
    old = copy.deepcopy(new)
    opts = [torch.optim.AdamW(m.parameters(), lr=0.01) for m in (new, old)]
    new.train(), old.train()
    for step in range(3):
        x = _x(seed=step)
        torch.manual_seed(100 + step)
        out_new = new(x, step % 2)
        torch.manual_seed(100 + step)
        out_old = _reference_mean_zero_step(old, x, step % 2, 0.5)
        assert torch.equal(out_new, out_old)
        for model, out, opt in ((new, out_new, opts[0]), (old, out_old, opts[1])):
            opt.zero_grad()
            out.pow(2).mean().backward()
            opt.step()
    for key, value in old.state_dict().items():
        if key != "mechanism.train_steps":
            assert torch.equal(new.state_dict()[key], value), key
    new.eval(), old.eval()
    mech = old.mechanism
    x = _x(seed=9)
    with torch.no_grad():
        expected = old._head(old.suffix(old.prefix(x), None) * mech.running_gain[0], 0)
        assert torch.equal(new(x, 0), expected)


def test_capped_mean_blends_like_the_predecessor_rule():
    ones = torch.ones(4)
    a = torch.tensor([2.0, 0.0, 2.0, 0.0])
    first = blend_running(ones, torch.tensor(0), a, "capped_mean", window=3)
    assert torch.allclose(first, torch.tensor([1.5, 0.5, 1.5, 0.5]))  # (ones * 1 + a) / 2
    second = blend_running(first, torch.tensor(1), ones, "capped_mean", window=3)
    assert torch.allclose(second, (first * 2 + ones) / 3)
    capped = blend_running(first, torch.tensor(50), ones, "capped_mean", window=3)
    assert torch.allclose(capped, (first * 3 + ones) / 4)  # tau stops growing at the window
    assert blend_running(ones * 3, torch.tensor(5), a, "capped_mean").mean().item() == pytest.approx(1.0)


def test_stochastic_adds_no_parameter_over_deterministic():
    det, sto = tiny_model("deterministic"), tiny_model("stochastic")
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(det) == count(sto)
    assert [n for n, _ in det.named_parameters()] == [n for n, _ in sto.named_parameters()]
    assert count(tiny_model("none")) < count(det)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("groups", [["backbone", "decoder", "heads", "controller"], ["controller"]])
@pytest.mark.parametrize("sites", [("layer1", "layer3"), ("pool", "decoder1")])
def test_every_trainable_parameter_gets_a_gradient(kind, groups, sites):
    torch.manual_seed(0)
    model = tiny_model(kind, sites=sites)
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
    decoder_site = tiny_model("stochastic", sites=("decoder1",))
    decoder_site.set_trainable(["decoder", "controller"])
    assert decoder_site.prefix(_x()).requires_grad  # the decoder's layer is part of that prefix


def test_stochastic_computes_the_prefix_once_per_step():
    model = tiny_model("stochastic", sites=("layer2",))
    model.train()
    calls = {"stem": 0, "layer3": 0}
    for name in calls:
        model.backbone.stages[name].register_forward_hook(
            lambda *a, name=name: calls.__setitem__(name, calls[name] + 1))
    model(_x(), 0)
    assert calls == {"stem": 1, "layer3": 2}  # prefix once; suffix label + unperturbed


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
    with torch.no_grad():  # evaluation: the attention pass times the running gain
        expected = model._head(model.suffix(model.prefix(_x()), mech.mean_gains(0)) * mech.running_gain[0], 0)
    assert torch.allclose(model(_x(), 0), expected, atol=1e-6)


def test_readout_warmup_uses_unit_gain():
    torch.manual_seed(0)
    model = tiny_model("stochastic", readout={"warmup_steps": 2})
    model.train()
    x = _x()
    with torch.no_grad():
        attention = model._head(model.suffix(model.prefix(x), model.mechanism.mean_gains(0)), 0)
        assert torch.allclose(model(x, 0), attention, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("modulator_mean", [1.0, 0.0])
def test_forward_tasks_equals_one_forward_per_task(kind, modulator_mean):
    torch.manual_seed(0)
    model = tiny_model(kind, modulator_mean=modulator_mean)
    model.train()
    model(_x(), 0), model(_x(), 1)  # give the stochastic kind running gains
    model.eval()
    together = model.forward_tasks(_x(), [0, 1, 2])
    for k in range(3):
        assert torch.allclose(together[k], model(_x(), k), atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("coupling", ["softplus", "square"])
def test_task_gains_read_the_same_from_a_model_and_from_its_state_dict(kind, coupling):
    from comod.model import task_gains

    torch.manual_seed(0)
    model = tiny_model(kind, sites=("layer1", "decoder1"), coupling=coupling)
    model.train()
    model(_x(), 0), model(_x(), 2)  # moves the stochastic kind's running gains of tasks 0 and 2
    gains = task_gains(model)
    saved = task_gains(copy.deepcopy(model.state_dict()), coupling=coupling)
    controller = model.mechanism.controller
    expected = {} if controller is None else {s: c.detach() for s, c in controller.all_tasks().items()}
    assert gains.couplings.keys() == saved.couplings.keys() == expected.keys()
    for site, c in expected.items():
        assert c.shape == (len(TASKS), model.mechanism.site_channels[site]) and (c >= 0).all()
        assert torch.equal(gains.couplings[site], c) and torch.equal(saved.couplings[site], c)
    if kind == "stochastic":
        assert torch.equal(gains.readout, model.mechanism.running_gain) and torch.equal(saved.readout, gains.readout)
        assert not torch.equal(gains.readout[0], torch.ones_like(gains.readout[0]))
    else:
        assert gains.readout is None and saved.readout is None
    if controller is not None:
        with pytest.raises(ValueError, match="coupling="):
            task_gains(model.state_dict())  # raw parameters: the map is not in the state dict
