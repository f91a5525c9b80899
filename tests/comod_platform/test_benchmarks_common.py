"""The benchmarks' pure parts, without running a benchmark: benchmarks/_common.py's helpers, the targets
and RESULT line of platform_overhead.py, and vs_hand_written.py's hand-written search space (the same
Optuna trials as comod's translation of the search file) and report."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import yaml

from comod.config import flatten
from comod_platform.searchfile import load_search, parse_search

REPO = Path(__file__).resolve().parents[2]
BENCHMARKS = REPO / "benchmarks"


def _load(name: str):
    """benchmarks/NAME.py as a module (the scripts put their folder on sys.path: undone here)."""
    saved = list(sys.path)
    try:
        spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = saved
    return module


@pytest.fixture(scope="module")
def common():
    return _load("_common")


@pytest.fixture(scope="module")
def overhead():
    return _load("platform_overhead")


@pytest.fixture(scope="module")
def vs():
    return _load("vs_hand_written")


@pytest.fixture(scope="module")
def scale():
    return _load("scale")


# ------------------------------------------------------------------- _common

def test_results_go_to_out_or_the_results_folder_and_nowhere_for_a_quick_check(common, tmp_path, capsys):
    assert common.results_folder(None, quick=True) is None
    assert common.results_folder(None, quick=False) == BENCHMARKS / "results" == common.RESULTS
    assert common.results_folder(tmp_path, quick=True) == tmp_path
    common.write_results(tmp_path / "new", "bench", {"ratio": 0.25}, "# bench\n")
    assert json.loads((tmp_path / "new" / "bench.json").read_text()) == {"ratio": 0.25}
    assert (tmp_path / "new" / "bench.md").read_text() == "# bench\n"
    assert capsys.readouterr().out == f"wrote {tmp_path / 'new' / 'bench'}.json and .md\n"


def test_clean_env_drops_the_callers_stores_and_threads(common, monkeypatch):
    for name in common.CALLER_SETTINGS:
        monkeypatch.setenv(name, "from-the-shell")
    monkeypatch.setenv("COMOD_BENCH_KEPT", "1")
    env = common.clean_env(RAY_TMPDIR="/tmp/x")
    assert not set(common.CALLER_SETTINGS) & set(env)
    assert env["COMOD_BENCH_KEPT"] == "1" and env["RAY_TMPDIR"] == "/tmp/x" and env["PYTHONUNBUFFERED"] == "1"


def test_processes_naming_a_temp_dir_in_their_environment_or_command_line_are_killed(common, tmp_path):
    marker = str(tmp_path / f"ray-{uuid.uuid4().hex[:8]}")
    by_env = subprocess.Popen(["sleep", "60"], env={**os.environ, "RAY_TMPDIR": marker})
    by_cmdline = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", marker])
    other = subprocess.Popen(["sleep", "60"])
    try:
        time.sleep(0.5)  # exec'd: their /proc entries show their own command lines and environments
        assert common.kill_processes_mentioning(marker) == 2
        assert by_env.wait(10) == -9 and by_cmdline.wait(10) == -9
        assert other.poll() is None
    finally:
        for proc in (by_env, by_cmdline, other):
            proc.kill()
            proc.wait()


def test_load_is_sampled_and_not_waited_for_when_low_enough(common):
    with common.LoadSampler(every=0.05) as load:
        time.sleep(0.12)
    summary = load.summary()
    assert len(load.samples) >= 2 and summary["min"] <= summary["mean"] <= summary["max"]
    waited = common.wait_for_load(limit=1e9, max_wait=60)
    assert waited["waited_s"] < 1 and waited["reached"] and waited["limit"] == 1e9


# ------------------------------------------------------------------- platform_overhead

def _overhead_summary(**changes) -> dict:
    s = {"ratio": 1.62, "window_ratio": 1.07, "idle_gap_ms": 41, "floor_ratio": 1.55, "platform_over_floor": 1.045}
    s.update(changes)
    return {k: v for k, v in s.items() if v is not None}


def test_platform_overhead_warms_up_unless_told_or_quick(overhead):
    """An untimed round first (bytecode, page cache); a quick smoke check or --no-warmup skips it."""
    assert overhead.parse_args([]).warmup is True
    assert overhead.parse_args(["--no-warmup"]).warmup is False
    assert overhead.parse_args(["--quick"]).warmup is False


def test_platform_overhead_guard_and_its_result_line(overhead):
    s = _overhead_summary()
    s.update(overhead.checks(s))
    assert s["targets"] == {"platform_over_floor": 1.10}
    assert s["retired"] == {"window_ratio": 1.10, "idle_gap_ms": 70}
    assert s["checks"] == {"platform_over_floor": True} and s["pass"]
    assert overhead.result_line(s) == "RESULT platform/bare_ray=1.045 window_platform/plain=1.070 idle_gap_ms=41"
    lines = overhead.target_lines(s)
    assert lines[:3] == ["PASS: whole command platform / bare Ray Tune = 1.045 (the median of the repeats' paired "
                         "ratios; guard <= 1.1)",
                         "reported: trials' window platform / plain = 1.070 (a retired target, <= 1.1)",
                         "reported: idle gap per trial slot = 41 ms (a retired target, <= 70)"]
    # the whole command against the plain loop: reported, and why it is no target here
    assert lines[3].startswith("whole command platform / plain = 1.620, reported, not a target")
    assert "bare Ray Tune / plain, is 1.550" in lines[3] and "1.15" in lines[3]

    # a slow window or gap no longer fails the run; only the guard does
    slow = _overhead_summary(window_ratio=1.2, idle_gap_ms=71)
    slow.update(overhead.checks(slow))
    assert slow["pass"]
    over = _overhead_summary(platform_over_floor=1.12)
    over.update(overhead.checks(over))
    assert over["checks"] == {"platform_over_floor": False} and not over["pass"]
    assert overhead.target_lines(over)[0].startswith("MISS: whole command platform / bare Ray Tune = 1.120")


def test_platform_overhead_says_what_bare_ray_tune_reaches_and_where_comods_extra_lies(overhead):
    side = lambda wall, start, window, gap: {"wall_s": wall, "startup_s": start, "window_s": window,  # noqa: E731
                                             "tail_s": wall - start - window, "mean_trial_s": 1.0,
                                             "mean_gap_s": gap}
    pairs = [{"platform": side(44.0, 15.0, 26.0, 0.15), "floor": side(40.0, 14.0, 24.0, 0.10),
              "plain": side(27.0, 3.0, 23.8, 0.07)},
             {"platform": side(42.0, 15.0, 25.0, 0.13), "floor": side(38.0, 13.0, 22.0, 0.08),
              "plain": side(27.0, 3.0, 23.2, 0.07)}]
    # a third repeat disturbed by other load on the bare Ray Tune side: the median of the paired ratios holds
    pairs.append({"platform": side(43.0, 15.0, 25.5, 0.14), "floor": side(60.0, 14.0, 40.0, 0.10),
                  "plain": side(27.0, 3.0, 23.5, 0.07)})
    s = overhead.summarise(pairs, SimpleNamespace(trials=40, concurrency=2))
    assert s["platform_over_floor_per_repeat"] == [1.1, 1.105, 0.717] and s["platform_over_floor"] == 1.1
    assert s["platform_over_floor_mean_walls"] == 0.935 and s["floor_window_ratio"] == 1.22
    assert s["floor_idle_gap_ms"] == 93 and s["over_floor_s"] == {"startup": 1.33, "window": -3.17, "tail": -1.17}
    lines = overhead.target_lines(s)
    assert lines[3] == ("bare Ray Tune itself: trials' window / plain = 1.220, idle gap 93 ms per trial slot; "
                        "platform / bare Ray Tune per repeat [1.1, 1.105, 0.717] (ratio of the mean walls 0.935); "
                        "comod over bare Ray Tune: start-up +1.3 s, window -3.2 s, tail -1.2 s")
    assert lines[4].startswith("whole command platform / plain")


def test_platform_overhead_without_the_floor(overhead):
    s = _overhead_summary(floor_ratio=None, platform_over_floor=None)
    s.update(overhead.checks(s))
    assert s["checks"]["platform_over_floor"] is None and not s["pass"]  # the headline was not measured
    assert overhead.result_line(s) == "RESULT platform/bare_ray=nan window_platform/plain=1.070 idle_gap_ms=41"
    assert overhead.target_lines(s)[0].startswith("NOT MEASURED: whole command platform / bare Ray Tune = -")


# ------------------------------------------------------------------- compare_trees

def test_compare_trees_runs_each_checkouts_code_and_pairs_the_walls(tmp_path, monkeypatch):
    trees = _load("compare_trees")
    seen = []

    def run_platform(search, work, args, env=None, cwd=None):  # the overhead benchmark's timed search run
        seen.append((cwd, env, search.exists()))
        return {"wall_s": 1.0}

    monkeypatch.setattr(trees.po, "run_platform", run_platform)
    args = SimpleNamespace(trials=4, concurrency=2, steps_per_epoch=3, epochs=1, cluster=None)
    trees.run(tmp_path / "old", args)
    assert seen == [(tmp_path / "old", {"PYTHONPATH": f"{tmp_path / 'old' / 'platform'}:{tmp_path / 'old'}"}, True)]
    # a repeat disturbed on one side moves the mean walls, not the median of the pairs
    r = trees.ratios([40.0, 40.0, 40.0], [42.0, 41.0, 80.0])
    assert r == {"per_repeat": [1.05, 1.025, 2.0], "median": 1.05, "mean_walls": 1.358}


# ------------------------------------------------------------------- vs_hand_written

SITES_SPACE = {
    "modulation.kind": {"type": "categorical", "choices": ["none", "deterministic", "stochastic"]},
    "modulation.noise_scale": {"type": "float", "low": 0.1, "high": 1.0, "log": True,
                               "when": {"modulation.kind": "stochastic"}},
    "modulation.sites": {"type": "categorical", "choices": [["layer2"], ["layer3"], ["layer2", "layer3"]]},
    "seed": {"type": "int", "low": 0, "high": 4, "step": 2},
    "finetune.lr.controller": {"type": "float", "low": 1.0e-3, "high": 1.0e-1, "step": 1.0e-3},
}


def _trials(suggest, sampler_seed: int, n: int = 12):
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=sampler_seed), direction="maximize")
    out = []
    for _ in range(n):
        trial = study.ask()
        out.append((suggest(trial), trial.distributions))
        study.tell(trial, 0.0)
    return out


@pytest.mark.parametrize("source", ["quickstart_tpe", "tiny", "sites"])
def test_the_hand_written_space_asks_optuna_what_comod_asks(vs, source):
    """The same seeded sampler draws the same trials from both: same paths, distributions and values,
    conditional paths only where their condition holds."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if source == "sites":
        raw = yaml.safe_load((REPO / "search_spaces" / "tiny.yaml").read_text())
        raw["space"] = SITES_SPACE
        search = parse_search(raw, "sites")
    else:
        raw = yaml.safe_load((REPO / "search_spaces" / f"{source}.yaml").read_text())
        search = load_search(REPO / "search_spaces" / f"{source}.yaml")
    hand = vs.define_by_run(raw["space"], flatten(search.base_config()))
    ours, theirs = _trials(hand, 7), _trials(search.suggest, 7)
    assert ours == theirs
    kinds = {values.get("modulation.kind") for values, _ in ours}
    assert len(kinds) > 1  # the draws cover more than one kind: the condition was exercised
    for values, _ in ours:
        assert ("modulation.noise_scale" in values) == (values.get("modulation.kind", "stochastic") == "stochastic"
                                                       and "modulation.noise_scale" in raw["space"])
    if source == "sites":
        assert {tuple(v["modulation.sites"]) for v, _ in ours} <= {("layer2",), ("layer3",), ("layer2", "layer3")}


