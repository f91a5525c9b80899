import pytest
import torch

from comod.data.taskdata import TaskSpec
from comod.metrics import expected_calibration_error, selection_score, summarise, task_metrics


def test_binary_metrics_by_hand():
    labels = torch.tensor([1, 1, 1, 0, 0, 0, 0, 0])
    logits = torch.tensor([2.0, 1.0, -1.0, 1.0, -2.0, -2.0, -2.0, -2.0])
    m = task_metrics(logits, labels, TaskSpec("t", 2))
    # tp=2 fp=1 fn=1
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["accuracy"] == pytest.approx(6 / 8)
    assert m["error"] == pytest.approx(2 / 8)


def test_all_negative_predictions_give_zero_f1_not_nan():
    m = task_metrics(torch.full((4,), -3.0), torch.tensor([1, 0, 0, 0]), TaskSpec("t", 2))
    assert m["f1"] == 0.0 and m["precision"] == 0.0 and m["accuracy"] == 0.75


def test_multiclass_macro_metrics():
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    pred = torch.tensor([0, 1, 1, 1, 2, 0])
    logits = torch.nn.functional.one_hot(pred, 3).float() * 5
    m = task_metrics(logits, labels, TaskSpec("t", 3))
    precision = [1 / 2, 2 / 3, 1.0]
    recall = [1 / 2, 1.0, 1 / 2]
    f1 = [2 * p * r / (p + r) for p, r in zip(precision, recall)]
    assert m["precision"] == pytest.approx(sum(precision) / 3)
    assert m["recall"] == pytest.approx(sum(recall) / 3)
    assert m["f1"] == pytest.approx(sum(f1) / 3)
    assert m["accuracy"] == pytest.approx(4 / 6)


def test_ece():
    conf = torch.tensor([0.9, 0.9, 0.9, 0.9, 0.6, 0.6])
    correct = torch.tensor([1, 1, 1, 0, 1, 0])
    # bin 0.9: acc .75 conf .9 -> 4/6*.15 ; bin 0.6: acc .5 conf .6 -> 2/6*.1
    assert expected_calibration_error(conf, correct, 10) == pytest.approx(4 / 6 * 0.15 + 2 / 6 * 0.1)
    assert expected_calibration_error(torch.ones(5), torch.ones(5)) == pytest.approx(0.0)


def test_summarise_and_selection():
    flat = summarise({"a": {"f1": 0.5, "error": 0.1}, "b": {"f1": 0.7, "error": 0.3}}, "val")
    assert flat["val/mean_f1"] == pytest.approx(0.6)
    assert flat["val/a/f1"] == 0.5
    assert selection_score(flat, "val", "mean_f1") == pytest.approx(0.6)
    assert selection_score(flat, "val", "neg_mean_error") == pytest.approx(-0.2)
