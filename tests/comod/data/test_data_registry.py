"""Registry: the shared contract of every dataset module, names, limits."""
import inspect

import pytest
import torch

from comod.data import registry
from comod.data.taskdata import TaskData

LOAD_PARAMETERS = ["root", "task_set", "image_size", "val_fraction", "seed"]


@pytest.mark.parametrize("name", sorted(registry.DATASETS))
def test_every_module_follows_the_contract(name):
    module = registry.dataset_module(name)
    assert module.__name__ == registry.DATASETS[name] == f"comod.data.{name}"
    assert list(inspect.signature(module.load).parameters) == LOAD_PARAMETERS
    assert registry.task_sets(name) == module.TASK_SETS and module.TASK_SETS
    assert all(isinstance(v, str) and v for v in module.TASK_SETS.values())
    # An unknown task set is rejected before the disk is touched.
    with pytest.raises(ValueError, match=r"unknown task set 'nope'.*choose one of"):
        registry.load_task_data(name, "/does/not/exist", "nope", None, 0.1, 0)


def test_unknown_dataset_lists_the_names():
    with pytest.raises(ValueError, match="'mnist'.*fashion_mnist, fashion_mosaic, celeba, cifar100, synthetic"):
        registry.task_sets("mnist")
    with pytest.raises(ValueError, match="'mnist'"):
        registry.load_task_data("mnist", None, "attributes", None, 0.1, 0)


@pytest.mark.parametrize("limit", [0, -3, 2.5, "10", True])
def test_bad_limits(limit):
    for key in ("train_limit", "test_limit"):
        with pytest.raises(ValueError, match=f"{key} must be a positive int"):
            registry.load_task_data("synthetic", None, "attributes", None, 0.1, 0, **{key: limit})


def test_limits_keep_a_seeded_subset():
    full = registry.load_task_data("synthetic", None, "attributes", None, 0.1, 0)
    small = registry.load_task_data("synthetic", None, "attributes", None, 0.1, 0,
                                    train_limit=100, test_limit=30)
    assert isinstance(small, TaskData)
    assert (len(small.train), len(small.val), len(small.test)) == (100, 10, 30)
    again = registry.load_task_data("synthetic", None, "attributes", None, 0.1, 0,
                                    train_limit=100, test_limit=30)
    assert torch.equal(small.train.images, again.train.images)
    # The subset is made of real training samples, not a prefix.
    rows = {tuple(x.flatten().tolist()) for x in full.train.images[:, 0, :2, :2]}
    assert all(tuple(x.flatten().tolist()) in rows for x in small.train.images[:, 0, :2, :2])
    assert small.info["train_limit"] == 100


def test_limits_above_the_size_keep_everything():
    data = registry.load_task_data("synthetic", None, "groups", None, 0.5, 0,
                                   train_limit=10**6, test_limit=10**6)
    assert (len(data.train), len(data.val), len(data.test)) == (1024, 256, 256)
    tiny = registry.load_task_data("synthetic", None, "groups", None, 0.01, 0, train_limit=5)
    assert len(tiny.val) == 1
