"""The end of `comod search run|resume` (a short summary, or `--json`), `comod search status` with a conditional
setting, `comod compare`'s parameter importances and a local search's quiet terminal.

The fast tests build the summary text, the trial-error line and Optuna's importances on a real Optuna study in
SQLite. The rest share one real search (a real local Ray, Optuna and MLflow on SQLite, through
`.venv/bin/comod`): a grid over modulation.kind x seed, so every kind has four completed trials that differ
only in the seed, with modulation.noise_scale set (`when`) for stochastic trials only.
"""
from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

import optuna
import pytest
import yaml

from comod_platform.cli_search import format_summary
from comod_platform.search_state import SearchMeta, SearchPaths
from comod_platform.searchfile import parse_search
from searches import TINY, run_comod

NAME = "summary"
SEEDS = 4
OLD_KEYS = {"name", "trials", "completed", "pruned", "failed", "best", "metric"}
"""The keys of `--json` before the text summary existed: scripts read them."""


# ------------------------------------------------------------------- the summary text (no Ray)

def test_summary_text_has_states_best_per_kind_failures_and_next_commands():
    summary = {"name": "demo", "trials": 5, "completed": 2, "pruned": 1, "failed": 1, "metric": "val/mean_f1",
               "best": {"value": 0.91, "trial_id": "a_00001"},
               "best_per_kind": {"none": None,
                                 "deterministic": {"trial_id": "a_00000", "value": 0.8, "test/mean_f1": 0.75,
                                                   "test/mean_recall": 0.7, "test/mean_precision": 0.81},
                                 "stochastic": {"trial_id": "a_00001", "value": 0.91, "test/mean_f1": 0.88,
                                                "test/mean_recall": 0.86, "test/mean_precision": 0.9}},
               "failures": [{"trial_id": "a_00003", "error": "ValueError: no_such_task is not a task"}]}
    text = format_summary(summary)
    lines = text.splitlines()
    assert lines[0] == "search demo: 5 trials: 2 completed, 1 stopped early, 1 failed, 1 not finished"
    assert "{" not in text  # a person's summary, not the JSON
    header = next(line for line in lines if line.strip().startswith("kind"))
    assert header.split() == ["kind", "trial", "val/mean_f1", "test", "F1", "test", "recall", "test", "precision"]
    rows = {line.split()[0]: line.split() for line in lines[lines.index(header) + 1:lines.index(header) + 4]}
    assert rows["stochastic"] == ["stochastic", "a_00001", "0.9100", "0.8800", "0.8600", "0.9000"]
    assert rows["deterministic"][1:] == ["a_00000", "0.8000", "0.7500", "0.7000", "0.8100"]
    assert rows["none"][1:3] == ["none", "completed"]
    assert "  a_00003: ValueError: no_such_task is not a task" in lines
    for command in ("comod ui demo --open", "comod search status demo", "comod export best demo --out best.yaml",
                    "comod compare demo", "comod dashboard demo"):
        assert any(line.strip().startswith(command) for line in lines), command


def test_a_failed_trials_ray_traceback_becomes_one_comod_line(capsys):
    """Quiet Ray: its WARNING lines go, its errors stay, a failed trial's traceback is one line of comod's."""
    import warnings

    import ray  # noqa: F401 - installs Ray's handler on the "ray" logger, as in a search's driver

    from comod_platform.tuner import quiet_ray

    ray_logger = logging.getLogger("ray")
    level, handlers = ray_logger.level, list(ray_logger.handlers)
    saved_warnings = warnings.filters[:]
    try:
        quiet_ray()
        logging.getLogger("ray").warning("Token authentication is enabled for this Ray cluster.")
        logging.getLogger("ray.tune.tune").info("some progress")
        try:
            raise RuntimeError("Traceback (most recent call last):\n  File x\nValueError: no_such_task")
        except RuntimeError as err:
            logging.getLogger("ray.tune.execution.tune_controller").error(
                "Trial task failed for trial run_trial_ab12c_00003", exc_info=err)
        logging.getLogger("ray.tune.tune").error("Trials did not complete: %s", ["run_trial_ab12c_00003"])
        logging.getLogger("ray.tune").error("the experiment state could not be saved")
    finally:
        ray_logger.setLevel(level)
        ray_logger.handlers[:] = handlers
        warnings.filters[:] = saved_warnings
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "comod: trial ab12c_00003 failed: ValueError: no_such_task"  # the trial id, as comod shows it
    assert err[1:] == ["ray: ERROR: the experiment state could not be saved"]
    assert not any("Token" in line or "progress" in line for line in err)


