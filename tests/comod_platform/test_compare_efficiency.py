"""compare's pure parts on synthetic trial records: fine-tuning curves (mean, band, AUC, steps to a
fraction of deterministic's final score), the paired test metrics and the per-setting breakdowns.

No MLflow, no Ray: the records are built as :func:`results.load_results` would build them.

The synthetic search: 4 seeds x ``finetune.samples_per_task`` in (10, null) x the three kinds, on
fine-tuning steps 0, 10, ..., 100. Seed ``s`` scales every curve of its group by (1 + s/100), the arm 10
by 0.9 (scaling leaves the steps to a fraction unchanged):

- deterministic: 0.5 + 0.004 x (0.5 -> 0.9), AUC 0.7 x scale;
- stochastic: min(0.9, 0.5 + 0.008 x), AUC 0.8 x scale; reaches 0.9 x 0.9 at step 40 (38.75), 0.95 x 0.9
  at 50 (44.4), where deterministic needs 80 (77.5) and 90 (88.75);
- none: 0.5 flat, AUC 0.5 x scale, never reaches them.

Final metrics (decoupled from the curves): val/mean_f1 stochastic 0.86 (noise 0.1, seeds 0, 1) or 0.88
(noise 0.5, seeds 2, 3), deterministic 0.84, none 0.70, each + s/100; test ECE stochastic 0.05,
deterministic 0.08, none 0.10.
"""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest

from comod_platform import compare as C
from comod_platform import compare_plots as P
from comod_platform import conditions as K
from comod_platform import curves as U
from comod_platform import report as R
from comod_platform import stats as S
from comod_platform.results import TrialRecord, fine_tuning_curve

METRIC = "val/mean_f1"
KEY = f"finetune/{METRIC}"
STEPS = list(range(0, 101, 10))
SEEDS = (0, 1, 2, 3)
ARMS = (10, None)
RESAMPLES = 2000


def _shape(kind: str, x: float) -> float:
    return {"deterministic": 0.5 + 0.004 * x, "stochastic": min(0.9, 0.5 + 0.008 * x), "none": 0.5}[kind]


def _scale(seed: int, arm) -> float:
    return (1 + seed / 100) * (0.9 if arm == 10 else 1.0)


def _trial(kind: str, seed: int, arm, *, curve=True, state="completed", flat_extra=None, final_extra=None,
           noise=None) -> TrialRecord:
    noise = noise if noise is not None else (0.1 if kind != "stochastic" or seed < 2 else 0.5)
    flat = {"seed": seed, "modulation.kind": kind, "modulation.noise_scale": noise,
            "modulation.sites": ["layer3"], "finetune.samples_per_task": arm, "finetune.epochs": 2,
            **(flat_extra or {})}
    val = {"stochastic": 0.86 if noise < 0.3 else 0.88, "deterministic": 0.84, "none": 0.70}[kind] + seed / 100
    test_f1 = {"stochastic": 0.80, "deterministic": 0.75, "none": 0.60}[kind] + seed / 100
    final = {METRIC: val, "test/mean_f1": test_f1, "test/mean_recall": test_f1 + 0.01,
             "test/mean_precision": test_f1 - 0.01, "test/mean_accuracy": test_f1 + 0.1,
             "test/mean_ece": {"stochastic": 0.05, "deterministic": 0.08, "none": 0.10}[kind],
             "test/pattern_0/f1": test_f1, **(final_extra or {})}
    curves = {KEY: [(x, _shape(kind, x) * _scale(seed, arm)) for x in STEPS]} if curve else {}
    return TrialRecord(trial_id=f"{kind[:3]}-{seed}-{arm}", run_id=f"r-{kind}-{seed}-{arm}", state=state, kind=kind,
                       stopped_epoch=4, config=None, flat=flat, final=final if state == "completed" else {},
                       curves=curves if state == "completed" else {})


@pytest.fixture(scope="module")
def trials() -> list[TrialRecord]:
    out = [_trial(k, s, a) for s in SEEDS for a in ARMS for k in ("none", "deterministic", "stochastic")]
    out.append(_trial("stochastic", 9, 10, state="pruned"))  # short-lived: not compared
    return out


@pytest.fixture(scope="module")
def report(trials) -> dict:
    return C.build_report("synthetic", trials, METRIC, "max", resamples=RESAMPLES)


# ------------------------------------------------------------------- the curve functions

