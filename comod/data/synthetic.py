"""A seeded synthetic multi-task set: the test double of the real datasets.

Each 3x16x16 image is noise plus any of six fixed coloured patterns, each
present with probability 1/2 at its own place. Every task reads the
pattern bits, so a small CNN learns them in a few dozen steps:
``attributes`` asks for each bit, ``coarse_fine`` and ``groups`` form a
hierarchy on the first two bits (coarse = bit 0, fine = 2 * bit 0 + bit 1),
mirroring Fashion-MNIST's task sets so every code path has a fast test.
"""
from __future__ import annotations

import torch

from .taskdata import (Split, TaskData, TaskSpec, channel_stats, check_task_set,
                       hierarchy_labels, resize_images)

TASK_SETS = {
    "attributes": "6 binary tasks, one per pattern (pattern_0, ..., pattern_5)",
    "coarse_fine": "coarse (2-way: bit 0) and fine (4-way: bits 0 and 1)",
    "groups": "coarse (2-way) plus the fine class within each group "
              "(group_0, group_1, 2-way each; ignored outside the group)",
}
NATIVE_SIZE = 16
NUM_PATTERNS = 6
PATTERN_SIZE = 5
SIZES = {"train": 1024, "val": 256, "test": 256}
NOISE_STD = 0.15
PATTERN_AMPLITUDE = 0.3
COARSE_OF_FINE = (0, 0, 1, 1)
GROUPS = ("group_0", "group_1")
FINE = ("fine_0", "fine_1", "fine_2", "fine_3")


def patterns() -> torch.Tensor:
    """``[P, 3, 16, 16]``: a +-1 texture, each in its own 5x5 patch.
    Fixed (seed 0) so that every data seed poses the same tasks."""
    g = torch.Generator().manual_seed(0)
    out = torch.zeros(NUM_PATTERNS, 3, NATIVE_SIZE, NATIVE_SIZE)
    corners = [(0, 0), (0, 5), (0, 10), (10, 0), (10, 5), (10, 10)]
    for p, (y, x) in enumerate(corners):
        texture = torch.randint(0, 2, (3, PATTERN_SIZE, PATTERN_SIZE), generator=g) * 2.0 - 1
        out[p, :, y:y + PATTERN_SIZE, x:x + PATTERN_SIZE] = texture
    return out


def generate(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` uint8 images and their ``[n, P]`` pattern bits."""
    bits = torch.randint(0, 2, (n, NUM_PATTERNS), generator=generator)
    noise = torch.randn(n, 3, NATIVE_SIZE, NATIVE_SIZE, generator=generator) * NOISE_STD
    signal = torch.einsum("np,pchw->nchw", bits.float(), patterns()) * PATTERN_AMPLITUDE
    images = ((0.5 + noise + signal).clamp(0, 1) * 255).round().to(torch.uint8)
    return images, bits


def labels_for(task_set: str, bits: torch.Tensor) -> tuple[list[TaskSpec], torch.Tensor]:
    if task_set == "attributes":
        return [TaskSpec(f"pattern_{p}", 2) for p in range(NUM_PATTERNS)], bits
    fine = 2 * bits[:, 0] + bits[:, 1]
    return hierarchy_labels(fine, COARSE_OF_FINE, GROUPS, FINE,
                            within_groups=task_set == "groups")


def load(root: str | None, task_set: str, image_size: int | None, val_fraction: float,
         seed: int) -> TaskData:
    """1024 train, 256 val and 256 test images drawn from ``seed``
    (``root`` and ``val_fraction`` are unused: the splits are fixed)."""
    check_task_set("synthetic", task_set, TASK_SETS)
    generator = torch.Generator().manual_seed(seed)
    splits = {}
    for name, n in SIZES.items():
        images, bits = generate(n, generator)
        tasks, labels = labels_for(task_set, bits)
        splits[name] = Split(resize_images(images, image_size), labels)
    mean, std = channel_stats(splits["train"].images)
    return TaskData(name="synthetic", tasks=tasks, mean=mean, std=std,
                    info={"source": "generated", "task_set": task_set, "seed": seed}, **splits)