def _side(wall: float, **changes) -> dict:
    side = {"wall_s": wall, "completed": 3, "stopped_early": 3, "optuna_states": {"COMPLETE": 6},
            "mlflow_runs": 6, "mlflow_child_runs": 0, "mlflow_parent_runs": 0, "plots": 0, "pretrainings": 6,
            "pretrainings_note": "one per trial", "pretrainings_finished": 6,
            "load": {"min": 0.5, "mean": 1.0, "max": 1.5}}
    side.update(changes)
    return side


def test_the_comparison_report_and_its_result_line(vs):
    comod = _side(100.0, optuna_states={"COMPLETE": 3, "PRUNED": 3}, mlflow_runs=7, mlflow_child_runs=6,
                  mlflow_parent_runs=1, plots=24, pretrainings=2, pretrainings_note="cache entries")
    hand = _side(250.0)
    result = {"comod": comod, "hand_written": hand, "ratio": vs.ratio(comod, hand)}
    assert result["ratio"] == 0.4 and vs.result_line(result["ratio"]) == "RESULT comod/hand_written=0.400"
    assert vs.result_line(1 / 3) == "RESULT comod/hand_written=0.333"
    assert vs.verdict(result) == "PASS: comod / hand-written = 0.400 (target <= 0.5)"
    assert vs.verdict({**result, "ratio": 0.51}).startswith("MISS")
    rows = {line.split(" | ")[0].lstrip("| "): line for line in vs.report_lines(result)}
    assert rows["wall time of the command"] == "| wall time of the command | 100.0 s | 250.0 s |"
    assert rows["stopped early, told to Optuna as PRUNED"].endswith("| 3 of 3 | 0 of 3 |")
    assert rows["Optuna trial states"].endswith("| COMPLETE 3, PRUNED 3 | COMPLETE 6 |")
    assert "| 7 (6 under 1 parent) | 6 (0 under 0 parent) |" in rows["MLflow runs (child runs nested under a parent)"]
    assert rows["plots logged as artifacts"] == "| plots logged as artifacts | 24 | 0 |"
    assert rows["pretrainings"] == "| pretrainings | 2: cache entries | 6: one per trial, 6 to their end |"


