import json

import optuna
import pytest
import yaml

from comod.config import ConfigError
from comod_platform.searchfile import load_search, parse_search

BASE = {
    "data": {"dataset": "synthetic", "tasks": "attributes"},
    "model": {"stem": "small", "width": 0.125, "decoder_hidden": [16]},
    "modulation": {"kind": "stochastic", "sites": ["layer2"]},
}

SPACE = {
    "modulation.kind": {"type": "categorical", "choices": ["none", "deterministic", "stochastic"]},
    "modulation.noise_scale": {"type": "float", "low": 0.05, "high": 2.0, "log": True,
                               "when": {"modulation.kind": "stochastic"}},
    "modulation.sites": {"type": "categorical", "choices": [["layer2"], ["layer3"], ["layer2", "layer3"]]},
    "finetune.lr.controller": {"type": "float", "low": 1e-3, "high": 1e-1, "log": True},
    "seed": {"type": "int", "low": 0, "high": 3},
}


def _search(**changes):
    raw = {"experiment": BASE, "space": dict(SPACE), "search": {"num_trials": 4}}
    for key, value in changes.items():
        raw[key] = value
    return raw


def test_define_by_run_space_in_a_real_study(tmp_path):
    sf = parse_search(_search(), "demo")
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'optuna.db'}", study_name="demo",
                                sampler=optuna.samplers.RandomSampler(seed=0), direction="maximize")
    seen_kinds = set()
    for _ in range(30):
        trial = study.ask()
        flat = sf.suggest(trial)
        cfg = sf.config_for(flat)  # every sampled config passes the experiment loader
        seen_kinds.add(cfg.modulation.kind)
        assert ("modulation.noise_scale" in trial.params) == (cfg.modulation.kind == "stochastic")
        assert isinstance(cfg.modulation.sites, list) and cfg.modulation.sites
        assert 1e-3 <= cfg.finetune.lr.controller <= 1e-1
        study.tell(trial, 0.5)
    assert seen_kinds == {"none", "deterministic", "stochastic"}
    reloaded = optuna.load_study(study_name="demo", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert len(reloaded.trials) == 30


@pytest.mark.parametrize("space, pieces", [
    ({"modulation.noise_scal": {"type": "float", "low": 0.1, "high": 1}}, ["space.modulation.noise_scal",
                                                                         "not a setting"]),
    ({"modulation.noise_scale": {"type": "float", "low": 3, "high": 1}}, ["space.modulation.noise_scale",
                                                                        "low <= high"]),
    ({"modulation.noise_scale": {"type": "float", "low": -1, "high": 1}}, ["space.modulation.noise_scale",
                                                                         "-1", ">= 0"]),
    ({"modulation.noise_scale": {"type": "float", "low": 0, "high": 1, "log": True}}, ["low > 0 with log"]),
    ({"modulation.sites": {"type": "categorical", "choices": [["layer9"]]}}, ["space.modulation.sites",
                                                                             "layer9", "layer4"]),
    ({"modulation.kind": {"type": "categorical", "choices": []}}, ["choices", "non-empty"]),
    ({"seed": {"type": "normal", "low": 0, "high": 1}}, ["space.seed.type", "'categorical'"]),
    ({"seed": {"type": "int", "low": 0.5, "high": 2}}, ["space.seed.low", "an integer"]),
    ({"modulation.noise_scale": {"type": "float", "low": 0.1, "high": 1, "when": {"modulation.kind": "x"}},
      "modulation.kind": {"type": "categorical", "choices": ["stochastic"]}}, ["list it first"]),
    ({"modulation.noise_scale": 0.3}, ["expected a distribution"]),
])
def test_broken_space_fails_before_any_trial(space, pieces):
    with pytest.raises(ConfigError) as err:
        parse_search(_search(space=space), "bad")
    for piece in pieces:
        assert piece in str(err.value), (piece, str(err.value))


@pytest.mark.parametrize("raw, pieces", [
    (_search(search={"num_trials": 0}), ["search.num_trials", ">= 1"]),
    (_search(search={"resources": {"gpu": 1.5}}), ["search.resources.gpu", "fraction"]),
    (_search(search={"sampler": "bayes"}), ["search.sampler", "'tpe'"]),
    (_search(search={"scheduler": {"reduction_factor": 1}}), ["search.scheduler.reduction_factor"]),
    (_search(search={"checkpoint_interval_s": -1}), ["search.checkpoint_interval_s", "-1", ">= 0"]),
    (_search(experiment={"modulation": {"noise_scale": -2}}), ["experiment.modulation.noise_scale"]),
    ({"experiment": BASE, "spaces": {}}, ["spaces", "unknown section"]),
])
def test_broken_settings_and_experiment(raw, pieces):
    with pytest.raises(ConfigError) as err:
        parse_search(raw, "bad")
    for piece in pieces:
        assert piece in str(err.value), (piece, str(err.value))


def test_load_by_name_and_unknown_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "search_spaces").mkdir()
    (tmp_path / "search_spaces" / "demo.yaml").write_text(yaml.safe_dump(_search()))
    assert load_search("demo").name == "demo"
    with pytest.raises(ConfigError, match="no such search file; searches in search_spaces/: demo"):
        load_search("nothing")