def test_auc_of_known_curves():
    assert U.curve_auc([(x, 0.5 + 0.004 * x) for x in STEPS]) == pytest.approx(0.7)
    assert U.curve_auc([(0, 0.2), (10, 0.2)]) == pytest.approx(0.2)
    # uneven steps: 0..10 at 0, then 10..40 rising 0 -> 0.6: area 0 + 30 * 0.3 = 9 over 40 steps
    assert U.curve_auc([(0, 0.0), (10, 0.0), (40, 0.6)]) == pytest.approx(9 / 40)
    assert U.curve_auc([(0, 0.7)]) == pytest.approx(0.7)  # nothing fine-tuned: a flat curve
    assert U.curve_auc([]) is None


def test_steps_to_reach_and_targets():
    curve = [(0, 0.2), (10, 0.5), (20, 0.8), (30, 0.9)]
    assert U.reach_target(0.8, 0.9) == pytest.approx(0.72)
    assert U.steps_to_reach(curve, 0.72) == 20
    assert U.steps_to_reach(curve, 0.2) == 0
    assert U.steps_to_reach(curve, 0.95) is None
    errors = [(0, 0.5), (10, 0.3), (20, 0.12), (30, 0.1)]
    assert U.reach_target(0.1, 0.9, "min") == pytest.approx(0.1 / 0.9)
    assert U.steps_to_reach(errors, U.reach_target(0.1, 0.9, "min"), "min") == 30
    assert U.steps_to_reach(errors, U.reach_target(0.1, 0.8, "min"), "min") == 20


def test_t_interval_is_scipys():
    stats = pytest.importorskip("scipy.stats")
    x = [0.02, -0.01, 0.035, 0.004, 0.018, 0.027]
    assert S.t_interval(x) == pytest.approx(tuple(stats.ttest_1samp(x, 0).confidence_interval(0.95)), abs=1e-12)
    assert S.t_interval([0.3]) is None and S.t_interval([0.2, 0.2]) == pytest.approx((0.2, 0.2))


def test_mean_curve_band_is_a_t_interval():
    curves = [[(0, 1.0 + i), (10, 2.0 + 2 * i)] for i in range(3)]  # values 1,2,3 and 2,4,6
    c = U.mean_curve(curves)
    assert c["n"] == 3 and c["steps"] == [0, 10] and c["grid"] == "common"
    assert c["mean"] == pytest.approx([2.0, 4.0])
    half = 4.303 * np.array([1.0, 2.0]) / math.sqrt(3)
    assert c["lo"] == pytest.approx(list(np.array([2.0, 4.0]) - half), abs=1e-3)
    assert c["hi"] == pytest.approx(list(np.array([2.0, 4.0]) + half), abs=1e-3)
    one = U.mean_curve([[(0, 0.3), (5, 0.4)]])
    assert one["n"] == 1 and one["lo"] is None and one["hi"] is None
    assert U.mean_curve([]) is None


def test_curves_on_different_grids_are_interpolated_within_the_shared_range():
    a = [(0, 0.0), (10, 1.0), (20, 2.0), (30, 3.0)]
    b = [(0, 0.0), (15, 3.0)]
    steps, values, how = U.align_curves([a, b])
    assert how == "interpolated" and steps.tolist() == [0, 10, 15]
    assert np.allclose(values, [[0.0, 1.0, 1.5], [0.0, 2.0, 3.0]])
    assert U.mean_curve([a, b])["mean"] == pytest.approx([0.0, 1.5, 2.25])
    assert U.align_curves([[(5, 1.0)], [(0, 1.0), (2, 1.0)]]) is None  # no step both cover


def test_fine_tuning_curve_from_metric_history():
    m = lambda step, value, ts=0: SimpleNamespace(step=step, value=value, timestamp=ts)  # noqa: E731
    history = [m(540, 0.7), m(500, 0.4), m(520, 0.6, ts=1), m(520, 0.55, ts=0), m(560, float("nan"))]
    assert fine_tuning_curve(history) == [(0, 0.4), (20, 0.6), (40, 0.7)]
    assert fine_tuning_curve([]) == []