def test_platform_overhead_report_from_measured_runs(overhead):
    """summarise and markdown on runs of 4 trials, 2 at a time: what the report says of the targets."""
    from types import SimpleNamespace

    def side(t0: float, first: float, trial_s: float, gap_s: float, t1_after: float) -> dict:
        spans, slot_free = [], [first, first]
        for i in range(4):
            start = slot_free[i % 2]
            spans.append({"start": start, "end": start + trial_s, "wall_seconds": trial_s - 0.01})
            slot_free[i % 2] = start + trial_s + gap_s
        t1 = max(s["end"] for s in spans) + t1_after
        return {**overhead.breakdown(t0, t1, spans, 2), "load": {"min": 0.1, "mean": 0.2, "max": 0.3},
                "pretrained_models": 3}

    pairs = [{"platform": side(0.0, 10.0, 1.0, 0.05, 1.5), "floor": side(0.0, 9.8, 1.0, 0.04, 1.5),
              "plain": side(0.0, 2.0, 1.0, 0.0, 0.1)}]
    args = SimpleNamespace(trials=4, concurrency=2)
    s = overhead.summarise(pairs, args)
    assert s["idle_gap_ms"] == 25 and s["window_ratio"] == pytest.approx(2.05 / 2.0, abs=1e-3)
    assert s["checks"] == {"platform_over_floor": True} and s["pass"]
    result = {"summary": s, "pairs": pairs, "total_s": 40.0,
              "settings": {"trials": 4, "concurrency": 2, "steps_per_epoch": 30, "epochs": 2, "repeats": 1,
                           "quick": False, "warm": False},
              "machine": {"processor": "x86_64", "cpu_count": 2, "platform": "Linux"},
              "versions": {"ray": "r", "mlflow": "m", "optuna": "o", "torch": "t", "python": "p"},
              "load_wait": {"limit": 2.5, "waited_s": 0.0, "load_at_start": 0.2, "reached": True}}
    md = overhead.markdown(result)
    assert "| 1: bare Ray Tune |" in md and "The guard: the whole command at most 1.1x the bare Ray Tune run" in md
    assert (f"**PASS: whole command platform / bare Ray Tune = {s['platform_over_floor']:.3f} (the median of the "
            f"repeats' paired ratios; guard <= 1.1)**") in md
    assert "**reported: idle gap per trial slot = 25 ms (a retired target, <= 70)**" in md
    assert f"- whole command platform / plain = {s['ratio']:.3f}, reported, not a target" in md