# ------------------------------------------------------------------- importances on a real study (no Ray)

def _grid_search_file(kinds=("deterministic", "stochastic"), seeds=SEEDS) -> dict:
    raw = json.loads(json.dumps(TINY))
    raw["space"] = {"modulation.kind": {"type": "categorical", "choices": list(kinds)},
                    "modulation.noise_scale": {"type": "categorical", "choices": [0.3],
                                               "when": {"modulation.kind": "stochastic"}},
                    "seed": {"type": "int", "low": 0, "high": seeds - 1}}
    if "stochastic" not in kinds:  # a condition no kind meets is refused
        del raw["space"]["modulation.noise_scale"]
    raw["search"].update(sampler="grid", num_trials=len(kinds) * seeds, scheduler={"type": "fifo"},
                         max_concurrent=2)
    return raw


def _results_with_study(tmp_path: Path, raw: dict, value, name: str = "imp", home: Path | None = None):
    """A search's results (no MLflow trials needed) whose Optuna study in SQLite holds the grid's trials told
    ``value(flat)``; returns (results, study)."""
    from comod_platform.results import SearchResults

    sf = parse_search(raw, name)
    paths = SearchPaths(name, home or tmp_path)
    paths.root.mkdir(parents=True)
    url = f"sqlite:///{paths.optuna_db}"
    study = optuna.create_study(study_name=name, storage=url, direction="maximize")
    for point in sf.grid_points():
        study.enqueue_trial(point)
    for _ in sf.grid_points():
        trial = study.ask()
        study.tell(trial, value(sf.suggest(trial)))
    meta = SearchMeta(name=name, study_name=name, optuna_storage=url, tracking_uri="sqlite://", experiment_id="0",
                      parent_run_id="", ray_storage=str(paths.ray_storage), created=0.0)
    return SearchResults(name=name, paths=paths, meta=meta, search=sf, trials=[]), study


def test_importances_per_kind_of_a_grid_over_kinds_and_seeds(tmp_path):
    from comod_platform.compare import importances
    from comod_platform.report import importances_section

    def value(flat):  # the kind matters most, the seed a little, more so for stochastic
        return {"deterministic": 0.5, "stochastic": 0.7}[flat["modulation.kind"]] + 0.01 * flat["seed"] ** 2

    results, study = _results_with_study(tmp_path, _grid_search_file(), value)
    imp = importances(results)
    assert imp["metric"] == "val/mean_f1" and imp["study"] == "imp" and "fANOVA" in imp["evaluator"]
    assert list(imp["kinds"]) == ["deterministic", "stochastic"]
    for kind in ("deterministic", "stochastic"):
        entry = imp["kinds"][kind]
        # within a kind only the seed varied (the noise scale has one value): all of the variation is the seed's
        assert entry["trials"] == SEEDS and entry["note"] is None
        assert entry["params"] == {"seed": pytest.approx(1.0)}
    overall = imp["all"]
    assert overall["trials"] == 2 * SEEDS and set(overall["params"]) == {"modulation.kind", "seed"}
    assert math.isclose(sum(overall["params"].values()), 1.0, rel_tol=1e-6)
    assert list(overall["params"])[0] == "modulation.kind"  # largest first
    expected = optuna.importance.get_param_importances(
        study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0), params=["modulation.kind", "seed"])
    assert overall["params"] == pytest.approx(dict(expected))
    assert importances(results) == imp  # seeded: the same numbers every time
    md = "\n".join(importances_section(imp))
    assert "## Parameter importances" in md and "| deterministic | 4 | `seed` | 1.000 |" in md
    assert "| all kinds | 8 | `modulation.kind` |" in md


