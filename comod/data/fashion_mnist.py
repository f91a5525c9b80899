"""Fashion-MNIST as multi-task data: one-vs-rest attributes, or a coarse
(tops / footwear / other) over fine (10 classes) hierarchy.

The CPU-scale protocol of the method (docs/method.md, "Datasets and
protocols"). Files are the original IDX files, gzipped or not, read with
torchvision's IDX reader; Debian ships them in ``dataset-fashion-mnist``.
"""
from __future__ import annotations

import gzip
import os
import re
import shutil
import socket
import tempfile
from urllib.parse import urlparse

import torch
from torchvision.datasets import FashionMNIST
from torchvision.datasets.mnist import read_image_file, read_label_file

from .taskdata import (DatasetNotFoundError, Split, TaskData, TaskSpec, channel_stats,
                       check_task_set, hierarchy_labels, resize_images, search_roots,
                       split_off_validation)

SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
GROUPS = ("tops", "footwear", "other")
GROUP_OF_CLASS = (0, 2, 0, 2, 0, 1, 0, 1, 2, 1)

TASK_SETS = {
    "attributes": "10 binary one-vs-rest tasks, one per class (t_shirt_top, ..., ankle_boot)",
    "coarse_fine": "coarse (3-way: tops, footwear, other) and fine (10-way)",
    "groups": "coarse (3-way) plus the fine class within each group "
              "(tops 4-way, footwear 3-way, other 3-way; ignored outside the group)",
}


def snake_case(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def candidate_dirs(root: str | None) -> list[str]:
    """Folders that may hold the four IDX files, in search order: the flat
    ``fashion-mnist/`` folder and torchvision's ``FashionMNIST/raw/`` under
    each search root (and ``root`` itself when given), then Debian's."""
    dirs = [search_roots(root)[0]] if root is not None else []
    for base in search_roots(root):
        dirs += [os.path.join(base, "fashion-mnist"), os.path.join(base, "FashionMNIST", "raw")]
    if root is None:
        dirs.append(SYSTEM_DIR)
    return dirs


def find_files(directory: str) -> dict[str, str] | None:
    """Paths of the four files in ``directory`` (plain preferred over
    ``.gz``), or None if any is missing."""
    found = {}
    for key, name in FILES.items():
        for path in (os.path.join(directory, name), os.path.join(directory, name + ".gz")):
            if os.path.isfile(path):
                found[key] = path
                break
        else:
            return None
    return found


def read_idx(path: str, reader) -> torch.Tensor:
    """torchvision's reader takes a path to an uncompressed file, so a
    gzipped file is inflated to a temporary file first."""
    if not path.endswith(".gz"):
        return reader(path)
    with gzip.open(path, "rb") as src, tempfile.NamedTemporaryFile(suffix=".idx") as tmp:
        shutil.copyfileobj(src, tmp, length=1 << 22)
        tmp.flush()
        return reader(tmp.name)


def not_found_message(searched: list[str], download_note: str) -> str:
    names = ", ".join(f"{n}[.gz]" for n in FILES.values())
    lines = [f"Fashion-MNIST not found: no folder holds all of {names}.", "Looked in:"]
    lines += [f"  {d}" for d in searched]
    lines += ["Get it with one of:",
              "  apt-get install -y dataset-fashion-mnist   (files land in " + SYSTEM_DIR + ")",
              "  copy the four files into $COMOD_DATA/fashion-mnist/ (set COMOD_DATA) "
              "or pass their folder as root",
              "  torchvision.datasets.FashionMNIST(ROOT, download=True) when online, "
              "then set COMOD_DATA=ROOT (it writes ROOT/FashionMNIST/raw/)"]
    if download_note:
        lines.append(download_note)
    return "\n".join(lines)


def try_download() -> tuple[dict[str, str] | None, str]:
    """Let torchvision download into $COMOD_DATA (or ./data) when its mirror
    answers within seconds; offline this costs one failed DNS lookup.
    ``COMOD_DOWNLOAD=0`` turns it off."""
    if os.environ.get("COMOD_DOWNLOAD", "1") == "0":
        return None, "(download skipped: COMOD_DOWNLOAD=0)"
    url = urlparse(FashionMNIST.mirrors[0])
    try:
        socket.create_connection((url.hostname, url.port or 80), timeout=3).close()
    except OSError as err:
        return None, f"(download skipped: {url.hostname} unreachable: {err})"
    target = search_roots(None)[0]
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(30)  # urllib has no timeout of its own; do not hang
    try:
        FashionMNIST(target, download=True)
    except Exception as err:  # any failure means "not found", reported with the paths
        return None, f"(download into {target} failed: {err})"
    finally:
        socket.setdefaulttimeout(previous)
    return find_files(os.path.join(target, "FashionMNIST", "raw")), ""


def locate(root: str | None) -> dict[str, str]:
    searched = candidate_dirs(root)
    for directory in searched:
        files = find_files(directory)
        if files is not None:
            return files
    files, note = try_download() if root is None else (None, "")
    if files is None:
        raise DatasetNotFoundError(not_found_message(searched, note))
    return files


def labels_for(task_set: str, fine: torch.Tensor) -> tuple[list[TaskSpec], torch.Tensor]:
    if task_set == "attributes":
        tasks = [TaskSpec(snake_case(c), 2) for c in CLASSES]
        return tasks, torch.nn.functional.one_hot(fine.long(), len(CLASSES))
    return hierarchy_labels(fine, GROUP_OF_CLASS, GROUPS, tuple(snake_case(c) for c in CLASSES),
                            within_groups=task_set == "groups")


def load(root: str | None, task_set: str, image_size: int | None, val_fraction: float,
         seed: int) -> TaskData:
    """Fashion-MNIST with the official t10k test split and a seeded
    ``val_fraction`` of train split off for validation."""
    check_task_set("fashion_mnist", task_set, TASK_SETS)
    files = locate(root)
    splits = {}
    for name in ("train", "test"):
        images = read_idx(files[f"{name}_images"], read_image_file).unsqueeze(1)
        fine = read_idx(files[f"{name}_labels"], read_label_file)
        tasks, labels = labels_for(task_set, fine)
        splits[name] = Split(resize_images(images, image_size), labels)
    train, val = split_off_validation(splits["train"], val_fraction, seed)
    mean, std = channel_stats(train.images)
    return TaskData(name="fashion_mnist", tasks=tasks, train=train, val=val, test=splits["test"],
                    mean=mean, std=std,
                    info={"source": os.path.dirname(files["train_images"]), "task_set": task_set,
                          "classes": CLASSES})
