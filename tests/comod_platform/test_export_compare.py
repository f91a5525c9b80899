"""`export trials|best` and `compare` on one real search.

One module-scoped search (`comod search run`, the conftest's
``finished_search``: a real local Ray, Optuna, MLflow on SQLite) of
the tiny synthetic experiment over ``modulation.kind`` x ``seed``: with the
random sampler seeded as below its six trials are the six combinations, so
every seed gives a stochastic/deterministic/none triple of trials that
differ only in the kind. Two hand-made child runs (one pruned with only
per-epoch metrics, one failed with none) check that incomplete trials are
tolerated. Every test reads that one search.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from mlflow.tracking import MlflowClient

from comod.config import apply_overrides, config_to_dict, flatten, load_config, parse_config
from comod_platform.conventions import (TAG_EPOCHS, TAG_ERROR, TAG_KIND, TAG_PARENT, TAG_REPORTS, TAG_ROLE,
                                        TAG_SEARCH, TAG_STATE, TAG_STOPPED_EPOCH, TAG_TRIAL_ID, experiment_name)
from comod_platform.search_state import SearchMeta, SearchNotFound, SearchPaths

REPO = Path(__file__).resolve().parents[2]
NAME = "pairs"
METRIC = "val/mean_f1"
SAMPLER_SEED = 35
"""Optuna's RandomSampler(seed=35) draws the 6 (kind, seed) combinations in its first 6 trials."""


def _search_file() -> dict:
    raw = yaml.safe_load((REPO / "search_spaces" / "tiny.yaml").read_text())
    raw["space"] = {"modulation.kind": {"type": "categorical", "choices": ["none", "deterministic", "stochastic"]},
                    "seed": {"type": "categorical", "choices": [0, 1]}}
    raw["search"].update(num_trials=6, sampler="random", seed=SAMPLER_SEED, scheduler={"type": "fifo"},
                         max_concurrent=2)
    return raw


def _add_incomplete_runs(home: Path) -> dict[str, str]:
    """A pruned trial (per-epoch metrics only) and a failed one (no metrics), as the callback records them."""
    meta = SearchPaths(NAME, home).read_meta()
    client = MlflowClient(meta.tracking_uri)
    some = client.search_runs([meta.experiment_id], f"tags.`{TAG_ROLE}` = 'trial'", max_results=1)[0]
    from mlflow.entities import Metric, Param

    ids = {}
    for trial_id, state in (("synthpruned", "pruned"), ("synthfailed", "failed")):
        run = client.create_run(meta.experiment_id, tags={
            TAG_PARENT: meta.parent_run_id, TAG_SEARCH: NAME, TAG_ROLE: "trial", TAG_TRIAL_ID: trial_id,
            TAG_KIND: "stochastic", TAG_STATE: state, TAG_STOPPED_EPOCH: "1" if state == "pruned" else "0",
            **({TAG_EPOCHS: "1", TAG_REPORTS: "1"} if state == "pruned" else {}),
            **({TAG_ERROR: "RuntimeError: boom"} if state == "failed" else {})})
        params = [Param(k, v) for k, v in some.data.params.items()]
        params = [Param(p.key, "stochastic") if p.key == "modulation.kind" else p for p in params]
        client.log_batch(run.info.run_id, params=params)
        if state == "pruned":
            client.log_batch(run.info.run_id, metrics=[
                Metric("pretrain/val/mean_f1", 0.99, 0, 3), Metric(METRIC, 0.99, 0, 3)])
        client.set_terminated(run.info.run_id, "FINISHED" if state == "pruned" else "FAILED")
        ids[trial_id] = run.info.run_id
    return ids


@pytest.fixture(scope="module")
def search(finished_search):
    searched = finished_search(_search_file(), NAME, "--json")
    synthetic = _add_incomplete_runs(searched["home"])
    return {"home": searched["home"], "summary": json.loads(searched["done"].stdout), "synthetic": synthetic}


@pytest.fixture
def at_home(search, monkeypatch):
    """This test's $COMOD_HOME is the search's runs folder (the root conftest gives each test its own)."""
    monkeypatch.setenv("COMOD_HOME", str(search["home"]))
    return search