def test_importances_note_too_few_trials_no_variation_and_an_unreadable_study(tmp_path):
    from comod_platform.compare import importances

    raw = _grid_search_file(kinds=("none", "deterministic"), seeds=3)
    results, _ = _results_with_study(tmp_path, raw, lambda flat: 0.5)
    imp = importances(results, metric="test/mean_f1")
    assert imp["kinds"]["none"] == {"trials": 3, "params": None,
                                    "note": "3 completed trial(s); importances need at least 4"}
    assert imp["all"]["trials"] == 6 and imp["all"]["params"] is None
    assert imp["all"]["note"].startswith("no importances")  # the metric is the same in every trial
    assert any("not of `test/mean_f1`" in n for n in imp["notes"])

    raw = _grid_search_file(kinds=("stochastic",), seeds=1)
    results, _ = _results_with_study(tmp_path / "one", raw, lambda flat: 0.5, name="one")
    one = importances(results, min_trials=1)
    assert one["kinds"]["stochastic"]["note"] == ("no searched setting took more than one value among the "
                                                  "completed trials")
    assert one["all"] is None  # one kind: nothing to add

    results.paths.optuna_db.unlink()
    gone = importances(results)
    assert gone["kinds"] == {} and any("cannot be read" in n and "no Optuna database" in n for n in gone["notes"])
    assert not results.paths.optuna_db.exists()  # not made anew by reading


# ------------------------------------------------------------------- one real search through the CLI

def _ray_lines(stderr: str) -> list[str]:
    """Lines of a local search's stderr that are not comod's own ([search] status lines, comod: messages)."""
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith(("[search]", "comod:"))]


@pytest.fixture(scope="module")
def searched(finished_search):
    return finished_search(_grid_search_file(), NAME)


def _finals(home: Path) -> dict[str, tuple[dict, dict]]:
    """trial id -> (its config, its final metrics), from the trial folders."""
    out = {}
    for folder in (home / "searches" / NAME / "trials").iterdir():
        if (folder / "metrics.json").exists():
            out[folder.name] = (yaml.safe_load((folder / "config.yaml").read_text()),
                                json.loads((folder / "metrics.json").read_text()))
    return out


def test_search_run_ends_with_a_summary_and_ray_stays_quiet(searched):
    done, home = searched["done"], searched["home"]
    lines = done.stdout.splitlines()
    assert lines[0] == f"search {NAME}: 8 trials: 8 completed, 0 stopped early, 0 failed", done.stdout
    assert "{" not in done.stdout
    header = next(i for i, line in enumerate(lines) if line.split()[:3] == ["kind", "trial", "val/mean_f1"])
    finals = _finals(home)
    assert len(finals) == 8
    for line in lines[header + 1:header + 3]:
        kind, trial_id, value, f1, recall, precision = line.split()
        config, final = finals[trial_id]
        assert config["modulation"]["kind"] == kind
        best = max(m["val/mean_f1"] for c, m in finals.values() if c["modulation"]["kind"] == kind)
        assert float(value) == pytest.approx(best, abs=5e-5) == pytest.approx(final["val/mean_f1"], abs=5e-5)
        assert [float(f1), float(recall), float(precision)] == pytest.approx(
            [final["test/mean_f1"], final["test/mean_recall"], final["test/mean_precision"]], abs=5e-5)
    assert {line.split()[0] for line in lines[header + 1:header + 3]} == {"deterministic", "stochastic"}
    for command in (f"comod ui {NAME} --open", f"comod search status {NAME}", f"comod export best {NAME} --out best.yaml",
                    f"comod compare {NAME}"):
        assert any(line.strip().startswith(command) for line in lines), command
    # nothing of Ray's own on the terminal: its notices, log lines and workers' output
    assert _ray_lines(done.stderr) == [], done.stderr[-3000:]
    assert "[search]" in done.stderr


