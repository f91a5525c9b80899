"""The names of the metrics (torch-free, so configs and search files are checked without torch)."""

METRICS = ("accuracy", "error", "precision", "recall", "f1", "ece")
"""Per task, and averaged over tasks as ``mean_<name>``."""

SELECTABLE = tuple(f"mean_{m}" for m in ("accuracy", "precision", "recall", "f1")) + ("neg_mean_error",
                                                                                    "neg_mean_ece")
"""Validation metrics that can pick the fine-tuning epoch (``eval.select_metric``); higher is better."""
