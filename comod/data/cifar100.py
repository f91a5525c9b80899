"""CIFAR-100 as multi-task data: 20 coarse classes over 100 fine ones, or
one 5-way task per superclass.

The method's CIFAR-100 protocol pretrains on the coarse classes and adapts
to the fine ones (docs/method.md, "Datasets and protocols"). Files are
torchvision's ``cifar-100-python/`` pickles, read by torchvision's class.
"""
from __future__ import annotations

import os
import pickle

import torch
from torchvision.datasets import CIFAR100

from .taskdata import (DatasetNotFoundError, Split, TaskData, channel_stats, check_task_set,
                       hierarchy_labels, resize_images, search_roots, split_off_validation)

TASK_SETS = {
    "coarse_fine": "coarse (20-way superclass) and fine (100-way class)",
    "superclasses": "coarse (20-way) plus one 5-way task per superclass, named after it "
                    "(fine class among its five; ignored outside the superclass)",
}
FOLDER = CIFAR100.base_folder
FILES = ("train", "test", "meta")


class CIFAR100Files(CIFAR100):
    """torchvision's reader with presence checks in place of md5 checks:
    torchvision compares the pickles' md5s, which any re-pickled copy (and
    the test fakes) fail although their content reads the same."""

    meta = {**CIFAR100.meta, "md5": None}  # check_integrity(path, None) tests existence only

    def _check_integrity(self) -> bool:
        return all(os.path.isfile(os.path.join(self.root, self.base_folder, name))
                   for name, _ in self.train_list + self.test_list)


def read_pickle(path: str) -> dict:
    # The files were pickled by Python 2; latin1 turns its str keys into str, as torchvision does.
    with open(path, "rb") as f:
        return pickle.load(f, encoding="latin1")


def locate(root: str | None) -> str:
    searched = search_roots(root)
    for base in searched:
        if all(os.path.isfile(os.path.join(base, FOLDER, name)) for name in FILES):
            return base
    raise DatasetNotFoundError("\n".join(
        [f"CIFAR-100 not found: no folder holds {FOLDER}/{{{','.join(FILES)}}}.", "Looked in:"]
        + [f"  {os.path.join(base, FOLDER)}" for base in searched]
        + ["Get it with one of:",
           "  extract cifar-100-python.tar.gz (www.cs.toronto.edu/~kriz/cifar.html) into ROOT, "
           "so that ROOT/cifar-100-python/train exists, then set COMOD_DATA=ROOT or pass root",
           "  torchvision.datasets.CIFAR100(ROOT, download=True) when online, then COMOD_DATA=ROOT"]))


def read_split(base: str, train: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list]:
    """Images ``[N, 3, 32, 32]``, fine and coarse labels, fine class names."""
    dataset = CIFAR100Files(base, train=train)
    images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous()
    fine = torch.tensor(dataset.targets, dtype=torch.long)
    coarse = torch.cat([
        torch.tensor(read_pickle(os.path.join(base, FOLDER, name))["coarse_labels"], dtype=torch.long)
        for name, _ in (dataset.train_list if train else dataset.test_list)])
    assert len(coarse) == len(fine), f"{len(coarse)} coarse labels for {len(fine)} images"
    return images, fine, coarse, list(dataset.classes)


def coarse_of_fine(fine: torch.Tensor, coarse: torch.Tensor, num_fine: int) -> torch.Tensor:
    """The superclass of each fine class, read off the labels themselves."""
    pairs = torch.unique(torch.stack([fine, coarse], 1), dim=0)
    if len(pairs) != num_fine or not torch.equal(pairs[:, 0], torch.arange(num_fine)):
        raise ValueError(f"CIFAR-100 labels do not form a hierarchy: expected each of the "
                         f"{num_fine} fine classes in exactly one superclass, got "
                         f"{len(pairs)} (fine, coarse) pairs; the files may be damaged")
    return pairs[:, 1]


def load(root: str | None, task_set: str, image_size: int | None, val_fraction: float,
         seed: int) -> TaskData:
    """CIFAR-100 with the official test split and a seeded ``val_fraction``
    of train split off for validation."""
    check_task_set("cifar100", task_set, TASK_SETS)
    base = locate(root)
    coarse_names = read_pickle(os.path.join(base, FOLDER, "meta"))["coarse_label_names"]
    raw = {name: read_split(base, train=name == "train") for name in ("train", "test")}
    fine_names = raw["train"][3]
    hierarchy = coarse_of_fine(torch.cat([raw[s][1] for s in raw]),
                               torch.cat([raw[s][2] for s in raw]), len(fine_names))
    splits = {}
    for name, (images, fine, coarse, _) in raw.items():
        tasks, labels = hierarchy_labels(fine, hierarchy, coarse_names, fine_names,
                                         within_groups=task_set == "superclasses")
        splits[name] = Split(resize_images(images, image_size), labels)
    train, val = split_off_validation(splits["train"], val_fraction, seed)
    mean, std = channel_stats(train.images)
    return TaskData(name="cifar100", tasks=tasks, train=train, val=val, test=splits["test"],
                    mean=mean, std=std,
                    info={"source": os.path.join(base, FOLDER), "task_set": task_set})