def test_record_reads_each_curve_once(tmp_path):
    """``_record`` fills the curves of a completed trial with one history read per curve key."""
    from comod_platform import results

    histories = {"finetune/val/mean_f1": [(300, 0.5), (310, 0.6), (320, 0.7)],
                 "finetune/val/mean_recall": [(300, 0.4), (320, 0.8)], "pretrain/val/mean_f1": [(100, 0.3)]}
    calls = []

    class Client:
        def get_metric_history(self, run_id, key):
            calls.append(key)
            return [SimpleNamespace(step=s, value=v, timestamp=0) for s, v in histories.get(key, [])]

    run = SimpleNamespace(info=SimpleNamespace(run_id="r1", start_time=1000, end_time=5000), data=SimpleNamespace(
        tags={"comod.state": "completed", "comod.ray_trial_id": "t1", "comod.modulation_kind": "stochastic"},
        params={"seed": "1"}, metrics={"val/mean_f1": 0.7, "finetune/val/mean_f1": 0.7,
                                       "finetune/val/mean_recall": 0.8}))
    paths = SimpleNamespace(trial_dir=lambda tid: tmp_path / tid)
    rec = results._record(Client(), run, METRIC, "max", paths)
    assert rec.curves == {KEY: [(0, 0.5), (10, 0.6), (20, 0.7)], "finetune/val/mean_recall": [(0, 0.4), (20, 0.8)],
                          "pretrain/val/mean_f1": [(100, 0.3)]}  # pretraining keeps its own steps
    assert rec.best == pytest.approx(0.7)
    curve_reads = [k for k in calls if k.startswith("finetune/")]
    assert sorted(curve_reads) == sorted(set(curve_reads)) == ["finetune/val/mean_f1", "finetune/val/mean_recall"]
    run.data.tags["comod.state"] = "pruned"
    assert results._record(Client(), run, METRIC, "max", paths).curves == {}


# ------------------------------------------------------------------- the report on the synthetic search

def test_efficiency_curves_per_arm_and_kind(report):
    e = report["efficiency"]
    assert e["curve_key"] == KEY and e["arm_settings"] == ["finetune.samples_per_task"]
    assert [p["arm"] for p in e["panels"]] == ["finetune.samples_per_task=10", "finetune.samples_per_task=null"]
    scales = np.array([1 + s / 100 for s in SEEDS])
    for panel, arm_scale in zip(e["panels"], (0.9, 1.0)):
        assert set(panel["kinds"]) == {"none", "deterministic", "stochastic"}
        det = panel["kinds"]["deterministic"]
        assert det["n"] == 4 and det["steps"] == STEPS and det["grid"] == "common"
        finals = 0.9 * arm_scale * scales
        assert det["mean"][-1] == pytest.approx(finals.mean())
        half = 3.182 * finals.std(ddof=1) / 2
        assert det["lo"][-1] == pytest.approx(finals.mean() - half, rel=1e-3)
        assert det["hi"][-1] == pytest.approx(finals.mean() + half, rel=1e-3)
        assert all(lo <= m <= hi for lo, m, hi in zip(det["lo"], det["mean"], det["hi"]))


def test_efficiency_auc_paired(report):
    auc = report["efficiency"]["auc"]
    scales = np.array([(1 + s / 100) * (0.9 if a == 10 else 1.0) for s in SEEDS for a in ARMS])
    assert auc["per_kind"]["deterministic"]["n"] == 8
    assert auc["per_kind"]["deterministic"]["mean"] == pytest.approx(0.7 * scales.mean())
    assert auc["per_kind"]["stochastic"]["mean"] == pytest.approx(0.8 * scales.mean())
    assert auc["per_kind"]["none"]["mean"] == pytest.approx(0.5 * scales.mean())
    for name, gap in (("stochastic-deterministic", 0.1), ("stochastic-none", 0.3), ("deterministic-none", 0.2)):
        p = auc["paired"][name]
        assert p["n"] == 8 and sorted(p["differences"]) == pytest.approx(sorted(gap * scales))
        assert p["mean"] == pytest.approx(gap * scales.mean()) and p["a_better"] == 8
        lo, hi = p["ci95"]
        assert gap * scales.min() - 1e-9 <= lo <= p["mean"] <= hi <= gap * scales.max() + 1e-9