def test_the_comparison_markdown(vs):
    comod, hand = _side(100.0, plots=24), _side(250.0)
    result = {"comod": comod, "hand_written": hand, "ratio": vs.ratio(comod, hand), "total_s": 400.0,
              "settings": {"search_file": "search_spaces/quickstart.yaml", "trials": 6, "quick": False,
                           "search": {"metric": "val/mean_f1", "mode": "max", "sampler": "tpe", "seed": 0,
                                      "scheduler": {"type": "asha", "grace_period": 11, "reduction_factor": 2},
                                      "max_concurrent": 2, "resources": {"cpu": 1, "gpu": 0}}},
              "machine": {"processor": "x86_64", "cpu_count": 2, "platform": "Linux"},
              "versions": {"ray": "r", "mlflow": "m", "optuna": "o", "torch": "t", "python": "p"},
              "code": {"commit": "abc1234", "changed_since": []},
              "load_wait": {"limit": 2.5, "waited_s": 0.0, "load_at_start": 0.2, "reached": True}}
    md = vs.markdown(result)
    assert md.startswith("# comod search run vs the same search written by hand on Ray Tune\n")
    assert "`search_spaces/quickstart.yaml`: 6 trials, sampler tpe (seed 0)" in md
    assert "commit abc1234 (comod/ and platform/ unchanged)" in md
    assert "| plots logged as artifacts | 24 | 0 |" in md
    assert md.rstrip().endswith("**PASS: comod / hand-written = 0.400 (target <= 0.5)**")


