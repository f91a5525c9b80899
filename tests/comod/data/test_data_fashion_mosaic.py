"""Fashion-MNIST mosaics: on a fake whose pixels name each cell's class,
split and source image, every label is checked against its rule written
again here in plain Python; the real Debian files give the prevalences."""
import os
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from comod.config import parse_config
from comod.data import fashion_mnist, fashion_mosaic, registry
from comod.data.taskdata import DatasetNotFoundError
from fakes import write_idx

REAL_DIR = "/usr/share/datasets/fashion-mnist"
REAL_PRESENT = all(os.path.isfile(os.path.join(REAL_DIR, f"{name}.gz"))
                   for name in fashion_mnist.FILES.values())
N_TRAIN, N_TEST = 200, 100
TRAIN_LEVEL, TEST_LEVEL = 10, 130
"""A fake image of class y is all ``level + 10 * y`` except pixel (0, 0), its index in its file."""

TOPS, FOOTWEAR = {0, 2, 4, 6}, {5, 7, 9}
RULES = {
    "any_footwear": lambda c: any(x in FOOTWEAR for x in c),
    "no_bag": lambda c: 8 not in c,
    "any_trouser": lambda c: 1 in c,
    "any_shirt": lambda c: 6 in c,
    "any_empty": lambda c: None in c,
    "bag_top_row": lambda c: 8 in c[:2],
    "footwear_left_column": lambda c: c[0] in FOOTWEAR or c[2] in FOOTWEAR,
    "trouser_bottom_right": lambda c: c[3] == 1,
    "top_top_left": lambda c: c[0] in TOPS,
    "sneaker_top_right": lambda c: c[1] == 7,
    "dress_bottom_row": lambda c: 3 in c[2:],
    "empty_bottom_row": lambda c: None in c[2:],
    "tops_left_column": lambda c: c[0] in TOPS and c[2] in TOPS,
    "footwear_below_top": lambda c: any(c[i] in TOPS and c[i + 2] in FOOTWEAR for i in (0, 1)),
    "two_or_more_tops": lambda c: sum(x in TOPS for x in c) >= 2,
    "exactly_one_footwear": lambda c: sum(x in FOOTWEAR for x in c) == 1,
    "two_or_more_empty": lambda c: c.count(None) >= 2,
    "repeated_class": lambda c: any(c.count(x) >= 2 for x in c if x is not None),
    "more_footwear_than_tops": lambda c: sum(x in FOOTWEAR for x in c) > sum(x in TOPS for x in c),
    "trouser_and_shirt": lambda c: 1 in c and 6 in c,
    "bag_and_sandal": lambda c: 8 in c and 5 in c,
    "top_trouser_footwear": lambda c: any(x in TOPS for x in c) and 1 in c
                                      and any(x in FOOTWEAR for x in c),
    "dress_without_footwear": lambda c: 3 in c and not any(x in FOOTWEAR for x in c),
    "footwear_without_bag": lambda c: 8 not in c and any(x in FOOTWEAR for x in c),
}


def write_fake(directory) -> None:
    """Labels cycle through the 10 classes; pixels as ``TRAIN_LEVEL``'s note says."""
    os.makedirs(directory, exist_ok=True)
    for split, n, level in (("train", N_TRAIN, TRAIN_LEVEL), ("t10k", N_TEST, TEST_LEVEL)):
        labels = np.arange(n) % 10
        images = np.repeat(level + 10 * labels, 28 * 28).reshape(n, 28, 28)
        images[:, 0, 0] = np.arange(n)
        write_idx(os.path.join(directory, f"{split}-images-idx3-ubyte"), images, gz=True)
        write_idx(os.path.join(directory, f"{split}-labels-idx1-ubyte"), labels, gz=True)


@pytest.fixture
def fake(tmp_path) -> str:
    write_fake(str(tmp_path))
    return str(tmp_path)


