"""CIFAR-100 loader on a fake in the distributed pickle format."""
import pickle

import pytest
import torch

from comod.data import cifar100
from comod.data.taskdata import IGNORE, DatasetNotFoundError
from fakes import CIFAR100_COARSE, CIFAR100_COARSE_OF_FINE, CIFAR100_FINE, write_cifar100


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    path = tmp_path_factory.mktemp("cifar")
    write_cifar100(str(path), n_test=20)
    return str(path)


def test_fake_is_in_the_distributed_format(root):
    with open(f"{root}/cifar-100-python/train", "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    assert set(raw) == {b"data", b"fine_labels", b"coarse_labels", b"filenames", b"batch_label"}


def test_coarse_fine(root):
    data = cifar100.load(root, "coarse_fine", None, 0.2, seed=0)
    assert data.task_names == ["coarse", "fine"]
    assert [t.num_classes for t in data.tasks] == [20, 100]
    assert data.tasks[1].class_names == tuple(CIFAR100_FINE)
    assert (len(data.train), len(data.val), len(data.test)) == (80, 20, 20)
    assert data.image_shape == (3, 32, 32) and data.train.images.dtype == torch.uint8
    for split in (data.train, data.val, data.test):
        fine = split.labels[:, 1]
        assert torch.equal(fine * 2, split.images[:, 0, 5, 5].long())  # images follow labels
        assert torch.equal(split.labels[:, 0], torch.tensor(CIFAR100_COARSE_OF_FINE)[fine])


def test_superclasses(root):
    data = cifar100.load(root, "superclasses", 16, 0.2, seed=0)
    assert data.task_names == ["coarse"] + CIFAR100_COARSE
    assert data.task_names[1] == "aquatic_mammals"
    assert all(t.num_classes == 5 for t in data.tasks[1:])
    assert data.tasks[1].class_names == ("beaver", "dolphin", "otter", "seal", "whale")
    assert data.image_shape == (3, 16, 16)
    labels = torch.cat([data.train.labels, data.val.labels])
    fine = torch.cat([data.train.images, data.val.images])[:, 0, 0, 0].long() // 2
    # Each sample takes part in exactly one superclass task: its own.
    member = labels[:, 1:] != IGNORE
    assert torch.equal(member.sum(1), torch.ones(len(labels), dtype=torch.long))
    assert torch.equal(member.long().argmax(1), labels[:, 0])
    # "whale" is the 5th of aquatic_mammals' fine classes in fine-id order.
    whale = fine == CIFAR100_FINE.index("whale")
    assert labels[whale, 1].tolist() == [4]
    assert sorted(labels[:, 1:][member].tolist()) == sorted([i for i in range(5)] * 20)


def test_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("COMOD_DATA", str(tmp_path / "env"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DatasetNotFoundError) as err:
        cifar100.load(None, "coarse_fine", None, 0.1, 0)
    message = str(err.value)
    assert str(tmp_path / "env" / "cifar-100-python") in message
    assert str(tmp_path / "data" / "cifar-100-python") in message
    assert "COMOD_DATA" in message


def test_unknown_task_set():
    with pytest.raises(ValueError, match="'fine'.*coarse_fine, superclasses"):
        cifar100.load(None, "fine", None, 0.1, 0)