def test_the_checkout_measured_names_changed_files_whole(common):
    code = common.code_version()
    assert code["commit"] and len(code["commit"]) >= 7
    # git's porcelain lines start with a status column that may be a space: no path loses its first letter
    assert all(path.startswith(("comod/", "platform/")) for path in code["changed_since"]), code


def test_the_idle_slot_time_splits_into_gaps_between_trials_and_the_window_s_ends(overhead):
    """Two slots: trials of 1 s with 0.1 s between them on one slot, 0.3 s on the other, and the second
    slot's last trial ending 0.5 s before the window does; the two parts add up to the idle slot time."""
    spans = [{"start": 0.0, "end": 1.0}, {"start": 0.2, "end": 1.2}, {"start": 1.1, "end": 2.1},
             {"start": 1.5, "end": 2.5}, {"start": 2.2, "end": 3.2}, {"start": 2.8, "end": 3.8},
             {"start": 3.3, "end": 4.3}]
    for s in spans:
        s["wall_seconds"] = 1.0
    between, edges = overhead.slot_idle(spans, 2, 0.0, 4.3)
    assert between == pytest.approx([0.1, 0.3, 0.1, 0.3, 0.1])
    assert edges == pytest.approx(0.2 + 0.5)
    b = overhead.breakdown(-1.0, 5.0, spans, 2)
    assert b["mean_between_s"] == pytest.approx(0.18) and b["edge_idle_s"] == pytest.approx(0.7)
    assert b["mean_gap_s"] * len(spans) == pytest.approx(sum(between) + edges, abs=1e-3)
    pairs = [{side: {**b, "load": {}, "pretrained_models": 1} for side in ("platform", "floor", "plain")}]
    s = overhead.summarise(pairs, SimpleNamespace(trials=7, concurrency=2))
    assert s["between_gap_ms"] == {"platform": 180, "floor": 180, "plain": 180}
    assert overhead.target_lines(s)[4].startswith("where the idle gap lies: between two trials of a slot comod 180 ms")


def test_what_recording_alone_costs_the_window(overhead):
    """The driver's writer CPU (from the search's summary) per trial, spread over the busy cores, added to
    bare Ray Tune's window: the least window the platform can have, and whether the target is in reach."""
    assert overhead.recording_cpu({"writers": {"comod-mlflow-writer": {"calls": 90, "cpu_s": 1.6}}}) == {"mlflow": 1.6}
    assert overhead.recording_cpu({}) == {"mlflow": 0.0}  # a summary without writers
    side = lambda window, cpu=None: {"window_s": window, **({"recording_cpu_s": cpu} if cpu else {})}  # noqa: E731
    pairs = [{"platform": side(14.0, {"mlflow": 1.8}), "floor": side(12.0), "plain": side(11.0)},
             {"platform": side(14.2, {"mlflow": 2.2}), "floor": side(12.4), "plain": side(11.4)}]
    r = overhead.recording_estimate(pairs, trials=40, cores=2)
    assert r["ms_per_trial"] == {"mlflow": 50.0} and r["window_s"] == 1.0
    assert r["window_ratio_at_least"] == round((12.2 + 1.0) / 11.2, 3)
    note = overhead.recording_note(r)
    assert note.startswith("recording alone: the driver's MLflow writer takes 50 ms of CPU per trial")
    assert note.endswith("so the window is at least about 1.179x the plain loop's (bare Ray Tune's window plus it)")
    cheap = overhead.recording_estimate([{**pairs[0], "platform": side(14.0, {"mlflow": 0.2})}],
                                        trials=40, cores=2)
    assert "at least about 1.100x" in overhead.recording_note(cheap)
    assert "window_ratio_at_least" not in overhead.recording_estimate([{"platform": pairs[0]["platform"]}], 40, 2)


# ------------------------------------------------------------------- recording_off

@pytest.fixture(scope="module")
def recording_off():
    return _load("recording_off")


