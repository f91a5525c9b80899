"""Fashion-MNIST mosaics: a CelebA-like set of non-exclusive attributes.

Fashion-MNIST's one-vs-rest tasks are mutually exclusive views of one
10-way label; CelebA's attributes are non-exclusive, often local and 5-60%
prevalent (docs/method.md, "Protocols to support"). Each image here is a
56x56 2x2 mosaic of four real Fashion-MNIST images, cells in the order
top-left, top-right, bottom-left, bottom-right. Each cell is drawn
independently: empty (black) or a class, with the fixed percentages of
``CELL_PERCENT``, then a uniformly drawn source image of that class. The
24 attributes of ``ATTRIBUTES`` are rules on the four cell classes
(docs/guides/datasets.md lists them with their prevalences).

Train and validation mosaics are made from disjoint parts of the official
training images (a seeded ``val_fraction`` of them for validation), test
mosaics from the official test images; each split has as many mosaics as
source images. Everything is drawn from ``seed``: the same seed gives
byte-identical mosaics, and the test mosaics do not depend on
``val_fraction``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch
from torchvision.datasets.mnist import read_image_file, read_label_file

from .fashion_mnist import CLASSES, locate, read_idx
from .taskdata import (Split, TaskData, TaskSpec, channel_stats, check_task_set, resize_images,
                       split_off_validation)

CELL = 28
GRID = 2
EMPTY = -1
"""Cell class of an empty (all-black) cell."""
CELL_PERCENT = {EMPTY: 12, 0: 12, 1: 7, 2: 10, 3: 7, 4: 8, 5: 7, 6: 9, 7: 8, 8: 13, 9: 7}
"""Chance, in percent, that a cell is empty or holds each class (0 T-shirt/top, 1 Trouser,
2 Pullover, 3 Dress, 4 Coat, 5 Sandal, 6 Shirt, 7 Sneaker, 8 Bag, 9 Ankle boot). Uneven, so
that the attributes' prevalences spread from about 7% to 63%."""

TOPS = (0, 2, 4, 6)
FOOTWEAR = (5, 7, 9)
TROUSER, DRESS, SANDAL, SHIRT, SNEAKER, BAG = (1,), (3,), (5,), (6,), (7,), (8,)
NO_CELL = (EMPTY,)
TOP_LEFT, TOP_RIGHT, BOTTOM_RIGHT = (0,), (1,), (3,)
TOP_ROW, BOTTOM_ROW, LEFT_COLUMN = (0, 1), (2, 3), (0, 2)
ALL_CELLS = (0, 1, 2, 3)


def count(cells: torch.Tensor, classes: tuple[int, ...], where: tuple[int, ...] = ALL_CELLS) -> torch.Tensor:
    """Per mosaic, how many of the cells ``where`` hold one of ``classes``; ``cells`` is ``[N, 4]``."""
    return torch.isin(cells[:, list(where)], torch.tensor(classes)).sum(1)


def footwear_below_top(cells: torch.Tensor) -> torch.Tensor:
    """A column with a top in its upper cell and footwear in its lower cell."""
    upper = torch.isin(cells[:, list(TOP_ROW)], torch.tensor(TOPS))
    lower = torch.isin(cells[:, list(BOTTOM_ROW)], torch.tensor(FOOTWEAR))
    return (upper & lower).any(1)


def repeated_class(cells: torch.Tensor) -> torch.Tensor:
    """Two or more cells hold the same class (empty cells do not count)."""
    per_class = torch.nn.functional.one_hot(cells + 1, len(CLASSES) + 1)[:, :, 1:].sum(1)
    return per_class.max(1).values >= 2


@dataclass(frozen=True)
class Attribute:
    """One binary attribute: its name, kind (global, local, counting,
    conjunction), the rule in words and the rule on ``[N, 4]`` cell classes."""

    name: str
    kind: str
    rule: str
    holds: Callable[[torch.Tensor], torch.Tensor]


