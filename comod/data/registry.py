"""Datasets by name, and loading with optional size limits for small runs.

Contract: every module in ``DATASETS`` exports ``TASK_SETS`` (task-set name
-> one-line description) and ``load(root, task_set, image_size,
val_fraction, seed) -> TaskData``; a missing dataset raises
``DatasetNotFoundError`` with the paths searched and how to get it.
``folder`` (your own images, ``ROOT/labels.csv``) also takes a list of
column names as ``task_set``, and reports a malformed CSV or image as a
``DatasetNotFoundError`` too (its subclass ``FolderDataError``).
"""
from __future__ import annotations

import importlib

import torch

from .taskdata import Split, TaskData

DATASETS = {
    "fashion_mnist": "comod.data.fashion_mnist",
    "fashion_mosaic": "comod.data.fashion_mosaic",
    "celeba": "comod.data.celeba",
    "cifar100": "comod.data.cifar100",
    "synthetic": "comod.data.synthetic",
    "folder": "comod.data.folder",
}
"""Dataset name -> its module, imported when the dataset is first used (the torchvision-based readers
cost about 1.5 s to import, which a search on synthetic data need not pay)."""


def dataset_module(dataset: str):
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of: {', '.join(DATASETS)}")
    return importlib.import_module(DATASETS[dataset])


def task_sets(dataset: str) -> dict[str, str]:
    """Task-set name -> description for ``dataset``."""
    return dict(dataset_module(dataset).TASK_SETS)


def check_limit(name: str, value) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
        raise ValueError(f"{name} must be a positive int (or None for all samples), "
                         f"got {value!r}")


def random_subset(split: Split, n: int, seed: int) -> Split:
    """A seeded random ``n`` samples of ``split`` in their original order."""
    if n >= len(split):
        return split
    keep = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))[:n]
    return split.subset(keep.sort().values)


def load_task_data(dataset: str, root: str | None, task_set: str | list[str], image_size: int | None,
                   val_fraction: float, seed: int, train_limit: int | None = None,
                   test_limit: int | None = None) -> TaskData:
    """Load ``dataset`` and keep a seeded random ``train_limit`` train
    samples (val shrinks with it to ``max(1, train_limit * val_fraction)``)
    and ``test_limit`` test samples; None keeps all."""
    module = dataset_module(dataset)
    check_limit("train_limit", train_limit)
    check_limit("test_limit", test_limit)
    data = module.load(root, task_set, image_size, val_fraction, seed)
    if train_limit is not None:
        data.train = random_subset(data.train, train_limit, seed)
        data.val = random_subset(data.val, max(1, round(train_limit * val_fraction)), seed + 1)
    if test_limit is not None:
        data.test = random_subset(data.test, test_limit, seed + 2)
    data.info.update(train_limit=train_limit, test_limit=test_limit)
    return data