def test_the_recording_off_patch_drops_the_mlflow_writers_calls_only(recording_off, tmp_path):
    """In a fresh interpreter with the patch on its path: with COMOD_DROP_MLFLOW=1 the MLflow writer runs
    none of its calls and the study's writer runs all of its; without the variable, both run theirs."""
    patch = recording_off.write_patch(tmp_path / "patch")
    code = ("from comod_platform.writer import Writer\n"
            "done = []\n"
            "mlflow, study = Writer(name='comod-mlflow-writer'), Writer(name='comod-optuna-writer')\n"
            "for i in range(3):\n"
            "    mlflow.submit(done.append, ('mlflow', i)); study.submit(done.append, ('study', i))\n"
            "mlflow.queue.join(); study.queue.join()\n"
            "print(sorted({w for w, _ in done}), len(done))\n")

    def run(drop: str) -> str:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(patch), os.environ.get("PYTHONPATH", "")]),
               "COMOD_DROP_MLFLOW": drop}
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    assert run("1") == "['study'] 3"
    assert run("0") == "['mlflow', 'study'] 6"


def test_recording_off_checks_its_patch_took_and_says_what_the_numbers_mean(recording_off):
    side = lambda window, gap, mlflow=0.0: {"wall_s": 20.0 + window, "window_s": window, "mean_trial_s": 0.7,  # noqa: E731
                                            "mean_gap_s": gap, "mean_between_s": gap / 2,
                                            "recording_cpu_s": {"mlflow": mlflow, "study": 0.3}}
    runs = {"platform": [side(17.0, 0.09, 2.0)], "no_mlflow": [side(16.0, 0.085)], "floor": [side(15.0, 0.06)],
            "plain": [side(14.0, 0.04)]}
    recording_off.check_patch(runs)
    with pytest.raises(SystemExit, match="the patch did not take"):
        recording_off.check_patch({**runs, "no_mlflow": [side(16.0, 0.085, 1.5)]})
    with pytest.raises(SystemExit, match="the patch did not take"):
        recording_off.check_patch({**runs, "platform": [side(17.0, 0.09)]})
    s = recording_off.summarise(runs)
    assert s["no_mlflow"]["window_over_plain"] == round(16.0 / 14.0, 3) and s["no_mlflow"]["idle_gap_ms"] == 85
    assert not s["no_mlflow_meets_window"] and not s["no_mlflow_meets_gap"]
    assert recording_off.verdict(s).endswith("no cheaper recording can meet them.")
    report = recording_off.markdown({"summary": s, "settings": {"trials": 40, "concurrency": 2}, "repeats": 1,
                                     "machine": {"processor": "x86_64", "cpu_count": 2, "platform": "Linux"},
                                     "versions": {"ray": "2"}, "code": {"commit": "abc1234", "changed_since": []},
                                     "total_s": 90.0})
    assert "| platform, MLflow off | 36.0 | 16.00 | 1.143 | 700 | 85 | 42 | 0.00 |" in report
    assert "Code: commit abc1234 (comod/ and platform/ unchanged)" in report
    assert report.rstrip().endswith(recording_off.result_line(s)) and recording_off.verdict(s) in report
    assert recording_off.result_line(s) == ("RESULT window_platform/plain=1.214 window_no_mlflow/plain=1.143 "
                                            "window_bare_ray/plain=1.071 idle_gap_ms=90 idle_gap_no_mlflow_ms=85 "
                                            "idle_gap_bare_ray_ms=60")
    fast = recording_off.summarise({**runs, "no_mlflow": [side(15.2, 0.05)]})
    assert fast["no_mlflow_meets_window"] and fast["no_mlflow_meets_gap"]
    assert recording_off.verdict(fast).startswith("Without MLflow recording the platform meets both targets")


# ------------------------------------------------------------------- scale

def test_a_larger_scale_run_is_put_beside_the_200_trial_run(scale):
    base = {"time": {"driver_cpu_per_trial_ms": 100.0, "window_gap_per_trial_slot_ms": 600.0}}
    cheap = scale.growth(base, {"time": {"driver_cpu_per_trial_ms": 140.0, "window_gap_per_trial_slot_ms": 500.0}})
    assert cheap["driver_cpu_per_trial_ms"] == {"base": 100.0, "this": 140.0, "ratio": 1.4} and cheap["pass"]
    assert cheap["window_gap_per_trial_slot_ms"]["ratio"] == 0.833
    assert scale.growth_line(cheap).startswith("PASS: driver CPU per trial 140 ms against 100 ms at 200 trials = 1.4x")
    dear = scale.growth(base, {"time": {"driver_cpu_per_trial_ms": 151.0, "window_gap_per_trial_slot_ms": 600.0}})
    assert not dear["pass"] and scale.growth_line(dear).startswith("MISS")
