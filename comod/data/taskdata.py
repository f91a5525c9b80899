"""In-memory multi-task data: uint8 images, one label column per task.

Every dataset loader returns a :class:`TaskData`. Images stay uint8 (4x less
memory than float) and are normalised on the device, batch by batch, so the
training loop never decodes or converts a sample in Python.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

IGNORE = -1
"""Label value of a sample that does not take part in a task (e.g. an image
outside a CIFAR-100 superclass for that superclass's 5-way task)."""


@dataclass(frozen=True)
class TaskSpec:
    """One task: a binary attribute (``num_classes == 2``, one logit) or a
    ``num_classes``-way classification (one logit per class)."""

    name: str
    num_classes: int
    class_names: tuple[str, ...] = ()

    @property
    def binary(self) -> bool:
        return self.num_classes == 2

    @property
    def num_outputs(self) -> int:
        return 1 if self.binary else self.num_classes


@dataclass
class Split:
    """One split: uint8 images ``[N, C, H, W]`` and labels ``[N, T]`` (int64,
    ``IGNORE`` where a sample is not part of a task)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self):
        assert self.images.dtype == torch.uint8 and self.images.dim() == 4, (
            f"images must be uint8 [N, C, H, W], got {self.images.dtype} {tuple(self.images.shape)}")
        assert self.labels.dim() == 2 and self.labels.shape[0] == self.images.shape[0], (
            f"labels must be [N, T] with N={self.images.shape[0]}, got {tuple(self.labels.shape)}")
        self.labels = self.labels.long()

    def __len__(self) -> int:
        return self.images.shape[0]

    def task_indices(self, task: int) -> torch.Tensor:
        """Indices of the samples that take part in ``task``."""
        return torch.nonzero(self.labels[:, task] != IGNORE, as_tuple=False).flatten()

    def subset(self, index: torch.Tensor) -> "Split":
        return Split(self.images[index], self.labels[index])

    def to(self, device) -> "Split":
        return Split(self.images.to(device), self.labels.to(device))


@dataclass
class TaskData:
    """A dataset ready for training: train/val/test splits, the tasks (one
    label column each) and the per-channel mean and std (in [0, 1] units)
    used to normalise images on the device."""

    name: str
    tasks: list[TaskSpec]
    train: Split
    val: Split
    test: Split
    mean: tuple[float, ...]
    std: tuple[float, ...]
    info: dict = field(default_factory=dict)

    def __post_init__(self):
        for split_name in ("train", "val", "test"):
            split = getattr(self, split_name)
            assert split.labels.shape[1] == len(self.tasks), (
                f"{split_name} has {split.labels.shape[1]} label columns for {len(self.tasks)} tasks")
        assert len(self.mean) == len(self.std) == self.train.images.shape[1]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.images.shape[1:])

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def task_index(self, name: str) -> int:
        names = self.task_names
        if name not in names:
            raise KeyError(f"unknown task {name!r}; tasks of {self.name}: {', '.join(names)}")
        return names.index(name)


def normalise(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 ``[B, C, H, W]`` -> float, scaled to [0, 1] then standardised per
    channel. ``mean`` and ``std`` are ``[1, C, 1, 1]`` tensors on the device."""
    return (images.to(dtype) / 255.0 - mean) / std


def split_off_validation(train: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    """Split a seeded random ``fraction`` of ``train`` off as a validation set
    (for datasets without an official validation split)."""
    n = len(train)
    n_val = int(round(n * fraction))
    if n_val <= 0 or n_val >= n:
        raise ValueError(f"validation fraction {fraction} leaves {n - n_val} of {n} samples "
                         f"for training; choose 0 < fraction < 1 with both parts non-empty")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return train.subset(perm[n_val:].sort().values), train.subset(perm[:n_val].sort().values)


class DatasetNotFoundError(FileNotFoundError):
    """A dataset is not on disk. The message says where it looked and how to
    get it, so the command line can print it as it is."""


def resize_images(images: torch.Tensor, size: int | None, chunk: int = 4096) -> torch.Tensor:
    """Resize uint8 ``[N, C, H, W]`` images to ``size x size`` with
    antialiasing, once at load time, in chunks so the float intermediates of
    a large dataset never exist all at once. ``size=None`` keeps them."""
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size <= 0):
        raise ValueError(f"image_size must be a positive int (or None for the native size), "
                         f"got {size!r}")
    if size is None or tuple(images.shape[-2:]) == (size, size):
        return images
    from torchvision.transforms.v2 import functional as TF  # here: a dataset that needs no resize loads without it

    parts = [TF.resize(images[i:i + chunk], [size, size], antialias=True)
             for i in range(0, len(images), chunk)]
    return torch.cat(parts) if parts else images.new_empty((0, images.shape[1], size, size))


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 ``[N, C, H, W]`` images in [0, 1]
    units. Computed from a 256-bin histogram per channel, exact and without
    a float copy of the images."""
    values = torch.arange(256, dtype=torch.float64) / 255.0
    mean, std = [], []
    for c in range(images.shape[1]):
        counts = torch.bincount(images[:, c].reshape(-1), minlength=256).double()
        n = counts.sum()
        m = (counts * values).sum() / n
        var = (counts * values.square()).sum() / n - m * m
        mean.append(float(m))
        std.append(max(float(var.clamp_min(0).sqrt()), 1e-6))
    return tuple(mean), tuple(std)


def hierarchy_labels(fine: torch.Tensor, coarse_of_fine, coarse_names, fine_names,
                     within_groups: bool) -> tuple[list[TaskSpec], torch.Tensor]:
    """Tasks and label columns of a two-level class hierarchy.

    ``within_groups=False``: tasks ``coarse`` and ``fine``. ``True``:
    ``coarse`` plus one task per coarse class, named after it, that tells its
    fine classes apart (label = position among them in fine-id order) and is
    ``IGNORE`` for samples outside the group, as in CIFAR-100's
    per-superclass tasks."""
    coarse_of_fine = torch.as_tensor(coarse_of_fine, dtype=torch.long)
    fine = fine.long()
    tasks = [TaskSpec("coarse", len(coarse_names), tuple(coarse_names))]
    columns = [coarse_of_fine[fine]]
    if not within_groups:
        tasks.append(TaskSpec("fine", len(fine_names), tuple(fine_names)))
        columns.append(fine)
    else:
        for group, group_name in enumerate(coarse_names):
            members = torch.nonzero(coarse_of_fine == group).flatten()
            assert len(members) >= 2, f"group {group_name!r} has {len(members)} fine classes"
            position = torch.full((len(fine_names),), IGNORE, dtype=torch.long)
            position[members] = torch.arange(len(members))
            tasks.append(TaskSpec(group_name, len(members),
                                  tuple(fine_names[i] for i in members.tolist())))
            columns.append(position[fine])
    return tasks, torch.stack(columns, dim=1)


def check_task_set(dataset: str, task_set: str, task_sets: dict[str, str]) -> None:
    """Reject an unknown task set with the valid choices."""
    if task_set not in task_sets:
        raise ValueError(f"unknown task set {task_set!r} for {dataset}; choose one of: "
                         f"{', '.join(sorted(task_sets))}")


def search_roots(root: str | None) -> list[str]:
    """Folders to look in: ``root`` alone when given, else ``$COMOD_DATA``
    (when set) and ``./data``, torchvision's usual download root."""
    if root is not None:
        return [os.path.abspath(os.path.expanduser(str(root)))]
    roots = []
    if os.environ.get("COMOD_DATA"):
        roots.append(os.path.abspath(os.path.expanduser(os.environ["COMOD_DATA"])))
    roots.append(os.path.abspath("data"))
    return roots


def save_cache(cache: dict, path: str, what: str) -> None:
    """Write a dataset's decoded-image cache; a failure only warns (the next load decodes again).
    Written to a temporary name and renamed, so a killed run leaves no half file."""
    import os
    import warnings

    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        torch.save(cache, tmp)
        os.replace(tmp, path)
    except OSError as err:
        warnings.warn(f"could not write the {what} cache {path} ({err}); every load will decode the images "
                      f"again. Make the folder writable to cache.")
        if os.path.exists(tmp):
            os.remove(tmp)
