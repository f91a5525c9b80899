import json

import pytest
import torch

from comod.train import Callbacks, TrainingError, load_checkpoint, run_experiment
from helpers import tiny_config

KEYS = ("test/mean_f1", "test/mean_error", "test/mean_precision", "test/mean_recall", "test/mean_accuracy",
        "test/mean_ece")


def _test_metrics(metrics):
    return {k: v for k, v in metrics.items() if k.startswith(("test/", "val/", "pretrained/"))}


def test_run_writes_config_metrics_and_checkpoint(tmp_path):
    cfg = tiny_config()
    metrics = run_experiment(cfg, tmp_path)
    for key in KEYS:
        assert 0.0 <= metrics[key] <= 1.0
    assert "test/pattern_0/f1" in metrics or any(k.endswith("/f1") and k.count("/") == 2 for k in metrics)
    assert json.loads((tmp_path / "metrics.json").read_text()) == pytest.approx(metrics)
    assert (tmp_path / "config.yaml").exists()
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")  # weights_only=True
    assert ckpt["metrics"] == pytest.approx(metrics)
    assert "mechanism.running_gain" in ckpt["model"]
    phases = [h["phase"] for h in ckpt["history"]]
    assert phases == ["pretrain", "pretrained", "curve", "finetune"]  # curve: fine-tuning step 0


def test_same_seed_same_metrics_on_cpu(tmp_path):
    cfg = tiny_config()
    a = run_experiment(cfg, tmp_path / "a")
    b = run_experiment(cfg, tmp_path / "b")
    assert _test_metrics(a) == _test_metrics(b)
    c = run_experiment(tiny_config(seed=1), tmp_path / "c")
    assert _test_metrics(a) != _test_metrics(c)


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("stop_after", [1, 3])
def test_interrupted_run_resumes_to_the_same_result(tmp_path, stop_after):
    cfg = tiny_config(pretrain={"epochs": 2}, finetune={"epochs": 2})
    reference = run_experiment(cfg, tmp_path / "ref")
    seen = []

    def stop(phase, epoch, step, metrics):
        seen.append((phase, epoch))
        if len(seen) == stop_after:
            raise Interrupt

    with pytest.raises(Interrupt):
        run_experiment(cfg, tmp_path / "run", callbacks=Callbacks(on_epoch=stop))
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["metrics"] is None
    resumed_epochs = []
    resumed = run_experiment(cfg, tmp_path / "run", callbacks=Callbacks(
        on_epoch=lambda phase, epoch, step, m: resumed_epochs.append((phase, epoch))))
    assert len(seen) + len(resumed_epochs) == 4  # no epoch done twice
    assert _test_metrics(resumed) == _test_metrics(reference)
    # a finished run returns its metrics without training again
    again = run_experiment(cfg, tmp_path / "run", callbacks=Callbacks(on_epoch=lambda *a: pytest.fail("trained")))
    assert again == resumed


def test_resume_refuses_another_config(tmp_path):
    run_experiment(tiny_config(), tmp_path)
    with pytest.raises(TrainingError, match=r"another config \(modulation.noise_scale: 0.5 in the checkpoint, 0.3"):
        run_experiment(tiny_config(modulation={"noise_scale": 0.3}), tmp_path)


def test_controller_only_finetuning_keeps_everything_else(tmp_path):
    states = []
    cfg = tiny_config(modulation={"kind": "deterministic"})
    run_experiment(cfg, tmp_path, callbacks=Callbacks(on_checkpoint=lambda path, s: states.append(s)))
    pretrained = states[1]["model"]  # after the pretraining phase's evaluation
    final = states[2]["model"]  # after the fine-tuning epoch (selection may then restore epoch 0)
    changed = {k for k in pretrained if not torch.equal(pretrained[k], final[k])}
    assert changed == {"mechanism.controller.table.layer2"}


def test_none_kind_has_nothing_to_finetune(tmp_path):
    phases = []
    metrics = run_experiment(tiny_config(modulation={"kind": "none"}), tmp_path,
                             callbacks=Callbacks(on_phase=lambda p, first, n: phases.append((p, n))))
    assert phases == [("pretrain", 1), ("finetune", 0)]
    assert metrics["test/mean_f1"] == pytest.approx(metrics["pretrained/test/mean_f1"])


def test_multiclass_protocol_pretrain_coarse_adapt_fine(tmp_path):
    cfg = tiny_config(data={"tasks": "coarse_fine"}, pretrain={"tasks": ["coarse"]},
                      finetune={"tasks": ["fine"], "trainable": ["controller", "heads"]})
    metrics = run_experiment(cfg, tmp_path)
    assert "test/fine/ece" in metrics and "test/coarse/f1" not in metrics
    assert 0.0 <= metrics["test/mean_ece"] <= 1.0