def test_efficiency_steps_to_fraction(report):
    st = report["efficiency"]["steps_to_fraction"]
    assert set(st) == {"0.9", "0.95"} and report["efficiency"]["fractions"] == list(U.FRACTIONS)
    for f, stoch, det in (("0.9", 40, 80), ("0.95", 50, 90)):
        k = st[f]["per_kind"]
        assert k["stochastic"] == {"groups": 8, "reached": 8, "median": stoch}
        assert k["deterministic"] == {"groups": 8, "reached": 8, "median": det}
        assert k["none"] == {"groups": 8, "reached": 0, "median": None}
        p = st[f]["paired"]["stochastic-deterministic"]
        assert p["n"] == 8 and p["differences"] == [stoch - det] * 8 and p["mean"] == stoch - det
        assert p["ci95"] == pytest.approx([stoch - det] * 2) and p["a_better"] == 8  # fewer steps is better
        assert st[f]["paired"]["none-deterministic"]["n"] == 0
    group = report["efficiency"]["groups"][0]
    assert group["steps"]["0.9"] == {"none": None, "deterministic": 80, "stochastic": 40}


def test_paired_test_metrics(report):
    pm = report["paired_metrics"]
    assert set(pm) == set(C.PAIRED_METRICS)
    sd = pm["test/mean_f1"]["stochastic-deterministic"]
    assert sd["n"] == 8 and sd["mean"] == pytest.approx(0.05) and sd["a_better"] == 8
    ece = pm["test/mean_ece"]["stochastic-deterministic"]
    assert ece["mean"] == pytest.approx(-0.03) and ece["a_better"] == 8  # lower ECE is better
    assert pm["test/mean_ece"]["deterministic-none"]["mean"] == pytest.approx(-0.02)
    assert pm["test/mean_recall"]["stochastic-none"]["mean"] == pytest.approx(0.2)
    # the search metric's paired entry keeps its keys and numbers
    p = report["paired"]["stochastic-deterministic"]
    assert set(p) == {"a", "b", "n", "differences", "groups", "mean", "sd", "ci95", "bootstrap_ci95", "p_sign_flip",
                      "p_method", "p_min", "p_holm", "seeds_needed", "rough", "a_better", "ties", "by_seed"}
    assert p["p_holm"] is None and p["by_seed"]["p_holm"] is not None  # the seed is the unit Holm adjusts
    # the arms share their seed's pretraining: the seed-level interval averages them per seed
    assert p["by_seed"]["n"] == len(SEEDS) < p["n"]
    assert p["by_seed"]["mean"] == pytest.approx(p["mean"])  # balanced arms: the same mean
    assert p["by_seed"]["ci95"][0] <= p["by_seed"]["mean"] <= p["by_seed"]["ci95"][1]
    assert p["n"] == 8 and p["mean"] == pytest.approx(0.03)
    assert sorted(p["differences"]) == pytest.approx([0.02] * 4 + [0.04] * 4)
    assert 0.02 <= p["ci95"][0] <= p["mean"] <= p["ci95"][1] <= 0.04
    assert report["completed"] == 24 and report["trials"] == 25 and report["counts"]["stochastic"]["pruned"] == 1


def test_by_setting_and_by_noise_scale(report):
    assert report["varied_settings"] == ["finetune.samples_per_task"]
    rows = report["by_setting"]["finetune.samples_per_task"]
    assert [r["value"] for r in rows] == ["10", "null"]
    for r in rows:
        assert r["paired"][METRIC]["n"] == 4 and r["paired"][METRIC]["mean"] == pytest.approx(0.03)
        assert r["paired"]["test/mean_f1"]["mean"] == pytest.approx(0.05)
    noise = {r["noise_scale"]: r for r in report["by_noise_scale"]}
    assert list(noise) == ["0.1", "0.5"]
    assert noise["0.1"][METRIC]["n"] == 4 and noise["0.1"][METRIC]["mean"] == pytest.approx(0.02)
    assert noise["0.5"][METRIC]["mean"] == pytest.approx(0.04) and len(noise["0.5"]["trials"]) == 4
    assert noise["0.5"]["test/mean_f1"]["mean"] == pytest.approx(0.05)


def test_continuous_setting_is_binned_in_by_setting_and_the_curves():
    lrs = [0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128]
    trials = [_trial(k, s, None, flat_extra={"finetune.lr.controller": lr})
              for s, lr in enumerate(lrs) for k in ("deterministic", "stochastic")]
    r = C.build_report("lr", trials, METRIC, "max", resamples=RESAMPLES)
    assert r["varied_settings"] == ["finetune.lr.controller"]
    rows = r["by_setting"]["finetune.lr.controller"]
    bins = ["[0.001, 0.002]", "[0.004, 0.008]", "[0.016, 0.032]", "[0.064, 0.128]"]
    assert [row["value"] for row in rows] == bins
    assert [row["paired"][METRIC]["n"] for row in rows] == [2, 2, 2, 2]
    e = r["efficiency"]
    assert e["arm_settings"] == e["binned_settings"] == ["finetune.lr.controller"]
    assert [p["arm"] for p in e["panels"]] == [f"finetune.lr.controller in {b}" for b in bins]
    assert [p["kinds"]["stochastic"]["n"] for p in e["panels"]] == [2, 2, 2, 2]


