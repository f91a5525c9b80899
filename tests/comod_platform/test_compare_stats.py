"""compare's statistics (t intervals, bootstrap, exact sign-flip tests, Holm, seeds needed), its conditions
(kind plus variant: ``none[heads]``, ``stochastic[shuffled]``), binned curve panels and the cost section,
on synthetic trial records built as :func:`results.load_results` builds them (no MLflow, no Ray)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats

from comod_platform import compare as C
from comod_platform import compare_plots as P
from comod_platform import conditions as K
from comod_platform import curves as U
from comod_platform import report as R
from comod_platform import stats as S
from comod_platform.results import TrialRecord

METRIC = "val/mean_f1"
KEY = f"finetune/{METRIC}"
RESAMPLES = 2000


def _trial(kind: str, seed: int, value: float, *, trainable=None, shuffle=None, flat_extra=None, curve=None,
           final_extra=None, state="completed", start=None, wall=None, tag="") -> TrialRecord:
    flat = {"seed": seed, "modulation.kind": kind, "modulation.noise_scale": 0.1, "finetune.epochs": 2,
            **(flat_extra or {})}
    if trainable is not None:
        flat["finetune.trainable"] = trainable
    if shuffle is not None:
        flat["modulation.readout.shuffle"] = shuffle
    final = {METRIC: value, "test/mean_f1": value - 0.05, **(final_extra or {})}
    return TrialRecord(trial_id=f"{kind}{tag}-{seed}", run_id=f"r-{kind}{tag}-{seed}", state=state, kind=kind,
                       stopped_epoch=2, config=None, flat=flat, final=final if state == "completed" else {},
                       curves={KEY: curve} if curve and state == "completed" else {}, start_time=start,
                       wall_seconds=wall)


# ------------------------------------------------------------------- intervals and tests

def test_t_interval_is_scipys_and_the_bootstrap_sits_beside_it():
    x = [0.021, -0.004, 0.035, 0.012, 0.018]
    assert S.t_interval(x) == pytest.approx(tuple(stats.ttest_1samp(x, 0).confidence_interval(0.95)), abs=1e-12)
    boot = S.bootstrap_interval(x, 5000, seed=3)
    expected = stats.bootstrap((np.asarray(x),), np.mean, n_resamples=5000, method="percentile",
                               rng=np.random.default_rng(3)).confidence_interval
    assert boot == pytest.approx((expected.low, expected.high))
    assert min(x) <= boot[0] < boot[1] <= max(x)
    lo, hi = S.t_interval(x)
    assert lo < boot[0] and boot[1] < hi  # the percentile bootstrap is narrower with 5 values
    assert S.bootstrap_interval([0.1]) is None and S.t_interval([]) is None


def test_exact_sign_flip_p_values():
    five = S.sign_flip_test([0.1, 0.2, 0.05, 0.3, 0.02])
    assert five == {"p": pytest.approx(0.0625), "method": "exact", "p_min": pytest.approx(0.0625)}
    # by hand: 16 sign assignments of |0.3|, |0.1|, |0.2|, |0.4| (sum 1.0, observed 0.8); |sum| >= 0.8 only
    # with no magnitude or just 0.1 negated, and the two mirror images: 4 / 16
    assert S.sign_flip_test([0.3, -0.1, 0.2, 0.4])["p"] == pytest.approx(0.25)
    assert S.sign_flip_test([0.0, 0.0, 0.0])["p"] == 1.0
    assert S.sign_flip_test([0.2])["p"] == 1.0 and S.sign_flip_test([]) is None
    assert S.sign_flip_test([-0.04] * 8)["p"] == pytest.approx(2 / 256)


def test_explicit_enumeration_agrees_with_scipys_permutation_test():
    rng = np.random.default_rng(7)
    for n in (3, 6, 9):
        x = rng.normal(0.01, 0.02, n)
        ref = stats.permutation_test((x,), lambda v, axis: np.mean(v, axis=axis), permutation_type="samples",
                                     n_resamples=np.inf, vectorized=True)
        assert S.sign_flip_test(x)["p"] == pytest.approx(ref.pvalue), n


def test_beyond_twenty_pairs_the_test_is_monte_carlo():
    x = np.linspace(0.01, 0.05, 25)  # all positive: no random flip reaches it
    out = S.sign_flip_test(x, resamples=999, seed=0)
    assert out["method"].startswith("monte carlo") and out["p"] == pytest.approx(2 / 1000)


def test_holm_on_a_hand_worked_example():
    # sorted: 0.005 x 4 = 0.02, 0.01 x 3 = 0.03, 0.03 x 2 = 0.06, 0.04 x 1 = 0.04 -> kept non-decreasing: 0.06
    assert S.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert S.holm([0.4, 0.6]) == pytest.approx([0.8, 0.8])
    assert S.holm([0.7, 0.9, 0.8]) == pytest.approx([1.0, 1.0, 1.0])  # capped at 1
    assert S.holm([]) == []


def test_seeds_needed_for_a_half_width_of_0005():
    # sd 0.005: n = 6 gives 2.571 x 0.005 / 2.449 = 0.00525, n = 7 gives 2.447 x 0.005 / 2.646 = 0.00462
    assert S.seeds_needed(0.005) == 7
    # sd 0.01: n = 17 gives 2.120 x 0.01 / 4.123 = 0.00514, n = 18 gives 2.110 x 0.01 / 4.243 = 0.00497
    assert S.seeds_needed(0.01) == 18
    for sd in (0.003, 0.02, 0.05):
        n = S.seeds_needed(sd)
        half = lambda k: stats.t.ppf(0.975, k - 1) * sd / np.sqrt(k)  # noqa: E731
        assert half(n) <= 0.005 < half(n - 1) if n > 2 else half(n) <= 0.005
    assert S.seeds_needed(0.0) == 2 and S.seeds_needed(None) is None


# ------------------------------------------------------------------- the report's statistics

def _headline_study(seeds: int) -> list[TrialRecord]:
    rise = [0.010, 0.025, 0.004, 0.018, 0.031, 0.012, 0.020, 0.008]
    return [t for s in range(seeds) for t in (_trial("deterministic", s, 0.80 + s / 100),
                                               _trial("stochastic", s, 0.80 + s / 100 + rise[s]))]


def test_five_seeds_give_the_exact_floor_and_a_rough_warning():
    r = C.build_report("five", _headline_study(5), METRIC, "max", resamples=RESAMPLES)
    p = r["paired"]["stochastic-deterministic"]
    diffs = [0.010, 0.025, 0.004, 0.018, 0.031]
    assert p["n"] == 5 and p["differences"] == pytest.approx(diffs)
    assert p["ci95"] == pytest.approx(list(stats.ttest_1samp(diffs, 0).confidence_interval(0.95)))
    assert p["p_sign_flip"] == pytest.approx(0.0625) and p["p_method"] == "exact" and p["rough"]
    assert p["seeds_needed"] == S.seeds_needed(float(np.std(diffs, ddof=1)))
    families = r["holm"]["families"]
    assert p["p_holm"] >= p["p_sign_flip"] and families["conditions"]["m"] >= 1
    assert "`val/mean_f1` stochastic - deterministic" in families["conditions"]["members"]
    assert "`test/mean_f1` stochastic - deterministic" in families["test metrics: test/mean_f1"]["members"]
    md = R.markdown(r, [])
    assert ("- stochastic - deterministic: fewer than 8 seeds: the interval is rough (5 pairs; an exact sign-flip "
            "p on 5 pairs cannot go below 0.0625).") in md
    assert "| stochastic - deterministic | 5* | 0.0176 |" in md
    json.dumps(r, allow_nan=False)


def test_eight_seeds_give_no_warning():
    r = C.build_report("eight", _headline_study(8), METRIC, "max", resamples=RESAMPLES)
    p = r["paired"]["stochastic-deterministic"]
    assert p["n"] == 8 and not p["rough"] and p["p_sign_flip"] == pytest.approx(2 / 256)
    assert "stochastic - deterministic: fewer than 8 seeds" not in R.markdown(r, [])


# ------------------------------------------------------------------- conditions

def test_conditions_are_labelled_from_the_variant_settings():
    label = lambda **kw: K.condition(_trial(kw.pop("kind"), 0, 0.5, **kw))  # noqa: E731
    assert label(kind="deterministic", trainable=["controller"]) == "deterministic"
    assert label(kind="stochastic") == "stochastic"  # an older trial: no shuffle setting, default trainable
    assert label(kind="stochastic", shuffle=False) == "stochastic"
    assert label(kind="stochastic", shuffle=True) == "stochastic[shuffled]"
    assert label(kind="deterministic", shuffle=True) == "deterministic"  # no readout to shuffle
    assert label(kind="none", trainable=["heads"]) == "none[heads]"
    assert label(kind="none", trainable=["heads", "decoder"]) == "none[decoder+heads]"
    assert label(kind="stochastic", trainable=["controller", "heads"], shuffle=True) == \
        "stochastic[heads+controller,shuffled]"
    carried = {"finetune.readout_reset": False}
    assert label(kind="stochastic", flat_extra=carried) == "stochastic[readout carried]"
    assert label(kind="stochastic", flat_extra={"finetune.readout_reset": "False"}) == "stochastic[readout carried]"
    assert label(kind="stochastic", flat_extra={"finetune.readout_reset": True}) == "stochastic"
    assert label(kind="deterministic", flat_extra=carried) == "deterministic"  # no readout to carry


def test_a_carried_readout_is_compared_with_a_restarted_one_of_the_same_seed():
    trials = []
    for s in range(8):
        trials += [_trial("deterministic", s, 0.70), _trial("stochastic", s, 0.71 + 0.001 * s),
                   _trial("stochastic", s, 0.69, flat_extra={"finetune.readout_reset": False}, tag="c")]
    r = C.build_report("reset", trials, METRIC, "max", resamples=RESAMPLES)
    pair = r["paired"]["stochastic-stochastic[readout carried]"]
    assert pair["n"] == 8 and pair["mean"] == pytest.approx(0.71 + 0.0035 - 0.69)


def _conditions_study(seeds=6) -> list[TrialRecord]:
    out = []
    for s in range(seeds):
        base = 0.80 + s / 100
        out += [_trial("deterministic", s, base, trainable=["controller"]),
                _trial("stochastic", s, base + 0.02 + s / 1000, shuffle=False),
                _trial("stochastic", s, base + 0.005, shuffle=True, tag="shuf",
                       flat_extra={"modulation.readout.mix": 0.5}),
                _trial("none", s, base - 0.10, trainable=["heads"], tag="h"),
                _trial("none", s, base - 0.05, trainable=["decoder", "heads"], tag="dh")]
    return out


def test_conditions_are_matched_apart_and_compared_in_order():
    trials = _conditions_study()
    assert len({K.match_key(t) for t in trials}) == 6  # one group per seed: the variants match each other
    r = C.build_report("conds", trials, METRIC, "max", resamples=RESAMPLES)
    assert r["conditions"] == ["stochastic", "stochastic[shuffled]", "deterministic", "none[decoder+heads]",
                               "none[heads]"]
    assert list(r["paired"]) == [
        "stochastic-deterministic", "stochastic-stochastic[shuffled]",
        "stochastic-none[decoder+heads]", "stochastic-none[heads]",
        "deterministic-none[decoder+heads]", "deterministic-none[heads]", "stochastic[shuffled]-deterministic",
        "stochastic[shuffled]-none[decoder+heads]", "stochastic[shuffled]-none[heads]",
        "none[decoder+heads]-none[heads]"]
    headline = r["paired"]["stochastic-deterministic"]
    assert headline["n"] == 6  # shuffled trials kept apart, not averaged in
    assert headline["differences"] == pytest.approx([0.02 + s / 1000 for s in range(6)])
    assert r["paired"]["stochastic-stochastic[shuffled]"]["mean"] == pytest.approx(0.015 + 2.5 / 1000)
    heads = r["paired"]["deterministic-none[heads]"]
    assert heads["n"] == 6 and heads["mean"] == pytest.approx(0.10)
    assert "stochastic-none" not in r["paired"]  # no plain none condition in this study
    assert r["distribution"]["none[heads]"]["n"] == 6 and r["best"]["stochastic[shuffled]"]["trial_id"] == \
        "stochasticshuf-5"
    assert r["varied_settings"] == []  # trainable, shuffle and readout.* are not arms
    assert r["paired_metrics"]["test/mean_f1"]["deterministic-none[heads]"]["mean"] == pytest.approx(0.10)
    md = R.markdown(r, [])
    assert "| stochastic - stochastic[shuffled] | 6* |" in md and "| none[heads] | 6 | 0 | 0 | 0 |" in md


def test_comparisons_list_the_headline_always_and_other_pairs_where_present():
    assert K.comparisons([]) == [K.HEADLINE]
    assert K.comparisons(["stochastic", "deterministic", "none"]) == [
        ("stochastic", "deterministic"), ("stochastic", "none"), ("deterministic", "none")]
    assert ("stochastic", "none") not in K.comparisons(["stochastic", "deterministic", "none[heads]"])


def test_by_setting_splits_the_arms_with_conditions_present():
    trials = []
    for design in ("same", "none"):
        for t in _conditions_study(seeds=4):
            t.flat["pretrain.modulation_kind"] = design
            t.final[METRIC] += 0.01 if design == "none" and t.kind == "stochastic" else 0.0
            t.trial_id += design
            trials.append(t)
    r = C.build_report("arms", trials, METRIC, "max", resamples=RESAMPLES)
    assert r["varied_settings"] == ["pretrain.modulation_kind"]
    rows = {row["value"]: row["paired"][METRIC] for row in r["by_setting"]["pretrain.modulation_kind"]}
    assert list(rows) == ["none", "same"]
    for value, gap in (("same", 0.0), ("none", 0.01)):
        p = rows[value]
        assert p["n"] == 4 and p["mean"] == pytest.approx(0.02 + 1.5 / 1000 + gap)
        assert p["ci95"] == pytest.approx(list(stats.ttest_1samp(p["differences"], 0).confidence_interval(0.95)))
        assert p["p_sign_flip"] == pytest.approx(0.125) and p["p_holm"] is not None
        assert p["p_holm"] >= p["p_sign_flip"]
    assert any("pretrain.modulation_kind=same" in m for m in r["holm"]["families"]["settings"]["members"])
    # the designs pretrain different networks: each group is a unit of its own, not averaged by seed
    headline = r["paired"]["stochastic-deterministic"]
    assert headline["n"] == 8 and "by_seed" not in headline and headline["p_holm"] is not None
    assert "| `pretrain.modulation_kind` | same | `val/mean_f1` | 4* |" in R.markdown(r, [])


def test_a_variant_headline_drives_the_per_setting_noise_and_win_rate_tables():
    """Both kinds adapt their heads too (``[heads+controller]``): the headline is that variant pair, and the
    tables split by setting, by noise scale and per task read it, not the absent plain kinds."""
    trials = []
    for k in (16, 128):
        for s in range(4):
            base = 0.7 + s / 100
            for kind, value in (("deterministic", base), ("stochastic", base + 0.01 + s / 1000)):
                t = _trial(kind, s, value, trainable=["controller", "heads"], tag=f"k{k}",
                           flat_extra={"finetune.samples_per_task": k},
                           final_extra={"test/a/f1": value, "test/b/f1": 1 - value})
                trials.append(t)
    r = C.build_report("variants", trials, METRIC, "max", resamples=RESAMPLES)
    a, b = r["comparisons"][0]
    assert (a, b) == ("stochastic[heads+controller]", "deterministic[heads+controller]")
    rows = r["by_setting"]["finetune.samples_per_task"]
    assert [row["paired"][METRIC]["n"] for row in rows] == [4, 4]
    assert rows[0]["paired"][METRIC]["mean"] == pytest.approx(0.01 + 1.5 / 1000)
    assert [row[METRIC]["n"] for row in r["by_noise_scale"]] == [8]
    assert r["win_rates"]["a"]["wins"] == 8 and r["win_rates"]["b"]["losses"] == 8
    settings = r["holm"]["families"]["settings"]["members"]
    assert f"`{METRIC}` {a} - {b} at finetune.samples_per_task=16" in settings, settings
    md = R.markdown(r, [])
    assert f"## Per-task win rates ({a} vs {b}, test F1)" in md
    assert f"## Stochastic[heads+controller] - {b} per varied setting" in md


# ------------------------------------------------------------------- binned panels

SAMPLED_LRS = [0.024834578223029882, 0.0031234567891234, 0.012345678901234, 0.056789012345678, 0.0078901234567891,
               0.045678901234567]


def test_a_sampled_float_setting_is_binned_into_shared_axis_panels(tmp_path):
    steps = range(0, 50, 10)
    trials = [_trial(k, s, 0.8, flat_extra={"finetune.lr.controller": lr},
                     curve=[(x, 0.5 + (0.004 if k == "stochastic" else 0.002) * x * (1 + s / 10)) for x in steps])
              for s, lr in enumerate(SAMPLED_LRS) for k in ("deterministic", "stochastic")]
    r = C.build_report("tpe", trials, METRIC, "max", resamples=RESAMPLES)
    e = r["efficiency"]
    assert e["binned_settings"] == ["finetune.lr.controller"]
    arms = [p["arm"] for p in e["panels"]]
    assert 1 < len(arms) <= K.BINS < len(SAMPLED_LRS)
    assert all(a.startswith("finetune.lr.controller in [") for a in arms), arms
    assert not any(str(lr) in a for lr in SAMPLED_LRS for a in arms)  # 3 significant digits
    assert arms == ["finetune.lr.controller in [0.00312, 0.00789]", "finetune.lr.controller in [0.0123, 0.0123]",
                    "finetune.lr.controller in [0.0248, 0.0248]", "finetune.lr.controller in [0.0457, 0.0568]"]
    assert sum(p["kinds"]["stochastic"]["n"] for p in e["panels"]) == len(SAMPLED_LRS)
    fig, axes = P.curves_figure(r)
    assert len(axes) == len(arms)
    assert all(axes[0].get_shared_y_axes().joined(axes[0], ax) for ax in axes[1:])
    assert tmp_path / "curves.png" in P.draw(r, trials, tmp_path)
    assert (tmp_path / "curves.png").stat().st_size > 0
    by = r["by_setting"]["finetune.lr.controller"]
    assert [row["value"] for row in by] == [a.split(" in ")[1] for a in arms]


def test_a_float_range_from_the_search_space_is_binned_even_with_few_values():
    trials = [_trial(k, s, 0.8, flat_extra={"finetune.lr.controller": lr}, curve=[(0, 0.5), (10, 0.6)])
              for s, lr in enumerate([0.01, 0.02, 0.04]) for k in ("deterministic", "stochastic")]
    plain = C.build_report("few", trials, METRIC, "max", resamples=RESAMPLES)["efficiency"]
    assert plain["binned_settings"] == [] and plain["panels"][0]["arm"] == "finetune.lr.controller=0.01"
    ranged = C.build_report("few", trials, METRIC, "max", resamples=RESAMPLES,
                            ranges={"finetune.lr.controller"})["efficiency"]
    assert ranged["binned_settings"] == ["finetune.lr.controller"]
    assert ranged["panels"][0]["arm"].startswith("finetune.lr.controller in [")


# ------------------------------------------------------------------- cost

def _costed(kind, seed, start, wall, pretrain, wait, state="completed"):
    final = {"pretrain_seconds": pretrain, "pretrain_wait_seconds": wait, "wall_seconds": wall}
    return _trial(kind, seed, 0.8, final_extra=final, state=state, start=start, wall=wall,
                  flat_extra={"pretrain.modulation_kind": "none", "pretrain.epochs": 3})


def test_cost_section_from_trial_records():
    trials = [_costed("deterministic", 0, 1000.0, 100.0, 60.0, 0.0),  # pretrains seed 0's shared network
              _costed("stochastic", 0, 1000.0, 90.0, 0.0, 50.0),  # waits for it
              _costed("deterministic", 1, 1090.0, 110.0, 60.0, 0.0),
              _costed("stochastic", 1, 1100.0, 80.0, 0.0, 40.0),
              _costed("stochastic", 2, 1150.0, 100.0, 0.0, 0.0, state="pruned")]  # ends last: counts for the wall
    c = C.study_cost(trials, max_concurrent=2)
    assert c["trials"] == 4 and c["wait_share"] == pytest.approx(90 / 380)
    assert c["pretrainings"] == 2 and c["pretrain_seconds_mean"] == pytest.approx(60.0)
    assert c["study_wall_seconds"] == pytest.approx(250.0) and c["study_wall_from"].startswith("first trial start")
    assert c["per_kind_pretrainings"] == 4 and c["extra_pretrainings"] == 2  # (kind, seed) pairs
    assert c["per_kind_wall_seconds"] == pytest.approx(250 + 2 * 60 / 2)
    assert c["ratio"] == pytest.approx(250 / 310)
    r = C.build_report("cost", trials, METRIC, "max", resamples=RESAMPLES, max_concurrent=2)
    assert r["cost"] == c
    md = R.markdown(r, [])
    assert "## What the study cost" in md and "| 23.7% | under 10% |" in md and "| 0.81x | at most 0.4x |" in md
    assert "**estimate**" in md

    for t in trials:  # no start times: the wall is the sum of wall times over the slots, an estimate
        t.start_time = None
    c = C.study_cost(trials, max_concurrent=2)
    assert c["study_wall_seconds"] == pytest.approx(480 / 2) and c["study_wall_from"].startswith("estimate")


def test_cost_section_says_when_the_metrics_are_absent():
    r = C.build_report("old", _headline_study(3), METRIC, "max", resamples=RESAMPLES)
    assert r["cost"]["trials"] == 0 and r["cost"]["wait_share"] is None
    md = R.markdown(r, [])
    assert "## What the study cost" in md and "no cost figures" in md


def test_the_pretraining_section_groups_shared_pretrainings_by_design():
    trials = []
    for s in range(3):
        curve = [(e, 0.5 + 0.01 * e + 0.001 * s) for e in range(1, 9)]
        for kind in ("deterministic", "stochastic"):
            t = _trial(kind, s, 0.7, flat_extra={"pretrain.modulation_kind": "none"})
            t.curves["pretrain/" + METRIC] = curve  # the same file for both kinds of a seed
            trials.append(t)
    own = _trial("stochastic", 0, 0.7, flat_extra={"pretrain.modulation_kind": "same"}, tag="own")
    own.curves["pretrain/" + METRIC] = [(e, 0.6) for e in range(1, 9)]
    pre = U.pretraining(trials + [own], METRIC, "max")
    assert list(pre["kinds"]) == ["stochastic", "shared none"]
    assert pre["kinds"]["shared none"]["n"] == 3  # three seeds' files, each counted once
    assert pre["plateau"]["shared none"]["gain"] == pytest.approx(0.03)
    assert pre["plateau"]["stochastic"]["gain"] == pytest.approx(0.0)


def test_holm_adjusts_within_each_family_not_across_the_report():
    r = C.build_report("conds", _conditions_study(seeds=10), METRIC, "max", resamples=RESAMPLES)
    families = r["holm"]["families"]
    conditions = families["conditions"]
    assert conditions["m"] == len([p for p in r["paired"].values() if p["n"] >= 2])
    units = [p for p in r["paired"].values() if p["n"] >= 2]
    assert [u["p_holm"] for u in units] == pytest.approx(S.holm([u["p_sign_flip"] for u in units]))
    assert sum(f["m"] for f in families.values()) > conditions["m"]  # other families exist, adjusted apart


def test_groups_that_fine_tune_one_pretraining_are_one_unit():
    trials = []
    for k in (16, 128):  # two K arms of each seed: one pretrained network per seed
        for t in _headline_study(5):
            t.flat["finetune.samples_per_task"] = k
            t.trial_id += str(k)
            trials.append(t)
    headline = C.build_report("k", trials, METRIC, "max", resamples=RESAMPLES)["paired"]["stochastic-deterministic"]
    assert headline["n"] == 10 and headline["by_seed"]["n"] == 5 and headline["by_seed"]["p_holm"] is not None


def test_the_headline_is_the_variant_pair_when_both_kinds_ran_only_with_it():
    both = "stochastic[heads+controller]", "deterministic[heads+controller]"
    pairs = K.comparisons([*both, "none[heads]"])
    assert pairs[0] == both and (both[1], "none[heads]") in pairs
    assert ("stochastic", "deterministic") not in pairs
    assert K.comparisons(["stochastic", "deterministic"])[0] == ("stochastic", "deterministic")