def test_groups_task_set_with_ignored_samples(tmp_path):
    metrics = run_experiment(tiny_config(data={"tasks": "groups"}), tmp_path)
    assert {k for k in metrics if k.endswith("/accuracy") and k.startswith("test/") and k != "test/mean_accuracy"}


def test_unknown_task_name(tmp_path):
    with pytest.raises(TrainingError, match=r"finetune.tasks: got unknown task 'shoes'"):
        run_experiment(tiny_config(finetune={"tasks": ["shoes"]}), tmp_path)


def test_diverging_loss_stops_with_reason(tmp_path):
    cfg = tiny_config(pretrain={"lr": {"backbone": 1e30, "decoder": 1e30, "heads": 1e30, "controller": 1e30}})
    with pytest.raises(TrainingError, match="diverged"):
        run_experiment(cfg, tmp_path)


def test_bf16_autocast_and_channels_last_on_cpu(tmp_path):
    cfg = tiny_config(precision="bf16", model={"channels_last": True})
    metrics = run_experiment(cfg, tmp_path)
    assert 0.0 <= metrics["test/mean_f1"] <= 1.0


@pytest.mark.gpu
def test_cuda_bf16_channels_last_multi_site(tmp_path):
    cfg = tiny_config(device="cuda", precision="bf16", model={"channels_last": True},
                      modulation={"sites": ["layer1", "layer3"]})
    metrics = run_experiment(cfg, tmp_path)
    assert 0.0 <= metrics["test/mean_f1"] <= 1.0
    assert load_checkpoint(tmp_path / "checkpoint.pt")["model"]["mechanism.running_gain"].device.type == "cpu"


def test_pretrain_cache_is_shared_by_runs_that_differ_after_pretraining(tmp_path):
    cache = tmp_path / "cache"
    base = tiny_config(pretrain={"epochs": 2})
    plain = run_experiment(base, tmp_path / "plain")
    first = run_experiment(base, tmp_path / "first", pretrain_cache=cache)
    assert _test_metrics(first) == _test_metrics(plain)  # caching changes nothing
    assert len(list(cache.glob("pretrained-*.pt"))) == 1
    epochs, steps = [], []
    other = tiny_config(pretrain={"epochs": 2}, finetune={"lr": {"controller": 0.05}})
    cached = run_experiment(other, tmp_path / "second", pretrain_cache=cache, callbacks=Callbacks(
        on_epoch=lambda phase, epoch, step, m: epochs.append((phase, epoch)),
        on_step=lambda phase, i, n: steps.append(phase)))
    assert "pretrain" not in steps, "a cached pretraining must not train again"
    assert epochs == [("pretrain", 1), ("pretrain", 2), ("finetune", 1)]  # replayed for schedulers
    reference = run_experiment(other, tmp_path / "reference")
    assert _test_metrics(cached) == _test_metrics(reference)
    run_experiment(tiny_config(seed=5, pretrain={"epochs": 2}), tmp_path / "third", pretrain_cache=cache)
    assert len(list(cache.glob("pretrained-*.pt"))) == 2


def test_selection_keeps_the_pretrained_model_unless_fine_tuning_beats_it(tmp_path):
    # a huge controller learning rate wrecks the couplings: selection must fall back to epoch 0
    # (the 1 + mu c gain stays finite where exp(mu c) overflows and the loss diverges)
    cfg = tiny_config(modulation={"kind": "deterministic", "gain_form": "one_plus"},
                      finetune={"epochs": 2, "lr": {"controller": 1e4}})
    metrics = run_experiment(cfg, tmp_path)
    history = load_checkpoint(tmp_path / "checkpoint.pt")["history"]
    finetuned = [h["finetune/val/mean_f1"] for h in history if h["phase"] == "finetune"]
    if metrics["finetune/best_epoch"] == 0:
        assert metrics["test/mean_f1"] == pytest.approx(metrics["pretrained/test/mean_f1"])
    else:
        assert max(finetuned) > 0
    assert metrics["val/mean_f1"] >= max(finetuned) - 1e-9


def test_warmup_longer_than_pretraining_is_refused(tmp_path):
    cfg = tiny_config(modulation={"readout": {"warmup_steps": 4}},  # pretraining: 1 epoch x 4 steps
                      pretrain={"modulation_kind": "same"})
    with pytest.raises(TrainingError, match="modulation.readout.warmup_steps: got 4; expected fewer than the 4"):
        run_experiment(cfg, tmp_path)


