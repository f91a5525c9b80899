"""What a trial's report carries to Ray Tune (``conventions.pack_report``) and how the driver reads it
back (``conventions.report_metrics``): Ray Tune sees the search's metric and the protocol's keys as
values of their own, every other metric inside one text, and nothing is lost on the way."""
from __future__ import annotations

import math

from ray.tune.experiment import Trial

from comod_platform.conventions import (CURVE, EPOCH, FINAL_FLAG, METRICS, NODE, PROTOCOL_KEYS, STEP, pack_report,
                                        report_metrics)
from comod_platform.trial_runs import numeric_metrics

ROW = {"val/mean_f1": 0.75, "test/mean_f1": 0.7, "test/pattern_0/ece": float("nan"), "wall_seconds": 1.5,
       "steps": 120, FINAL_FLAG: 1, STEP: 120, EPOCH: 4, NODE: "abc", CURVE: "[[60, {\"x\": 1.0}]]"}


def test_ray_tune_sees_the_metric_and_the_protocol_and_the_driver_reads_the_whole_report():
    packed = pack_report(ROW, "val/mean_f1")
    assert set(packed) == {"val/mean_f1", METRICS} | (set(ROW) & PROTOCOL_KEYS)
    assert packed["val/mean_f1"] == 0.75 and packed[EPOCH] == 4 and packed[CURVE] == ROW[CURVE]
    back = report_metrics(packed)
    assert set(back) == set(ROW) and back["test/mean_f1"] == 0.7 and math.isnan(back["test/pattern_0/ece"])
    assert numeric_metrics(packed).keys() == numeric_metrics(ROW).keys()  # what MLflow gets is the same
    assert report_metrics(ROW) == ROW  # a report that was never packed (an older search's) reads as it is
    assert pack_report({STEP: 3, EPOCH: 1}, "val/mean_f1") == {STEP: 3, EPOCH: 1}  # nothing to pack


def test_a_packed_report_keeps_ray_tunes_statistics_of_a_trial_small():
    many = {**ROW, **{f"test/pattern_{i}/{m}": 0.5 for i in range(20) for m in ("f1", "ece", "recall")}}
    sizes = []
    for row in (many, pack_report(many, "val/mean_f1")):
        trial = Trial("trainable", stub=True)
        for step in range(1, 5):  # what Ray Tune keeps of each report
            trial.update_last_result({**row, "training_iteration": step})
        sizes.append(len(trial.get_json_state()[1]))  # the run metadata each snapshot of the experiment writes
    assert sizes[1] * 4 < sizes[0], sizes