def cells_of(images: torch.Tensor, level: int) -> list[list]:
    """Each mosaic's four cell classes (None: empty), read from the cells' centre pixels."""
    centres = images[:, 0, 14::28, 14::28].reshape(len(images), 4).long()
    return [[None if v == 0 else (v - level) // 10 for v in row] for row in centres.tolist()]


def sources_of(images: torch.Tensor) -> set[int]:
    """Indices of the source images used by filled cells."""
    corner = images[:, 0, 0::28, 0::28].reshape(-1)
    centre = images[:, 0, 14::28, 14::28].reshape(-1)
    return set(corner[centre != 0].tolist())


def test_shapes_sizes_and_tasks(fake):
    data = fashion_mosaic.load(fake, "attributes", None, 0.25, seed=0)
    assert (len(data.train), len(data.val), len(data.test)) == (150, 50, 100)
    assert data.image_shape == (1, 56, 56) and data.train.images.dtype == torch.uint8
    assert len(data.tasks) >= 20 and all(t.binary for t in data.tasks)
    assert data.task_names == list(fashion_mosaic.ATTRIBUTE_NAMES) == list(RULES)
    assert len(data.mean) == len(data.std) == 1 and 0 < data.mean[0] < 1


def test_every_label_follows_its_rule(fake):
    data = fashion_mosaic.load(fake, "attributes", None, 0.25, seed=3)
    for split, level in ((data.train, TRAIN_LEVEL), (data.val, TRAIN_LEVEL), (data.test, TEST_LEVEL)):
        for cells, labels in zip(cells_of(split.images, level), split.labels.tolist()):
            expected = [int(RULES[name](cells)) for name in data.task_names]
            assert labels == expected, f"cells {cells}"


def test_each_cell_is_one_whole_source_image(fake):
    data = fashion_mosaic.load(fake, "attributes", None, 0.25, seed=0)
    cells = data.test.images[:, 0].unfold(1, 28, 28).unfold(2, 28, 28).reshape(-1, 28, 28)
    body = cells.reshape(len(cells), -1)[:, 1:]  # pixel (0, 0) holds the source index
    assert torch.equal(body, body[:, :1].expand_as(body))
    classes = torch.tensor([c for row in cells_of(data.test.images, TEST_LEVEL) for c in row if c is not None])
    assert len(set(classes.tolist())) == 10


def test_splits_draw_on_their_own_source_images(fake):
    data = fashion_mosaic.load(fake, "attributes", None, 0.25, seed=0)
    test_levels = data.test.images[:, 0, 14::28, 14::28]
    assert ((test_levels == 0) | (test_levels >= TEST_LEVEL)).all()
    for split in (data.train, data.val):
        levels = split.images[:, 0, 14::28, 14::28]
        assert ((levels == 0) | ((levels >= TRAIN_LEVEL) & (levels < TEST_LEVEL))).all()
    assert not sources_of(data.train.images) & sources_of(data.val.images)


def test_same_seed_same_bytes_other_seed_other_mosaics(fake):
    first = fashion_mosaic.load(fake, "attributes", None, 0.25, seed=7)
    again = fashion_mosaic.load(fake, "attributes", None, 0.25, seed=7)
    other = fashion_mosaic.load(fake, "attributes", None, 0.25, seed=8)
    for name in ("train", "val", "test"):
        assert torch.equal(getattr(first, name).images, getattr(again, name).images)
        assert torch.equal(getattr(first, name).labels, getattr(again, name).labels)
        assert not torch.equal(getattr(first, name).images, getattr(other, name).images)
    # The test mosaics depend on the seed alone.
    shifted = fashion_mosaic.load(fake, "attributes", None, 0.5, seed=7)
    assert torch.equal(first.test.images, shifted.test.images)


def test_local_task_set_and_resize(fake):
    data = fashion_mosaic.load(fake, "local", 28, 0.25, seed=0)
    local = [a.name for a in fashion_mosaic.ATTRIBUTES if a.kind == "local"]
    assert data.task_names == local and len(local) >= 5
    assert data.image_shape == (1, 28, 28)
    full = fashion_mosaic.load(fake, "attributes", 28, 0.25, seed=0)
    assert torch.equal(data.test.labels, full.test.labels[:, [full.task_index(n) for n in local]])


def test_halves_split_the_attributes_and_mix_kinds():
    pretrain, held_out = fashion_mosaic.PRETRAIN_HALF, fashion_mosaic.HELD_OUT_HALF
    assert sorted(pretrain + held_out) == sorted(fashion_mosaic.ATTRIBUTE_NAMES)
    assert len(pretrain) == len(held_out) and not set(pretrain) & set(held_out)
    kind = {a.name: a.kind for a in fashion_mosaic.ATTRIBUTES}
    for half in (pretrain, held_out):
        assert {kind[n] for n in half} == {"global", "local", "counting", "conjunction"}


def test_guide_lists_every_rule_and_the_halves():
    guide = (Path(__file__).parents[3] / "docs" / "guides" / "datasets.md").read_text()
    for a in fashion_mosaic.ATTRIBUTES:
        assert f"| `{a.name}` | {a.kind} | {a.rule} |" in guide, f"datasets.md lacks {a.name}'s row"
    study = yaml.safe_load(re.findall(r"```yaml\n(.*?)```", guide, re.S)[0])
    assert tuple(study["pretrain"]["tasks"]) == fashion_mosaic.PRETRAIN_HALF
    assert tuple(study["finetune"]["tasks"]) == fashion_mosaic.HELD_OUT_HALF


def test_missing_files_and_too_small_validation(tmp_path, fake):
    with pytest.raises(DatasetNotFoundError, match="nowhere"):
        fashion_mosaic.load(str(tmp_path / "nowhere"), "attributes", None, 0.1, 0)
    with pytest.raises(ValueError, match="validation mosaics' source images hold no .*val_fraction"):
        fashion_mosaic.load(fake, "attributes", None, 0.02, 0)


def test_config_and_registry_accept_it(fake):
    cfg = parse_config({"data": {"dataset": "fashion_mosaic"}})
    assert cfg.data.dataset == "fashion_mosaic" and cfg.data.tasks == "attributes"
    data = registry.load_task_data("fashion_mosaic", fake, "attributes", None, 0.25, 0,
                                   train_limit=40, test_limit=30)
    assert (len(data.train), len(data.val), len(data.test)) == (40, 10, 30)


@pytest.mark.skipif(not REAL_PRESENT, reason=f"Fashion-MNIST not in {REAL_DIR} "
                                             f"(apt-get install -y dataset-fashion-mnist)")
def test_real_files_fast_and_prevalences_spread(monkeypatch, tmp_path):
    monkeypatch.setenv("COMOD_DATA", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(fashion_mnist, "SYSTEM_DIR", REAL_DIR)
    started = time.perf_counter()
    data = fashion_mosaic.load(None, "attributes", None, 0.1, seed=0)
    seconds = time.perf_counter() - started
    assert seconds < 20, f"loading took {seconds:.1f} s"
    assert (len(data.train), len(data.val), len(data.test)) == (54000, 6000, 10000)
    prevalence = data.train.labels.float().mean(0)
    outside = {n: round(float(p), 3) for n, p in zip(data.task_names, prevalence) if not 0.03 <= p <= 0.70}
    assert not outside, f"prevalences outside [0.03, 0.70]: {outside}"