def _trial_folders(home: Path) -> dict[str, Path]:
    return {p.name: p for p in (home / "searches" / NAME / "trials").iterdir() if (p / "metrics.json").exists()}


def _final(folder: Path) -> dict:
    return json.loads((folder / "metrics.json").read_text())


def _parent_artifacts(home: Path, folder: str) -> set[str]:
    meta = SearchPaths(NAME, home).read_meta()
    return {Path(a.path).name for a in MlflowClient(meta.tracking_uri).list_artifacts(meta.parent_run_id, folder)}


# ------------------------------------------------------------------- trials

def test_trials_table_is_typed_one_row_per_trial(at_home, tmp_path):
    from comod_platform.export import export_trials, trials_table

    home = at_home["home"]
    assert at_home["summary"]["completed"] == 6, at_home["summary"]
    out = export_trials(NAME, tmp_path / "t" / "trials.parquet")
    table = pq.read_table(out)
    assert table.schema.equals(trials_table(NAME).schema)
    types = {f.name: f.type for f in table.schema}
    expected = {"seed": pa.int64(), "modulation.kind": pa.string(), "modulation.noise_scale": pa.float64(),
                "model.residual": pa.bool_(), "modulation.sites": pa.list_(pa.string()),
                "model.decoder_hidden": pa.list_(pa.int64()), "data.root": pa.string(),
                "finetune.lr.controller": pa.float64(), "data.train_limit": pa.int64(),
                "test/mean_f1": pa.float64(), "test/pattern_0/f1": pa.float64(), f"best/{METRIC}": pa.float64(),
                "epochs": pa.int64(), "stopped_epoch": pa.int64(), "wall_seconds": pa.float64(),
                "state": pa.string(), "run_id": pa.string(), "trial_id": pa.string()}
    assert {k: types.get(k) for k in expected} == expected

    rows = {r["trial_id"]: r for r in table.to_pylist()}
    folders = _trial_folders(home)
    assert len(rows) == table.num_rows == 6 + 2 and set(folders) <= set(rows)
    for trial_id, folder in folders.items():
        row = rows[trial_id]
        cfg = flatten(load_config(folder / "config.yaml"))
        assert {k: row[k] for k in cfg} == cfg
        assert row["state"] == "completed" and row["epochs"] >= 1 and row["wall_seconds"] > 0
        final = _final(folder)
        assert row["test/mean_f1"] == pytest.approx(final["test/mean_f1"])
        assert row[METRIC] == pytest.approx(final[METRIC])
        assert row[f"best/{METRIC}"] is not None
    pruned, failed = rows["synthpruned"], rows["synthfailed"]
    assert pruned["state"] == "pruned" and pruned["test/mean_f1"] is None and pruned[METRIC] is None
    assert pruned[f"best/{METRIC}"] == pytest.approx(0.99) and pruned["stopped_epoch"] == 1 and pruned["epochs"] == 1
    assert failed["state"] == "failed" and failed[f"best/{METRIC}"] is None and "boom" in failed["error"]
    assert failed["modulation.kind"] == "stochastic" and failed["seed"] in (0, 1)
    assert "trials.parquet" in _parent_artifacts(home, "export")


# ------------------------------------------------------------------- best

def test_export_best_writes_a_config_comod_train_runs(at_home, tmp_path, one_thread):
    from comod.train import run_experiment
    from comod_platform.export import export_best

    folders = _trial_folders(at_home["home"])
    top = max(_final(f)[METRIC] for f in folders.values())
    out = tmp_path / "best.yaml"
    result = export_best(NAME, out, overrides=["finetune.epochs=3"], seeds=[7])
    assert result["value"] == pytest.approx(top) and result["trial_id"] in folders  # ties: any trial at the top
    expected = apply_overrides(config_to_dict(load_config(folders[result["trial_id"]] / "config.yaml")),
                               ["finetune.epochs=3"])
    cfg = load_config(out)
    assert config_to_dict(cfg) == config_to_dict(parse_config(expected))
    assert yaml.safe_load(out.read_text())["finetune"]["epochs"] == 3  # plain YAML; the comments are provenance
    seeded = load_config(tmp_path / "best-seed7.yaml")
    assert seeded.seed == 7 and seeded.finetune.epochs == 3
    assert result["seed_files"] == [str(tmp_path / "best-seed7.yaml")]

    metrics = run_experiment(cfg, tmp_path / "train")  # what `comod train best.yaml` runs
    assert 0.0 <= metrics["test/mean_f1"] <= 1.0 and (tmp_path / "train" / "metrics.json").exists()


