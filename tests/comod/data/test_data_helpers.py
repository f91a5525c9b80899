"""Helpers shared by the loaders: resize once, channel statistics, the
coarse/fine label columns."""
import pytest
import torch

from comod.data.taskdata import IGNORE, channel_stats, hierarchy_labels, resize_images


def test_resize_keeps_uint8_and_antialiases():
    images = torch.zeros(5, 3, 32, 32, dtype=torch.uint8)
    images[..., ::2] = 255  # one-pixel stripes average to grey when antialiased
    out = resize_images(images, 8, chunk=2)
    assert out.dtype == torch.uint8 and out.shape == (5, 3, 8, 8)
    assert ((out[..., 1:-1].float() - 127.5).abs() < 3).all()  # edges see half a stripe
    assert resize_images(images, None) is images and resize_images(images, 32) is images
    with pytest.raises(ValueError, match="image_size must be a positive int"):
        resize_images(images, -1)


def test_channel_stats_match_float_computation():
    images = torch.randint(0, 256, (50, 3, 7, 7), dtype=torch.uint8)
    mean, std = channel_stats(images)
    x = images.double() / 255
    assert torch.allclose(torch.tensor(mean, dtype=torch.double), x.mean((0, 2, 3)))
    assert torch.allclose(torch.tensor(std, dtype=torch.double), x.std((0, 2, 3), unbiased=False))


def test_hierarchy_labels():
    fine = torch.tensor([0, 1, 2, 3, 4])
    coarse_of_fine = [1, 0, 1, 0, 1]
    tasks, labels = hierarchy_labels(fine, coarse_of_fine, ("a", "b"), tuple("pqrst"), True)
    assert [(t.name, t.num_classes, t.class_names) for t in tasks] == [
        ("coarse", 2, ("a", "b")), ("a", 2, ("q", "s")), ("b", 3, ("p", "r", "t"))]
    assert labels.tolist() == [[1, IGNORE, 0], [0, 0, IGNORE], [1, IGNORE, 1],
                               [0, 1, IGNORE], [1, IGNORE, 2]]
    tasks, labels = hierarchy_labels(fine, coarse_of_fine, ("a", "b"), tuple("pqrst"), False)
    assert [t.name for t in tasks] == ["coarse", "fine"] and labels[:, 1].tolist() == fine.tolist()