def test_status_leaves_a_setting_the_trial_did_not_sample_blank(searched):
    done = run_comod(["search", "status", NAME], searched["env"])
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    header = lines[0]
    column = header.index("modulation.noise_scale")
    width = header.index("seed") - column
    kind_at = header.index("modulation.kind")
    rows = [line for line in lines[1:] if line and not line.startswith(("8 trials",))]
    assert len(rows) == 8 and "8 trials of 8: 8 completed" in done.stdout
    seen = {}
    for row in rows:
        kind = row[kind_at:column].strip()
        seen.setdefault(kind, set()).add(row[column:column + width].strip())
    # deterministic trials never sampled the noise scale: blank, not the base experiment's 0.1
    assert seen == {"deterministic": {""}, "stochastic": {"0.3"}}, done.stdout


def test_compare_reports_and_logs_parameter_importances(searched, tmp_path):
    from mlflow.tracking import MlflowClient

    out = tmp_path / "cmp"
    done = run_comod(["compare", NAME, "--out", str(out)], searched["env"])
    assert done.returncode == 0, done.stderr[-2000:]
    assert "## Parameter importances" in done.stdout and "## Paired differences" in done.stdout
    report = json.loads((out / "compare.json").read_text())
    assert report["paired"]["stochastic-deterministic"]["n"] == SEEDS  # compare's own numbers are still there
    imp = report["importances"]
    for kind in ("deterministic", "stochastic"):
        assert imp["kinds"][kind]["trials"] == SEEDS
        if imp["kinds"][kind]["params"] is not None:  # None only when the 4 seeds scored the same
            assert imp["kinds"][kind]["params"] == {"seed": pytest.approx(1.0)}
        else:
            assert imp["kinds"][kind]["note"].startswith("no importances")
    assert imp["all"]["trials"] == 2 * SEEDS
    assert json.loads((out / "importances.json").read_text()) == imp
    meta = SearchPaths(NAME, searched["home"]).read_meta()
    client = MlflowClient(meta.tracking_uri)
    logged = {Path(a.path).name for a in client.list_artifacts(meta.parent_run_id, "compare")}
    assert {"compare.md", "compare.json", "importances.json"} <= logged
    copy = client.download_artifacts(meta.parent_run_id, "compare/importances.json", str(tmp_path))
    assert json.loads(Path(copy).read_text()) == imp


def test_resume_json_keeps_the_keys_scripts_read(searched):
    done = run_comod(["search", "resume", NAME, "--json"], searched["env"])
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)  # only the JSON on stdout
    assert OLD_KEYS <= set(summary)
    assert (summary["name"], summary["trials"], summary["completed"], summary["metric"]) == (NAME, 8, 8,
                                                                                               "val/mean_f1")
    assert set(summary["best_per_kind"]) == {"deterministic", "stochastic"} and summary["failures"] == []
    finals = _finals(searched["home"])
    assert summary["best"]["value"] == pytest.approx(max(m["val/mean_f1"] for _, m in finals.values()))
    assert _ray_lines(done.stderr) == [], done.stderr[-3000:]


def test_verbose_lets_rays_output_through(searched):
    done = run_comod(["search", "resume", NAME, "--verbose"], searched["env"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith(f"search {NAME}: 8 trials: 8 completed")
    assert _ray_lines(done.stderr), done.stderr  # Ray's own lines, asked for
    assert re.search(r"Ray|ray", done.stderr)


def test_a_search_file_that_fails_its_checks_prints_only_the_error(searched, tmp_path):
    raw = _grid_search_file()
    raw["space"] = {"modulation.noise_scal": {"type": "float", "low": 0.1, "high": 1.0}}
    raw["search"].update(sampler="random", num_trials=2)
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    done = run_comod(["search", "run", str(path)], searched["env"])
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == ["comod: error: space.modulation.noise_scal: not a setting of the "
                                        "experiment; did you mean modulation.noise_scale?"], done.stderr