ATTRIBUTES = (
    Attribute("any_footwear", "global", "a sandal, sneaker or ankle boot in some cell",
              lambda c: count(c, FOOTWEAR) >= 1),
    Attribute("no_bag", "global", "no cell holds a bag", lambda c: count(c, BAG) == 0),
    Attribute("any_trouser", "global", "a trouser in some cell", lambda c: count(c, TROUSER) >= 1),
    Attribute("any_shirt", "global", "a shirt (class 6, not a T-shirt) in some cell",
              lambda c: count(c, SHIRT) >= 1),
    Attribute("any_empty", "global", "some cell is empty", lambda c: count(c, NO_CELL) >= 1),
    Attribute("bag_top_row", "local", "a bag in the top row", lambda c: count(c, BAG, TOP_ROW) >= 1),
    Attribute("footwear_left_column", "local", "footwear in the left column",
              lambda c: count(c, FOOTWEAR, LEFT_COLUMN) >= 1),
    Attribute("trouser_bottom_right", "local", "the bottom-right cell is a trouser",
              lambda c: count(c, TROUSER, BOTTOM_RIGHT) == 1),
    Attribute("top_top_left", "local", "the top-left cell is a top (T-shirt, pullover, coat, shirt)",
              lambda c: count(c, TOPS, TOP_LEFT) == 1),
    Attribute("sneaker_top_right", "local", "the top-right cell is a sneaker",
              lambda c: count(c, SNEAKER, TOP_RIGHT) == 1),
    Attribute("dress_bottom_row", "local", "a dress in the bottom row",
              lambda c: count(c, DRESS, BOTTOM_ROW) >= 1),
    Attribute("empty_bottom_row", "local", "an empty cell in the bottom row",
              lambda c: count(c, NO_CELL, BOTTOM_ROW) >= 1),
    Attribute("tops_left_column", "local", "both cells of the left column are tops",
              lambda c: count(c, TOPS, LEFT_COLUMN) == 2),
    Attribute("footwear_below_top", "local", "a column with a top above footwear", footwear_below_top),
    Attribute("two_or_more_tops", "counting", "two or more cells hold tops",
              lambda c: count(c, TOPS) >= 2),
    Attribute("exactly_one_footwear", "counting", "exactly one cell holds footwear",
              lambda c: count(c, FOOTWEAR) == 1),
    Attribute("two_or_more_empty", "counting", "two or more cells are empty",
              lambda c: count(c, NO_CELL) >= 2),
    Attribute("repeated_class", "counting", "two or more cells hold the same class", repeated_class),
    Attribute("more_footwear_than_tops", "counting", "more cells hold footwear than tops",
              lambda c: count(c, FOOTWEAR) > count(c, TOPS)),
    Attribute("trouser_and_shirt", "conjunction", "a trouser and a shirt",
              lambda c: (count(c, TROUSER) >= 1) & (count(c, SHIRT) >= 1)),
    Attribute("bag_and_sandal", "conjunction", "a bag and a sandal",
              lambda c: (count(c, BAG) >= 1) & (count(c, SANDAL) >= 1)),
    Attribute("top_trouser_footwear", "conjunction", "a top, a trouser and footwear (an outfit)",
              lambda c: (count(c, TOPS) >= 1) & (count(c, TROUSER) >= 1) & (count(c, FOOTWEAR) >= 1)),
    Attribute("dress_without_footwear", "conjunction", "a dress and no footwear",
              lambda c: (count(c, DRESS) >= 1) & (count(c, FOOTWEAR) == 0)),
    Attribute("footwear_without_bag", "conjunction", "footwear and no bag",
              lambda c: (count(c, FOOTWEAR) >= 1) & (count(c, BAG) == 0)),
)
ATTRIBUTE_NAMES = tuple(a.name for a in ATTRIBUTES)

PRETRAIN_HALF = ("any_footwear", "any_trouser", "any_empty",
                 "bag_top_row", "footwear_left_column", "trouser_bottom_right", "dress_bottom_row",
                 "tops_left_column", "two_or_more_tops", "two_or_more_empty",
                 "trouser_and_shirt", "dress_without_footwear")
"""For held-out-task studies (``pretrain.tasks``): half the attributes, every kind."""
HELD_OUT_HALF = tuple(name for name in ATTRIBUTE_NAMES if name not in PRETRAIN_HALF)
"""The other half (``finetune.tasks``): no_bag, any_shirt, top_top_left, sneaker_top_right, ..."""

TASK_SETS = {
    "attributes": f"{len(ATTRIBUTES)} binary attributes of 2x2 mosaics: global, local, counting and "
                  "conjunctions (any_footwear, ..., footwear_without_bag; docs/guides/datasets.md)",
    "local": "the local attributes only (where in the mosaic: bag_top_row, ..., footwear_below_top)",
}


def attributes_of(task_set: str) -> tuple[Attribute, ...]:
    return tuple(a for a in ATTRIBUTES if task_set == "attributes" or a.kind == "local")