def test_grid_sampler_enumerates_every_point(tmp_path):
    from comod_platform.searcher import create_sampler, points_to_evaluate

    space = {"modulation.kind": {"type": "categorical", "choices": ["none", "deterministic", "stochastic"]},
             "seed": {"type": "int", "low": 0, "high": 1},
             "modulation.sites": {"type": "categorical", "choices": [["layer2"], ["layer2", "layer3"]]}}
    sf = parse_search(_search(space=space, search={"sampler": "grid", "num_trials": 12}), "grid")
    study = optuna.create_study(sampler=create_sampler(sf))
    for point in points_to_evaluate(sf):
        study.enqueue_trial(point)
    seen = []
    for _ in range(12):
        trial = study.ask()
        flat = sf.suggest(trial)
        sf.config_for(flat)
        seen.append((flat["modulation.kind"], flat["seed"], tuple(flat["modulation.sites"])))
        study.tell(trial, 0.0)
    assert len(set(seen)) == 12
    assert seen[:3] == [("none", 0, ("layer2",)), ("none", 0, ("layer2", "layer3")), ("none", 1, ("layer2",))]
    with pytest.raises(ConfigError, match="search.num_trials.*12, the number of points"):
        parse_search(_search(space=space, search={"sampler": "grid", "num_trials": 5}), "grid")
    with pytest.raises(ConfigError, match="a float range has no grid"):
        parse_search(_search(search={"sampler": "grid", "num_trials": 5}), "grid")


def test_grid_with_a_condition_has_no_duplicate_points():
    space = {"modulation.kind": {"type": "categorical", "choices": ["deterministic", "stochastic"]},
             "modulation.noise_scale": {"type": "categorical", "choices": [0.1, 1.0],
                                        "when": {"modulation.kind": "stochastic"}},
             "seed": {"type": "int", "low": 0, "high": 1}}
    sf = parse_search(_search(space=space, search={"sampler": "grid", "num_trials": 6}), "grid")
    points = sf.grid_points()
    assert len(points) == 6 and len({json.dumps(p, sort_keys=True) for p in points}) == 6
    assert [p for p in points if p["modulation.kind"] == "deterministic"] == [
        {"modulation.kind": "deterministic", "seed": 0}, {"modulation.kind": "deterministic", "seed": 1}]


@pytest.mark.parametrize("name", ["tiny", "quickstart", "fashion_mnist_study", "celeba_comodulation",
                                  "cifar100_architectures", "quickstart_tpe", "mosaic_study/shared", "mosaic_study/paper",
                                  "mosaic_study/new_tasks", "mosaic_study/shared_heads"])
def test_shipped_search_files_load(name):
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "search_spaces"
    sf = load_search(root / f"{name}.yaml")
    assert sf.search.num_trials >= 1 and sf.space
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(5):
        sf.config_for(sf.suggest(study.ask()))


@pytest.mark.parametrize("path, suggestion", [
    ("modulation.noise_scal", "did you mean modulation.noise_scale?"),
    ("modulation.noisescale", "did you mean modulation.noise_scale?"),
    ("noise_scale", "did you mean modulation.noise_scale?"),
    ("finetune.lr.controler", "did you mean finetune.lr.controller?"),
    ("finetune.lr", "finetune.lr is a section; search one of its settings: finetune.lr.backbone"),
    ("xyzzy", "settings look like modulation.noise_scale or finetune.lr.controller"),
])
def test_unknown_space_path_suggests_the_closest_setting(path, suggestion):
    with pytest.raises(ConfigError) as err:
        parse_search(_search(space={path: {"type": "float", "low": 0.1, "high": 1.0}}), "bad")
    assert str(err.value).startswith(f"space.{path}: not a setting of the experiment; ")
    assert suggestion in str(err.value), str(err.value)


def test_unknown_when_path_suggests_the_closest_setting():
    space = {"modulation.noise_scale": {"type": "float", "low": 0.1, "high": 1.0,
                                        "when": {"modulation.knd": "stochastic"}}}
    with pytest.raises(ConfigError, match=r"'modulation.knd' is not a setting.*did you mean modulation.kind\?"):
        parse_search(_search(space=space), "bad")


