"""Per-task classification metrics and their means over tasks.

Binary attributes: accuracy, error, and precision, recall, F1 of the
positive class (the CelebA convention). Multi-class tasks: accuracy, error,
macro-averaged precision, recall and F1 over the classes present. Both:
expected calibration error (ECE, equal-width confidence bins).
"""
from __future__ import annotations

import torch

from comod.data.taskdata import TaskSpec

from comod.metric_names import METRICS, SELECTABLE  # noqa: F401 - re-exported


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return torch.where(den > 0, num / den.clamp_min(1), torch.zeros_like(num))


def expected_calibration_error(confidence: torch.Tensor, correct: torch.Tensor, bins: int = 15) -> float:
    """Sum over equal-width confidence bins of |accuracy - confidence| weighted by bin size."""
    if confidence.numel() == 0:
        return 0.0
    idx = (confidence.clamp(0, 1) * bins).long().clamp_max(bins - 1)
    conf_sum = torch.bincount(idx, weights=confidence.double(), minlength=bins)
    acc_sum = torch.bincount(idx, weights=correct.double(), minlength=bins)
    return float((conf_sum - acc_sum).abs().sum() / confidence.numel())


def task_metrics(logits: torch.Tensor, labels: torch.Tensor, task: TaskSpec, ece_bins: int = 15) -> dict:
    """Metrics of one task from its logits (``[N]`` binary, ``[N, K]`` multi-class)."""
    # a wrecked model (e.g. couplings so large that exp(mu c) overflows) scores as uncertain, not a crash
    logits, labels = torch.nan_to_num(logits.float().cpu(), nan=0.0), labels.cpu()
    if task.binary:
        prob = torch.sigmoid(logits)
        pred = (logits > 0).long()
        tp = ((pred == 1) & (labels == 1)).sum().double()
        fp = ((pred == 1) & (labels == 0)).sum().double()
        fn = ((pred == 0) & (labels == 1)).sum().double()
        precision, recall = _safe_div(tp, tp + fp), _safe_div(tp, tp + fn)
        confidence = torch.where(pred == 1, prob, 1 - prob)
    else:
        prob = torch.softmax(logits, dim=1)
        confidence, pred = prob.max(dim=1)
        k = task.num_classes
        conf = torch.bincount(labels * k + pred, minlength=k * k).reshape(k, k).double()
        tp = conf.diag()
        support, predicted = conf.sum(1), conf.sum(0)
        present = support > 0
        precision = _safe_div(tp, predicted)[present].mean()
        recall = _safe_div(tp, support)[present].mean()
    correct = pred == labels
    accuracy = correct.double().mean() if labels.numel() else torch.tensor(0.0)
    if task.binary:
        f1 = _safe_div(2 * precision * recall, precision + recall)
    else:
        per_p, per_r = _safe_div(tp, predicted), _safe_div(tp, support)
        f1 = _safe_div(2 * per_p * per_r, per_p + per_r)[present].mean()
    return {
        "accuracy": float(accuracy), "error": float(1 - accuracy), "precision": float(precision),
        "recall": float(recall), "f1": float(f1),
        "ece": expected_calibration_error(confidence, correct, ece_bins),
    }


def summarise(per_task: dict[str, dict], prefix: str) -> dict[str, float]:
    """Flat ``{prefix/task/metric, prefix/mean_metric}`` from per-task metric dicts."""
    flat: dict[str, float] = {}
    for name, values in per_task.items():
        for metric, value in values.items():
            flat[f"{prefix}/{name}/{metric}"] = value
    for metric in METRICS:
        values = [v[metric] for v in per_task.values() if metric in v]
        if values:
            flat[f"{prefix}/mean_{metric}"] = sum(values) / len(values)
    return flat


def selection_score(flat: dict[str, float], prefix: str, select_metric: str) -> float:
    """The (higher is better) model-selection score ``select_metric`` from summarised metrics."""
    if select_metric.startswith("neg_"):
        return -flat[f"{prefix}/{select_metric[4:]}"]
    return flat[f"{prefix}/{select_metric}"]