# ------------------------------------------------------------------- honesty with too little data

def test_no_curves_gives_a_note_not_numbers():
    trials = [_trial(k, 0, None, curve=False) for k in ("deterministic", "stochastic")]
    r = C.build_report("old", trials, METRIC, "max", resamples=RESAMPLES)
    e = r["efficiency"]
    assert e["panels"] == [] and e["auc"] is None and e["steps_to_fraction"] is None
    assert any("No completed trial has a fine-tuning curve" in n for n in e["notes"])
    md = R.markdown(r, [])
    assert "## Fine-tuning efficiency" in md and "No completed trial has a fine-tuning curve" in md
    assert "### Area under" not in md


def test_one_pair_has_no_interval():
    trials = [_trial(k, 0, None) for k in ("deterministic", "stochastic")] + [_trial("stochastic", 1, None,
                                                                                     curve=False)]
    e = C.build_report("one", trials, METRIC, "max", resamples=RESAMPLES)["efficiency"]
    p = e["auc"]["paired"]["stochastic-deterministic"]
    assert p["n"] == 1 and p["ci95"] is None and p["mean"] == pytest.approx(0.1)
    assert e["panels"][0]["kinds"]["deterministic"]["lo"] is None
    notes = " ".join(e["notes"])
    assert "1 of 3 completed trials have no" in notes and "no band" in notes and "no interval" in notes
    assert e["steps_to_fraction"]["0.9"]["paired"]["stochastic-deterministic"]["differences"] == [-40.0]


def test_empty_search_report():
    r = C.build_report("empty", [_trial("stochastic", 0, None, state="failed")], METRIC, "max", resamples=100)
    assert r["completed"] == 0 and r["by_setting"] == {} and r["by_noise_scale"] == []
    assert r["paired_metrics"]["test/mean_f1"]["stochastic-deterministic"]["n"] == 0
    json.dumps(r, allow_nan=False)
    assert "nothing to compare" in R.markdown(r, [])


# ------------------------------------------------------------------- markdown, JSON, plots