@pytest.mark.parametrize("name", ["quickstart", "mosaic_study/shared", "mosaic_study/paper", "mosaic_study/new_tasks",
                                  "mosaic_study/shared_heads"])
def test_comparison_grids_pair_by_seed_and_interleave_pretrainings(name):
    """Every condition of a comparison runs every seed (pairs), and the seed varies fastest, so the two
    trial slots of the first points make different pretrainings instead of one waiting for the other."""
    from pathlib import Path

    from comod.pretrain_cache import pretrain_key
    from comod_platform.searchfile import decode_choice

    sf = load_search(Path(__file__).resolve().parents[2] / "search_spaces" / f"{name}.yaml")
    assert sf.search.sampler == "grid" and sf.search.scheduler.type == "fifo"
    points = sf.grid_points()
    assert len(points) == sf.search.num_trials
    assert list(sf.space)[-1] == "seed"
    seeds = sorted({p["seed"] for p in points})
    assert len(seeds) >= 3
    arms: dict = {}
    for p in points:
        arms.setdefault(json.dumps({k: v for k, v in p.items() if k != "seed"}, sort_keys=True), []).append(p["seed"])
    assert all(sorted(s) == seeds for s in arms.values())
    first = points[:sf.search.max_concurrent]
    keys = [pretrain_key(sf.config_for({k: decode_choice(v) for k, v in p.items()})) for p in first]
    assert len(set(keys)) == len(keys)


def _two_plus_two(**search):
    """A trial of 4 epochs (2 pretraining, 2 fine-tuning)."""
    return _search(experiment={**BASE, "pretrain": {"epochs": 2}, "finetune": {"epochs": 2}},
                   search={"num_trials": 4, **search})


def test_a_grace_period_longer_than_a_trial_is_refused_naming_both_numbers():
    with pytest.raises(ConfigError) as err:
        parse_search(_two_plus_two(scheduler={"type": "asha", "grace_period": 50}), "bad")
    assert str(err.value) == ("search.scheduler.grace_period: got 50; expected at most 4, the epochs a trial trains "
                              "(pretrain.epochs 2 + finetune.epochs 2): ASHA may stop a trial only after "
                              "grace_period epochs")
    assert parse_search(_two_plus_two(scheduler={"type": "asha", "grace_period": 4}), "ok")
    # searched epochs: the longest trial counts
    raw = _two_plus_two(scheduler={"type": "asha", "grace_period": 7})
    raw["space"] = {**SPACE, "finetune.epochs": {"type": "int", "low": 1, "high": 5}}
    assert parse_search(raw, "ok")


@pytest.mark.parametrize("condition, space, pieces", [
    ({"modulation.kind": "stochastik"}, SPACE,
     ["space.modulation.noise_scale.when: modulation.kind is 'stochastik', which is not one of its choices "
      "(none, deterministic, stochastic), so modulation.noise_scale would never be sampled; did you mean stochastic?"]),
    ({"modulation.kind": "deterministic"}, {k: v for k, v in SPACE.items() if k != "modulation.kind"},
     ["modulation.kind is not searched and is 'stochastic' in the experiment, never 'deterministic'"]),
    ({"seed": 9}, SPACE, ["seed is 9, outside its range [0, 3]"]),
])
def test_a_condition_its_setting_never_meets_is_refused(condition, space, pieces):
    space = {k: v for k, v in space.items() if k != "modulation.noise_scale"}
    space["modulation.noise_scale"] = {"type": "float", "low": 0.05, "high": 2.0, "when": condition}
    with pytest.raises(ConfigError) as err:
        parse_search(_search(space=space), "bad")
    for piece in pieces:
        assert piece in str(err.value), (piece, str(err.value))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("change, piece", [
    ({"search": {"scheduler": {"type": "asha", "grace_period": 50}}}, "expected at most 4, the epochs a trial"),
    ({"space": {"modulation.noise_scale": {"when": {"modulation.kind": "stochastik"}}}}, "did you mean stochastic?"),
])
def test_comod_search_run_refuses_them_in_one_line(tmp_path, ray_tmp, change, piece):
    """The console command: exit 2, one line, no traceback from Ray or a search that never samples."""
    from searches import TINY, run_comod, search_env

    raw = json.loads(json.dumps(TINY))  # 4 epochs a trial
    for section, values in change.items():
        for key, value in values.items():
            raw[section][key] = {**raw[section][key], **value}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    done = run_comod(["search", "run", path], search_env(tmp_path / "runs", ray_tmp), timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("comod: error: ") and piece in lines[0], done.stderr[-3000:]
