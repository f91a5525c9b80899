"""Synthetic test double: deterministic, fast, same task-set shapes as
Fashion-MNIST."""
import time

import pytest
import torch

from comod.data import synthetic
from comod.data.taskdata import IGNORE


def test_deterministic_given_seed():
    a = synthetic.load(None, "attributes", None, 0.1, seed=3)
    b = synthetic.load("/ignored", "attributes", None, 0.1, seed=3)
    c = synthetic.load(None, "attributes", None, 0.1, seed=4)
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.labels, b.test.labels)
    assert not torch.equal(a.train.images, c.train.images)


def test_sizes_and_fast():
    start = time.perf_counter()
    data = synthetic.load(None, "attributes", None, 0.1, seed=0)
    assert time.perf_counter() - start < 1.0
    assert (len(data.train), len(data.val), len(data.test)) == (1024, 256, 256)
    assert data.image_shape == (3, 16, 16) and data.train.images.dtype == torch.uint8
    assert data.task_names == [f"pattern_{p}" for p in range(6)]
    rate = data.train.labels.float().mean(0)
    assert ((rate > 0.4) & (rate < 0.6)).all(), f"attributes should be balanced, got {rate}"


def test_hierarchy_is_consistent():
    data = synthetic.load(None, "coarse_fine", 8, 0.1, seed=0)
    assert data.image_shape == (3, 8, 8)
    assert [t.num_classes for t in data.tasks] == [2, 4]
    coarse, fine = data.train.labels.T
    assert torch.equal(coarse, fine // 2) and len(fine.unique()) == 4


def test_groups_ignore_outside_their_group():
    data = synthetic.load(None, "groups", None, 0.1, seed=0)
    assert data.task_names == ["coarse", "group_0", "group_1"]
    labels = data.train.labels
    for group in (0, 1):
        inside = labels[:, 0] == group
        assert (labels[~inside, 1 + group] == IGNORE).all()
        assert set(labels[inside, 1 + group].tolist()) == {0, 1}


def test_same_images_for_every_task_set():
    images = [synthetic.load(None, ts, None, 0.1, 0).train.images for ts in synthetic.TASK_SETS]
    assert all(torch.equal(images[0], x) for x in images[1:])


def test_unknown_task_set():
    with pytest.raises(ValueError, match="'x'.*attributes, coarse_fine, groups"):
        synthetic.load(None, "x", None, 0.1, 0)
