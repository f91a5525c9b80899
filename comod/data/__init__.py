"""Datasets as in-memory multi-task data (:class:`TaskData`), loaded by name."""
from __future__ import annotations

from comod.data.folder import FolderDataError
from comod.data.taskdata import (IGNORE, DatasetNotFoundError, Split, TaskData, TaskSpec, normalise,
                                 split_off_validation)


def load_data(cfg) -> TaskData:
    """The dataset of an :class:`comod.config.ExperimentConfig` (its ``data`` section and seed)."""
    from comod.data.registry import load_task_data

    d = cfg.data
    return load_task_data(d.dataset, d.root, d.tasks, d.image_size, d.val_fraction, d.split_seed,
                          train_limit=d.train_limit, test_limit=d.test_limit)


__all__ = ["IGNORE", "DatasetNotFoundError", "FolderDataError", "Split", "TaskData", "TaskSpec", "normalise",
           "split_off_validation", "load_data"]
