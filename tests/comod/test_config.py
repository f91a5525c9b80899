import pytest

from comod.config import (ConfigError, ExperimentConfig, apply_overrides, config_to_dict, flatten, load_config,
                          parse_config, save_config)


def test_defaults_round_trip_through_yaml(tmp_path):
    cfg = parse_config({})
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg
    assert cfg.finetune.trainable == ["controller"]


def test_flatten_uses_dotted_paths():
    flat = flatten(parse_config({}))
    for key in ("modulation.noise_scale", "model.backbone", "finetune.lr.controller",
                "modulation.readout.mix", "data.dataset"):
        assert key in flat
    assert flat["finetune.lr.controller"] == 1e-2


def test_overrides_parse_yaml_values(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("modulation: {kind: deterministic}\n")
    cfg = load_config(path, ["modulation.noise_scale=0.25", "modulation.sites=[layer1, layer4]",
                             "finetune.lr.controller=3e-3", "data.train_limit=null"])
    assert cfg.modulation.noise_scale == 0.25
    assert cfg.modulation.sites == ["layer1", "layer4"]
    assert cfg.finetune.lr.controller == 3e-3
    assert cfg.modulation.kind == "deterministic"


def test_int_accepted_for_float_and_single_site_for_list():
    cfg = parse_config({"modulation": {"noise_scale": 1, "sites": "layer4"}})
    assert cfg.modulation.noise_scale == 1.0 and isinstance(cfg.modulation.noise_scale, float)
    assert cfg.modulation.sites == ["layer4"]


@pytest.mark.parametrize("raw, pieces", [
    ({"modulation": {"noise_scle": 0.1}}, ["modulation.noise_scle", "unknown setting", "noise_scale"]),
    ({"modulation": {"noise_scale": "big"}}, ["modulation.noise_scale", "'big'", "a number"]),
    ({"modulation": {"noise_scale": -1}}, ["modulation.noise_scale", "-1", ">= 0"]),
    ({"modulation": {"kind": "random"}}, ["modulation.kind", "'random'", "'stochastic'"]),
    ({"modulation": {"sites": ["layer9"]}}, ["modulation.sites", "layer9", "stem, layer1, layer2, layer3, layer4"]),
    ({"modulation": {"sites": []}}, ["modulation.sites", "at least one site"]),
    ({"modulation": {"sites": ["decoder3"]}}, ["modulation.sites", "decoder3", "decoder1 .. decoder1",
                                               "model.decoder_hidden has 1"]),
    ({"modulation": {"sites": ["decoder0"]}}, ["modulation.sites", "decoder0", "pool"]),
    ({"modulation": {"modulator_mean": -1}}, ["modulation.modulator_mean", "-1", ">= 0"]),
    ({"modulation": {"readout": {"gradient": "all"}}}, ["modulation.readout.gradient", "'none'", "'covariance'"]),
    ({"modulation": {"readout": {"running": "median"}}}, ["modulation.readout.running", "'capped_mean'"]),
    ({"modulation": {"readout": {"window": 0}}}, ["modulation.readout.window", ">= 1"]),
    ({"finetune": {"eval_interval_steps": 0}}, ["finetune.eval_interval_steps", "positive"]),
    ({"finetune": {"samples_per_task": 1}}, ["finetune.samples_per_task", ">= 2"]),
    ({"finetune": {"lr": {"controller": 0}}}, ["finetune.lr.controller", "positive"]),
    ({"finetune": {"trainable": ["everything"]}}, ["finetune.trainable", "everything", "controller"]),
    ({"pretrain": {"batch_size": 1}}, ["pretrain.batch_size", ">= 2"]),
    ({"data": {"dataset": "mnist"}}, ["data.dataset", "'fashion_mnist'"]),
    ({"data": {"dataset": "cifar100", "tasks": "attributes"}}, ["data.tasks", "coarse_fine"]),
    ({"data": {"val_fraction": 1.5}}, ["data.val_fraction", "0 < val_fraction < 1"]),
    ({"model": {"decoder_hidden": []}}, ["model.decoder_hidden", "non-empty"]),
    ({"model": {"width": 0.5, "weights": "w.pth"}}, ["model.width", "ImageNet"]),
    ({"modulation": {"readout": {"mix": 2}}}, ["modulation.readout.mix", "[0, 1]"]),
    ({"eval": {"select_metric": "loss"}}, ["eval.select_metric", "mean_f1"]),
    ({"seed": True}, ["seed", "an integer"]),
    ({"device": "tpu"}, ["device", "cuda"]),
    (["not", "a", "mapping"], ["expected a mapping"]),
])
def test_bad_values_name_path_value_and_choices(raw, pieces):
    with pytest.raises(ConfigError) as err:
        parse_config(raw)
    for piece in pieces:
        assert piece in str(err.value), (piece, str(err.value))


def test_malformed_yaml_names_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("modulation:\n  kind: stochastic\n   noise_scale: [1\n")
    with pytest.raises(ConfigError, match=r"malformed YAML at line \d+"):
        load_config(path)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "absent.yaml")


def test_bad_override():
    with pytest.raises(ConfigError, match="expected path=value"):
        apply_overrides({}, ["modulation.noise_scale"])
    with pytest.raises(ConfigError, match="cannot be set inside"):
        apply_overrides({"seed": 1}, ["seed.x=2"])


def test_config_to_dict_is_plain():
    raw = config_to_dict(ExperimentConfig())
    assert isinstance(raw["modulation"]["readout"], dict)
    assert parse_config(raw) == ExperimentConfig()


def test_partial_finetune_section_keeps_controller_only_default():
    cfg = parse_config({"finetune": {"epochs": 3}, "pretrain": {"epochs": 2}})
    assert cfg.finetune.trainable == ["controller"]
    assert cfg.pretrain.trainable == ["backbone", "decoder", "heads", "controller"]


def test_faithful_defaults_and_new_sites():
    cfg = parse_config({"model": {"decoder_hidden": [32, 16]}, "modulation": {"sites": ["pool", "decoder2"]}})
    m = cfg.modulation
    assert (m.modulator_mean, m.noise_scale, m.gain_form) == (1.0, 0.1, "exp")
    assert (m.readout.gradient, m.readout.running, m.readout.window, m.readout.decision) == \
        ("none", "capped_mean", 100, "running")
    assert m.sites == ["pool", "decoder2"]