def attribute_labels(cells: torch.Tensor, attributes=ATTRIBUTES) -> torch.Tensor:
    """``[N, A]`` 0/1 labels of ``attributes`` for ``[N, 4]`` cell classes."""
    return torch.stack([a.holds(cells) for a in attributes], dim=1).long()


def draw_cells(n: int, generator: torch.Generator) -> torch.Tensor:
    """``[n, 4]`` cell classes (``EMPTY`` or 0-9), drawn independently with ``CELL_PERCENT``."""
    values = torch.tensor(list(CELL_PERCENT))
    cdf = torch.tensor(list(CELL_PERCENT.values()), dtype=torch.float64).cumsum(0) / 100
    pick = torch.searchsorted(cdf, torch.rand(n, GRID * GRID, generator=generator, dtype=torch.float64),
                              right=True)
    return values[pick.clamp_max(len(values) - 1)]


def draw_sources(cells: torch.Tensor, fine: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """For each cell, the index of a uniformly drawn pool image of its class,
    or ``len(fine)`` (one past the pool: the black image) for an empty cell."""
    counts = torch.bincount(fine, minlength=len(CLASSES))
    by_class = torch.argsort(fine, stable=True)
    starts = counts.cumsum(0) - counts
    filled = cells.clamp_min(0)
    offset = (torch.rand(cells.shape, generator=generator, dtype=torch.float64) * counts[filled]).long()
    index = by_class[starts[filled] + offset.clamp_max(counts[filled] - 1)]
    return torch.where(cells == EMPTY, len(fine), index)


def assemble(pool: torch.Tensor, sources: torch.Tensor) -> torch.Tensor:
    """uint8 ``[N, 1, 56, 56]`` mosaics of ``pool`` images (``[M, 28, 28]``), one index per cell."""
    padded = torch.cat([pool, pool.new_zeros(1, CELL, CELL)])
    tiles = padded[sources].view(-1, GRID, GRID, CELL, CELL)
    return tiles.permute(0, 1, 3, 2, 4).reshape(-1, 1, GRID * CELL, GRID * CELL)


def make_mosaics(pool: torch.Tensor, fine: torch.Tensor, n: int, generator: torch.Generator,
                 split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` mosaics of ``pool`` images and their ``[n, 4]`` cell classes."""
    missing = [CLASSES[c] for c in range(len(CLASSES)) if not (fine == c).any()]
    if missing:
        raise ValueError(f"the {split} mosaics' source images hold no {', '.join(missing)}; every class "
                         f"is needed (a larger val_fraction gives validation more source images)")
    cells = draw_cells(n, generator)
    return assemble(pool, draw_sources(cells, fine, generator)), cells


def read_split(files: dict[str, str], name: str) -> tuple[torch.Tensor, torch.Tensor]:
    return (read_idx(files[f"{name}_images"], read_image_file),
            read_idx(files[f"{name}_labels"], read_label_file).long())


def mosaic_split(pool: Split, generator: torch.Generator, name: str, attributes,
                 image_size: int | None) -> Split:
    images, cells = make_mosaics(pool.images[:, 0], pool.labels[:, 0], len(pool), generator, name)
    return Split(resize_images(images, image_size), attribute_labels(cells, attributes))


def load(root: str | None, task_set: str, image_size: int | None, val_fraction: float,
         seed: int) -> TaskData:
    """Mosaics of the Fashion-MNIST files found as ``fashion_mnist`` finds
    them: test from t10k, train and validation from disjoint parts of train."""
    check_task_set("fashion_mosaic", task_set, TASK_SETS)
    files = locate(root)
    attributes = attributes_of(task_set)
    generator = torch.Generator().manual_seed(seed)
    sources = {}
    for name in ("train", "test"):
        images, fine = read_split(files, name)
        sources[name] = Split(images.unsqueeze(1), fine[:, None])
    # Test first, so its mosaics depend on the seed alone.
    test = mosaic_split(sources["test"], generator, "test", attributes, image_size)
    train_pool, val_pool = split_off_validation(sources["train"], val_fraction, seed)
    train = mosaic_split(train_pool, generator, "train", attributes, image_size)
    val = mosaic_split(val_pool, generator, "validation", attributes, image_size)
    mean, std = channel_stats(train.images)
    return TaskData(name="fashion_mosaic", tasks=[TaskSpec(a.name, 2) for a in attributes],
                    train=train, val=val, test=test, mean=mean, std=std,
                    info={"source": os.path.dirname(files["train_images"]), "task_set": task_set,
                          "seed": seed, "kinds": {a.name: a.kind for a in attributes}})