def test_markdown_json_and_plots(report, trials, tmp_path):
    text = json.dumps(report, allow_nan=False)
    assert json.loads(text)["efficiency"]["steps_to_fraction"]["0.9"]["per_kind"]["stochastic"]["median"] == 40
    files = P.draw(report, trials, tmp_path)
    names = [p.name for p in files]
    assert names == ["distribution.png", "paired.png", "win_rates.png", "curves.png"]
    for f in files:
        with open(f, "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n", f
    md = R.markdown(report, names)
    for section in ("## Paired differences on the test metrics", "## Stochastic - deterministic per varied setting",
                    "## Stochastic - deterministic by noise scale", "## Fine-tuning efficiency", "### Curves",
                    "### Area under the fine-tuning curve", "### Fine-tuning steps to reach a fraction",
                    "![curves](curves.png)", "Student t 95%"):
        assert section in md, section
    assert "| `test/mean_ece` | stochastic - deterministic | 8 | -0.0300 |" in md
    assert "| `finetune.samples_per_task` | null | `val/mean_f1` | 4* | 0.0300 |" in md  # 4 seeds: rough
    assert "| 0.9 | stochastic - deterministic | 8 | -40.0 | [-40.0, -40.0] | [-40.0, -40.0] | 0.0078 |  | 8 |" in md
    assert "| stochastic - deterministic | 8 | 0.0964 |" in md  # AUC: 0.1 x the mean scale 1.015 x 0.95
    assert "ECE" in md and "lower" in md


def test_no_curve_plot_without_curves(tmp_path):
    trials = [_trial(k, s, None, curve=False) for s in (0, 1) for k in ("deterministic", "stochastic")]
    r = C.build_report("old", trials, METRIC, "max", resamples=RESAMPLES)
    names = [p.name for p in P.draw(r, trials, tmp_path)]
    assert "curves.png" not in names and "distribution.png" in names


def test_compare_writes_the_new_sections(trials, tmp_path, monkeypatch):
    """``compare`` itself (MLflow's reading replaced by the records): compare.json and compare.md hold them."""
    results = SimpleNamespace(trials=trials, metric=METRIC, mode="max", paths=SimpleNamespace(root=tmp_path),
                              meta=SimpleNamespace(tracking_uri="unused", parent_run_id="unused"))
    monkeypatch.setattr(C, "load_results", lambda name, home=None: results)
    report = C.compare("synthetic", out_dir=tmp_path / "cmp", resamples=RESAMPLES, log_artifact=False)
    saved = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    for key in ("paired", "paired_metrics", "by_setting", "by_noise_scale", "efficiency", "varied_settings"):
        assert saved[key] == json.loads(json.dumps(report[key])), key
    assert saved["out_dir"] == str(tmp_path / "cmp") and (tmp_path / "cmp" / "curves.png").stat().st_size > 0
    assert str(tmp_path / "cmp" / "curves.png") in saved["files"]
    assert "## Fine-tuning efficiency" in (tmp_path / "cmp" / "compare.md").read_text()


def test_a_kind_with_nothing_to_fine_tune_pairs_by_its_flat_value():
    """none with only the controller open logs fine-tuning step 0 alone: its AUC is that value."""
    trials = []
    for seed in SEEDS:
        for kind in ("none", "deterministic"):
            t = _trial(kind, seed, None)
            if kind == "none":
                t.curves = {KEY: [(0, 0.5)]}
            trials.append(t)
    eff = U.efficiency(trials, METRIC, "max", resamples=RESAMPLES)
    paired = eff["auc"]["paired"]["deterministic-none"]
    det_auc = [U.curve_auc(t.curves[KEY]) for t in trials if t.kind == "deterministic"]
    assert paired["n"] == len(SEEDS)
    assert paired["mean"] == pytest.approx(sum(det_auc) / len(det_auc) - 0.5)


def test_seed_level_interval_averages_groups_that_share_a_seed():
    out = S.paired_stats([1.0, 1.0, 3.0], "max", RESAMPLES, 0, seeds=[0, 0, 1])
    assert out["mean"] == pytest.approx(5 / 3)
    assert out["by_seed"]["n"] == 2 and out["by_seed"]["differences"] == [1.0, 3.0]
    assert out["by_seed"]["mean"] == pytest.approx(2.0)
    assert "by_seed" not in S.paired_stats([1.0, 2.0], "max", RESAMPLES, 0, seeds=[0, 1])  # one group per seed


def test_pretraining_curves_count_each_pretraining_once_and_flag_a_kind_still_improving():
    flat_curve = [(100 * e, 0.7 + (0.01 * e if e < 6 else 0.06)) for e in range(1, 13)]  # plateau after epoch 6
    trials = []
    for seed in SEEDS:
        for arm in ARMS:  # the arms share their seed's pretraining: the same curve three times
            for kind, rise in (("none", 0.0), ("deterministic", 0.02)):
                t = _trial(kind, seed, arm)
                t.curves = {**t.curves, f"pretrain/{METRIC}": [(s, v + rise * (s // 100) + seed / 1000)
                                                               for s, v in flat_curve]}
                trials.append(t)
    pre = U.pretraining(trials, METRIC, "max")
    assert pre["kinds"]["none"]["n"] == len(SEEDS) and pre["kinds"]["none"]["steps"] == list(range(1, 13))
    assert pre["plateau"]["none"]["gain"] == pytest.approx(0.0, abs=1e-9)
    assert pre["plateau"]["deterministic"]["gain"] == pytest.approx(0.02 * 3)  # +0.02 an epoch, 3 epochs apart
    assert any(n.startswith("deterministic was still improving") for n in pre["notes"])
    assert not any(n.startswith("none") for n in pre["notes"])
    assert "## Pretraining" in "\n".join(R.pretraining_section(pre))


def test_paired_auc_has_a_seed_level_interval_when_arms_share_seeds(report):
    auc = report["efficiency"]["auc"]["paired"]["stochastic-deterministic"]
    assert auc["by_seed"]["n"] == len(SEEDS) < auc["n"]
    assert auc["by_seed"]["ci95"][0] <= auc["by_seed"]["mean"] <= auc["by_seed"]["ci95"][1]
