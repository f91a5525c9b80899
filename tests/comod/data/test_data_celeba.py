"""CelebA loader on a fake in torchvision's layout, and its image cache."""
import os

import pytest
import torch

from comod.data import celeba
from comod.data.taskdata import DatasetNotFoundError
from fakes import CELEBA_ATTRIBUTES, write_celeba


@pytest.fixture
def root(tmp_path):
    truth = write_celeba(str(tmp_path))
    return str(tmp_path), truth


def test_attributes_and_official_splits(root):
    path, truth = root
    data = celeba.load(path, "attributes", None, 0.5, seed=0)
    assert data.task_names == CELEBA_ATTRIBUTES and len(data.tasks) == 40
    assert all(t.binary for t in data.tasks)
    assert (len(data.train), len(data.val), len(data.test)) == (8, 2, 2)
    assert data.image_shape == (3, 64, 64) and data.train.images.dtype == torch.uint8
    labels = torch.cat([data.train.labels, data.val.labels, data.test.labels])
    assert labels.dtype == torch.int64 and set(labels.unique().tolist()) == {0, 1}
    assert torch.equal(labels, torch.as_tensor(truth["attr"]))
    # Images stay in file order: image i is grey 20 * (i + 1) (JPEG is near-lossless on flat grey).
    grey = torch.cat([data.train.images, data.val.images, data.test.images]).float().mean((1, 2, 3))
    assert torch.allclose(grey, 20.0 * torch.arange(1, 13), atol=2)


def test_cache_is_reused(root):
    path, _ = root
    first = celeba.load(path, "attributes", 32, 0.1, 0)
    cache = os.path.join(path, "celeba", "comod_cache_32.pt")
    assert os.path.isfile(cache) and first.image_shape == (3, 32, 32)
    image_dir = os.path.join(path, "celeba", "img_align_celeba")
    for name in os.listdir(image_dir):
        os.remove(os.path.join(image_dir, name))  # a second decode would now fail
    second = celeba.load(path, "attributes", 32, 0.1, 0)
    assert torch.equal(first.train.images, second.train.images)
    assert torch.equal(first.test.labels, second.test.labels)
    assert first.mean == second.mean


def test_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("COMOD_DATA", str(tmp_path / "env"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DatasetNotFoundError) as err:
        celeba.load(None, "attributes", None, 0.1, 0)
    message = str(err.value)
    assert str(tmp_path / "env" / "celeba") in message and str(tmp_path / "data" / "celeba") in message
    assert "img_align_celeba" in message and "list_attr_celeba.txt" in message


def test_bad_image_size(root):
    with pytest.raises(ValueError, match="image_size must be a positive int"):
        celeba.load(root[0], "attributes", 0, 0.1, 0)


def test_unknown_task_set():
    with pytest.raises(ValueError, match="'smiling'.*attributes"):
        celeba.load(None, "smiling", None, 0.1, 0)


def test_changed_annotations_rebuild_the_cache(root):
    path, truth = root
    celeba.load(path, "attributes", 16, 0.1, 0)
    attr_file = os.path.join(path, "celeba", "list_attr_celeba.txt")
    with open(attr_file) as f:
        lines = f.read().splitlines()
    lines[0] += " "  # the count line is not parsed; it changes the file's size
    lines[2] = lines[2].replace("000001.jpg  1", "000001.jpg -1", 1)  # image 1 loses attribute 0
    with open(attr_file, "w") as f:
        f.write("\n".join(lines) + "\n")
    data = celeba.load(path, "attributes", 16, 0.1, 0)
    assert truth["attr"][0, 0] == 1 and data.train.labels[0, 0] == 0