def test_top_k_reevaluation_picks_the_best_mean_over_seeds(at_home, tmp_path, one_thread):
    from comod_platform.export import export_best

    out = tmp_path / "best.yaml"
    seeds = [11, 12]
    result = export_best(NAME, out, top_k=2, reeval_seeds=seeds)
    reeval = result["reeval"]
    report = json.loads((tmp_path / "best.reeval.json").read_text())
    assert report["seeds"] == seeds and len(report["candidates"]) == 2
    for row in report["candidates"]:
        assert [r["seed"] for r in row["runs"]] == seeds
        assert row["mean"] == pytest.approx(sum(r["value"] for r in row["runs"]) / len(seeds))
        for run in row["runs"]:
            assert json.loads((Path(run["folder"]) / "metrics.json").read_text())[METRIC] == pytest.approx(run["value"])
            assert load_config(Path(run["folder"]) / "config.yaml").seed == run["seed"]
    # two distinct configs (the seed aside), the chosen one has the best mean
    kinds = {row["kind"] for row in report["candidates"]}
    assert len(kinds) == 2
    best = max(report["candidates"], key=lambda r: r["mean"])
    assert reeval["chosen"] == result["trial_id"] and best["mean"] == report["candidates"][0]["mean"]
    assert result["trial_id"] == report["candidates"][0]["trial_id"]
    md = (tmp_path / "best.reeval.md").read_text()
    assert all(row["trial_id"] in md for row in report["candidates"]) and "seed 11" in md and "seed 12" in md
    chosen_cfg = load_config(_trial_folders(at_home["home"])[result["trial_id"]] / "config.yaml")
    assert config_to_dict(load_config(out)) == config_to_dict(chosen_cfg)
    assert {"best.reeval.md", "best.reeval.json"} <= _parent_artifacts(at_home["home"], "export")


# ------------------------------------------------------------------- compare

def test_compare_reports_kinds_pairs_and_win_rates(at_home, tmp_path):
    from comod_platform.compare import compare

    home = at_home["home"]
    report = compare(NAME, out_dir=tmp_path / "cmp")
    for name in ("compare.md", "distribution.png", "paired.png", "win_rates.png"):
        assert (tmp_path / "cmp" / name).stat().st_size > 0, name
    assert {"compare.md", "distribution.png", "paired.png"} <= _parent_artifacts(home, "compare")

    finals = {tid: (load_config(f / "config.yaml"), _final(f)) for tid, f in _trial_folders(home).items()}
    for kind in ("none", "deterministic", "stochastic"):
        values = [m[METRIC] for c, m in finals.values() if c.modulation.kind == kind]
        assert report["distribution"][kind]["n"] == len(values) == 2
        assert report["best"][kind]["value"] == pytest.approx(max(values))
        assert report["distribution"][kind]["mean"] == pytest.approx(sum(values) / len(values))
        assert set(report["best"][kind]["test"]) >= {"test/mean_f1", "test/mean_accuracy"}
    assert report["counts"]["stochastic"]["pruned"] == 1 and report["counts"]["stochastic"]["failed"] == 1

    paired = report["paired"]["stochastic-deterministic"]
    assert paired["n"] >= 1, f"no stochastic/deterministic pairs: {report['notes']}"
    assert paired["n"] == 2  # one per seed
    by_seed_kind = {(c.seed, c.modulation.kind): m for c, m in finals.values()}
    expected = sorted(by_seed_kind[(s, "stochastic")][METRIC] - by_seed_kind[(s, "deterministic")][METRIC]
                      for s in (0, 1))
    assert sorted(paired["differences"]) == pytest.approx(expected)
    from scipy import stats

    from comod_platform.stats import sign_flip_test

    assert paired["ci95"] == pytest.approx(list(stats.ttest_1samp(expected, 0).confidence_interval(0.95)))
    lo, hi = paired["bootstrap_ci95"]
    assert min(expected) - 1e-12 <= lo <= paired["mean"] <= hi <= max(expected) + 1e-12
    assert paired["p_sign_flip"] == sign_flip_test(expected)["p"] and paired["p_sign_flip"] in (0.5, 1.0)
    first = next(iter(finals.values()))[1]
    tasks = {k.split("/")[1] for k in first if k.startswith("test/pattern_") and k.endswith("/f1")}
    assert set(report["win_rates"]) == tasks
    for task, w in report["win_rates"].items():
        key = f"test/{task}/f1"
        wins = sum(by_seed_kind[(s, "stochastic")][key] > by_seed_kind[(s, "deterministic")][key] for s in (0, 1))
        assert (w["n"], w["wins"], w["rate"]) == (2, wins, wins / 2)
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert "stochastic - deterministic" in md and "win rate" in md.lower()
    assert "- stochastic - deterministic: fewer than 8 seeds: the interval is rough (2 pairs;" in md


