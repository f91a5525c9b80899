"""Fashion-MNIST loader: fakes in both layouts, the real Debian files, and
the not-found message."""
import os
import socket

import pytest
import torch

from comod.data import fashion_mnist
from comod.data.taskdata import IGNORE, DatasetNotFoundError
from fakes import write_fashion_mnist

REAL_DIR = "/usr/share/datasets/fashion-mnist"
REAL_PRESENT = all(os.path.isfile(os.path.join(REAL_DIR, f"{name}.gz"))
                   for name in fashion_mnist.FILES.values())


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """No dataset anywhere: empty COMOD_DATA and cwd, no system copy, no download."""
    monkeypatch.setenv("COMOD_DATA", str(tmp_path / "comod_data"))
    monkeypatch.setenv("COMOD_DOWNLOAD", "0")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(fashion_mnist, "SYSTEM_DIR", str(tmp_path / "no_system_copy"))
    return tmp_path


@pytest.mark.parametrize("gz", [True, False])
def test_fake_attributes(tmp_path, gz):
    write_fashion_mnist(str(tmp_path), n_train=60, n_test=20, gz=gz)
    data = fashion_mnist.load(str(tmp_path), "attributes", None, 0.25, seed=0)
    assert data.task_names[0] == "t_shirt_top" and data.task_names[-1] == "ankle_boot"
    assert all(t.binary for t in data.tasks)
    assert (len(data.train), len(data.val), len(data.test)) == (45, 15, 20)
    assert data.image_shape == (1, 28, 28) and data.train.images.dtype == torch.uint8
    # One-vs-rest: exactly one positive per sample, the one the pixels encode.
    labels = data.test.labels
    assert labels.dtype == torch.int64 and torch.equal(labels.sum(1), torch.ones(20, dtype=torch.long))
    assert torch.equal(labels.argmax(1) * 10, data.test.images[:, 0, 0, 0].long())


def test_fake_groups_hierarchy(tmp_path):
    write_fashion_mnist(str(tmp_path))
    data = fashion_mnist.load(str(tmp_path), "groups", None, 0.25, seed=0)
    assert data.task_names == ["coarse", "tops", "footwear", "other"]
    assert [t.num_classes for t in data.tasks] == [3, 4, 3, 3]
    fine = data.test.images[:, 0, 0, 0].long() // 10
    coarse = torch.tensor(fashion_mnist.GROUP_OF_CLASS)[fine]
    assert torch.equal(data.test.labels[:, 0], coarse)
    for group in range(3):
        column = data.test.labels[:, 1 + group]
        assert torch.equal(column != IGNORE, coarse == group)
    # Within "tops" (0, 2, 4, 6) the label is the position of the fine class.
    tops = data.test.labels[:, 1]
    assert torch.equal(tops[fine == 4], torch.full_like(tops[fine == 4], 2))


def test_fake_coarse_fine_and_resize(tmp_path):
    write_fashion_mnist(str(tmp_path))
    data = fashion_mnist.load(str(tmp_path), "coarse_fine", 14, 0.25, seed=0)
    assert data.task_names == ["coarse", "fine"] and data.tasks[1].num_classes == 10
    assert data.image_shape == (1, 14, 14)
    assert torch.equal(data.test.labels[:, 1] * 10, data.test.images[:, 0, 7, 7].long())


def test_search_order_comod_data_layouts(isolated, monkeypatch):
    flat = isolated / "comod_data" / "fashion-mnist"
    torchvision_layout = isolated / "comod_data" / "FashionMNIST" / "raw"
    write_fashion_mnist(str(torchvision_layout), n_train=30, gz=False)
    assert len(fashion_mnist.load(None, "attributes", None, 0.5, 0).train) == 15
    write_fashion_mnist(str(flat), n_train=40)  # the flat folder comes first
    assert len(fashion_mnist.load(None, "attributes", None, 0.5, 0).train) == 20


def test_cwd_data_layout(isolated):
    write_fashion_mnist(str(isolated / "data" / "FashionMNIST" / "raw"), n_train=50)
    assert len(fashion_mnist.load(None, "attributes", None, 0.2, 0).train) == 40


def test_missing_lists_every_place_and_the_fix(isolated):
    with pytest.raises(DatasetNotFoundError) as err:
        fashion_mnist.load(None, "attributes", None, 0.1, 0)
    message = str(err.value)
    for place in fashion_mnist.candidate_dirs(None):
        assert place in message
    assert str(isolated / "comod_data" / "fashion-mnist") in message
    assert "apt-get install -y dataset-fashion-mnist" in message and "COMOD_DATA" in message


def test_missing_root(tmp_path):
    root = tmp_path / "nowhere"
    with pytest.raises(DatasetNotFoundError, match="nowhere"):
        fashion_mnist.load(str(root), "attributes", None, 0.1, 0)


def test_offline_download_fails_fast_and_cleanly(isolated, monkeypatch):
    monkeypatch.setenv("COMOD_DOWNLOAD", "1")

    def unreachable(*args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    with pytest.raises(DatasetNotFoundError, match="unreachable"):
        fashion_mnist.load(None, "attributes", None, 0.1, 0)


def test_unknown_task_set():
    with pytest.raises(ValueError, match="'colours'.*attributes, coarse_fine, groups"):
        fashion_mnist.load(None, "colours", None, 0.1, 0)


@pytest.mark.skipif(not REAL_PRESENT, reason=f"Fashion-MNIST not in {REAL_DIR} "
                                             f"(apt-get install -y dataset-fashion-mnist)")
def test_real_debian_files(isolated, monkeypatch):
    monkeypatch.setattr(fashion_mnist, "SYSTEM_DIR", REAL_DIR)
    data = fashion_mnist.load(None, "coarse_fine", None, 0.1, seed=0)
    assert (len(data.train), len(data.val), len(data.test)) == (54000, 6000, 10000)
    assert data.info["source"] == REAL_DIR
    fine_train = torch.cat([data.train.labels[:, 1], data.val.labels[:, 1]])
    assert torch.equal(torch.bincount(fine_train), torch.full((10,), 6000))
    assert torch.equal(torch.bincount(data.test.labels[:, 1]), torch.full((10,), 1000))
    assert torch.equal(torch.bincount(data.test.labels[:, 0]), torch.tensor([4000, 3000, 3000]))
    assert abs(data.mean[0] - 0.286) < 0.01 and abs(data.std[0] - 0.353) < 0.01