def test_eval_interval_draws_a_fine_tuning_curve(tmp_path):
    cfg = tiny_config(finetune={"epochs": 2, "steps_per_epoch": 4, "eval_interval_steps": 3})
    points = []
    metrics = run_experiment(cfg, tmp_path, callbacks=Callbacks(on_eval=lambda *a: points.append(a)))
    pretrain_steps = cfg.pretrain.epochs * cfg.pretrain.steps_per_epoch
    # step 0 (the pretrained model), then phase steps 3 and 6; 4 and 8 are epoch ends
    assert [(phase, step) for phase, step, _ in points] == [("finetune", pretrain_steps + s) for s in (0, 3, 6)]
    assert all("finetune/val/mean_f1" in m and "finetune/train_loss" not in m for _, _, m in points)
    history = load_checkpoint(tmp_path / "checkpoint.pt")["history"]
    curve = [h["finetune_step"] for h in history if h["phase"] == "curve"]
    assert curve == [0, 3, 6]
    assert points[0][2]["finetune/val/mean_f1"] == pytest.approx(
        max(h["finetune/val/mean_f1"] for h in history if h["phase"] == "curve" and h["finetune_step"] == 0))
    assert metrics["steps"] == pretrain_steps + 8


def test_few_shot_keeps_k_images_per_task_stratified_and_seeded():
    from comod.train import few_shot

    labels = torch.tensor([0] * 90 + [1] * 10)
    pool = torch.arange(100) + 1000
    picked = few_shot(pool, labels, 10, seed=3)
    assert len(picked) == 10 and len(set(picked.tolist())) == 10
    chosen = labels[picked - 1000]
    assert int((chosen == 1).sum()) == 1 and int((chosen == 0).sum()) == 9  # proportional, each class kept
    assert torch.equal(picked, few_shot(pool, labels, 10, seed=3))
    assert not torch.equal(picked, few_shot(pool, labels, 10, seed=4))
    rare = few_shot(pool, torch.tensor([0] * 99 + [1]), 2, seed=0)
    assert sorted(torch.tensor([0] * 99 + [1])[rare - 1000].tolist()) == [0, 1]
    assert torch.equal(few_shot(pool, labels, 500, seed=0), pool)


def test_samples_per_task_limits_fine_tuning_data(tmp_path):
    from comod.data import load_data
    from comod.train import Batcher

    cfg = tiny_config(finetune={"samples_per_task": 6})
    data = load_data(cfg)
    batcher = Batcher(data.train, [0, 2], data, torch.device("cpu"), torch.Generator().manual_seed(0), False,
                      samples_per_task=6, subset_seed=cfg.data.split_seed)
    assert {k: len(p) for k, p in batcher.pools.items()} == {0: 6, 2: 6}
    seen = set()
    for _ in range(20):
        task, x, y = batcher.sample(8)
        seen.add(task)
    assert seen == {0, 2}
    metrics = run_experiment(cfg, tmp_path)
    assert 0.0 <= metrics["test/mean_f1"] <= 1.0


def test_a_cosine_schedule_decays_every_group_to_zero_over_the_phase(tmp_path):
    from comod.train import cosine_factor

    assert cosine_factor(0, 8) == 1.0 and cosine_factor(4, 8) == pytest.approx(0.5) and cosine_factor(8, 8) == 0.0
    cfg = tiny_config(pretrain={"epochs": 2, "lr_schedule": "cosine"})
    rates = []

    def on_checkpoint(path, payload):
        if payload["phase_index"] == 0 and payload["optimizer"] is not None:
            rates.append([g["lr"] for g in payload["optimizer"]["param_groups"]])

    run_experiment(cfg, tmp_path / "cosine", callbacks=Callbacks(on_checkpoint=on_checkpoint))
    base = cfg.pretrain.lr.backbone
    steps = 4  # tiny_config: 4 steps per epoch; the rate of each epoch's last step
    assert rates[0][0] == pytest.approx(base * cosine_factor(steps - 1, 2 * steps))
    assert rates[1][0] == pytest.approx(base * cosine_factor(2 * steps - 1, 2 * steps))
    reference = load_checkpoint(tmp_path / "cosine" / "checkpoint.pt")["metrics"]

    class Stop(Exception):
        pass

    def stop(phase, epoch, step, metrics):
        if phase == "pretrain" and epoch == 1:
            raise Stop

    with pytest.raises(Stop):
        run_experiment(cfg, tmp_path / "cut", callbacks=Callbacks(on_epoch=stop))
    resumed = run_experiment(cfg, tmp_path / "cut")  # the schedule goes on from the step it stopped at
    assert {k: v for k, v in resumed.items() if not k.endswith("seconds")} == \
        {k: v for k, v in reference.items() if not k.endswith("seconds")}