# ------------------------------------------------------------------- bad input

def test_unknown_search_names_the_known_ones(at_home, tmp_path):
    from comod_platform.compare import compare
    from comod_platform.export import export_best, export_trials

    for call in (lambda: export_best("nope", tmp_path / "b.yaml"), lambda: export_trials("nope", tmp_path / "t.pq"),
                 lambda: compare("nope")):
        with pytest.raises(SearchNotFound, match=f"'nope'.*{NAME}"):
            call()


def test_no_completed_trial_is_a_clear_error(home, tmp_path):
    """A search whose only trial failed: export best refuses, compare says there is nothing to compare."""
    from comod_platform.compare import compare
    from comod_platform.export import ExportError, export_best
    from comod_platform.tracking import setup, tracking_uri

    name = "allfailed"
    paths = SearchPaths(name)
    paths.root.mkdir(parents=True)
    shutil.copyfile(REPO / "search_spaces" / "tiny.yaml", paths.search_file)
    experiment_id = setup(experiment_name(name))
    client = MlflowClient(tracking_uri())
    parent = client.create_run(experiment_id, tags={TAG_SEARCH: name, TAG_ROLE: "search"}).info.run_id
    client.create_run(experiment_id, tags={TAG_PARENT: parent, TAG_SEARCH: name, TAG_ROLE: "trial",
                                           TAG_TRIAL_ID: "t1", TAG_KIND: "stochastic", TAG_STATE: "failed"})
    paths.write_meta(SearchMeta(name=name, study_name=name, optuna_storage="sqlite://", tracking_uri=tracking_uri(),
                                experiment_id=experiment_id, parent_run_id=parent, ray_storage=str(paths.ray_storage),
                                created=0.0))
    with pytest.raises(ExportError, match="no completed trial.*1 failed"):
        export_best(name, tmp_path / "best.yaml")
    assert not (tmp_path / "best.yaml").exists()
    report = compare(name, out_dir=tmp_path / "cmp")
    assert report["completed"] == 0 and any("nothing to compare" in n for n in report["notes"])
    assert "nothing to compare" in (tmp_path / "cmp" / "compare.md").read_text()


def test_compare_where_keeps_one_arm_and_refuses_what_no_trial_has(at_home, tmp_path, capsys):
    from comod_platform.cli import main

    assert main(["compare", NAME, "--out", str(tmp_path / "seed0"), "--where", "seed=0"]) == 0
    report = json.loads((tmp_path / "seed0" / "compare.json").read_text())
    assert report["where"] == {"seed": 0}
    assert {d["n"] for d in report["distribution"].values() if d["n"]} == {1}  # one seed: one trial per kind
    assert "of those with `seed=0`" in (tmp_path / "seed0" / "compare.md").read_text()
    capsys.readouterr()
    assert main(["compare", NAME, "--where", "seed=7"]) != 0
    assert "--where seed=7: no trial has it; its values: 0, 1" in capsys.readouterr().err
    assert main(["compare", NAME, "--where", "sed=0"]) != 0
    assert "--where sed: not a setting" in capsys.readouterr().err
