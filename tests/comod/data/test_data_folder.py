"""The folder dataset on real folders: PNG and JPEG files written by PIL,
grayscale and RGB, listed in a real labels.csv."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from comod.config import ConfigError, parse_config
from comod.data import IGNORE, DatasetNotFoundError, FolderDataError, load_data
from comod.data import folder
from comod.data.registry import load_task_data
from comod.data.taskdata import channel_stats

N = 30
SIZE = 12


def grey_of(i: int) -> int:
    return 8 * i + 10


def write_image(path, i: int, mode: str = "RGB", size=(SIZE, SIZE)) -> None:
    """Image ``i``: flat grey ``grey_of(i)`` (RGB: the same grey in all three
    channels, so gray and RGB files decode to the same values)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    value = grey_of(i)
    array = np.full((size[1], size[0]) + (() if mode == "L" else (3,)), value, dtype=np.uint8)
    Image.fromarray(array).save(path, **({"quality": 95} if str(path).endswith(".jpg") else {}))


def write_csv(root, header, rows) -> str:
    path = os.path.join(root, "labels.csv")
    with open(path, "w") as f:
        f.write(",".join(header) + "\n")
        for row in rows:
            f.write(",".join("" if v is None else str(v) for v in row) + "\n")
    return path


def image_name(i: int) -> str:
    # PNG and JPEG, grayscale and RGB, in a subfolder for half of them
    ext = "png" if i % 2 == 0 else "jpg"
    return f"{'faces/' if i % 3 else ''}img_{i}.{ext}"


def image_mode(i: int) -> str:
    return "L" if i % 4 < 2 else "RGB"


def smiling_of(i: int):
    return None if i % 7 == 3 else i % 2  # empty cells: rows 3, 10, 17, 24


def colour_of(i: int):
    return None if i % 5 == 4 else 1 + i % 3  # 1/2/3 in the CSV, 0/1/2 in the labels


def split_of(i: int) -> str:
    return "test" if i >= 25 else "val" if i >= 20 else "train"


def make_folder(root, n=N, split=True, modes=image_mode, names=image_name, extra=None):
    """A folder of ``n`` images and its labels.csv: tasks smiling (binary,
    some empty) and colour (3-way, values 1..3, some empty)."""
    root = str(root)
    for i in range(n):
        write_image(os.path.join(root, names(i)), i, modes(i))
    header = ["image"] + (["split"] if split else []) + ["smiling", "colour"] + list(extra or {})
    rows = [[names(i)] + ([split_of(i)] if split else []) + [smiling_of(i), colour_of(i)]
            + [values[i] for values in (extra or {}).values()] for i in range(n)]
    write_csv(root, header, rows)
    return root


def cfg(root, **data):
    return parse_config({
        "data": {"dataset": "folder", "root": str(root), "tasks": "all", **data},
        "model": {"stem": "small", "width": 0.125, "decoder_hidden": [16]},
        "modulation": {"kind": "stochastic", "sites": ["layer2"], "noise_scale": 0.5},
        "pretrain": {"epochs": 1, "steps_per_epoch": 2, "batch_size": 8},
        "finetune": {"epochs": 1, "steps_per_epoch": 2, "batch_size": 8},
        "eval": {"batch_size": 64},
    })


def load(root, tasks="all", image_size=None, val_fraction=0.1, seed=0):
    return folder.load(str(root), tasks, image_size, val_fraction, seed)


def rows_of(split) -> list[int]:
    """Image indices of a split, read back from the flat grey of the images."""
    grey = split.images.float().mean((1, 2, 3))
    return [int(round((g - 10) / 8)) for g in grey.tolist()]


# --- loading ---------------------------------------------------------------------------------

def test_loads_given_splits_a_binary_and_a_three_way_task(tmp_path):
    data = load(make_folder(tmp_path))
    assert data.name == "folder" and data.task_names == ["smiling", "colour"]
    smiling, colour = data.tasks
    assert smiling.binary and smiling.num_outputs == 1 and smiling.class_names == ("0", "1")
    assert colour.num_classes == 3 and colour.num_outputs == 3 and colour.class_names == ("1", "2", "3")
    # Some files are RGB: every image has three channels, at the native size.
    assert data.image_shape == (3, SIZE, SIZE) and data.train.images.dtype == torch.uint8
    assert (len(data.train), len(data.val), len(data.test)) == (20, 5, 5)
    for split, expected in ((data.train, range(0, 20)), (data.val, range(20, 25)),
                            (data.test, range(25, 30))):
        assert rows_of(split) == list(expected)  # rows keep the CSV's order
        for k, i in enumerate(expected):
            assert split.labels[k, 0] == (IGNORE if smiling_of(i) is None else smiling_of(i))
            assert split.labels[k, 1] == (IGNORE if colour_of(i) is None else colour_of(i) - 1)
    # Gray files are expanded to RGB with the same grey; JPEG is near-lossless on flat grey.
    grey = torch.tensor([grey_of(i) for i in range(20)], dtype=torch.float)
    assert torch.allclose(data.train.images.float().mean((2, 3)), grey[:, None].expand(20, 3), atol=2)
    assert (data.mean, data.std) == channel_stats(data.train.images)
    assert data.info["split_counts"] == {"train": 20, "val": 5, "test": 5}


def test_empty_cells_leave_the_image_out_of_the_task(tmp_path):
    data = load(make_folder(tmp_path))
    ignored = (data.train.labels[:, 0] == IGNORE).nonzero().flatten().tolist()
    assert ignored == [3, 10, 17]  # smiling is empty in train rows 3, 10 and 17
    assert data.train.task_indices(0).tolist() == [i for i in range(20) if i not in (3, 10, 17)]
    assert (data.train.labels[:, 1] == IGNORE).nonzero().flatten().tolist() == [4, 9, 14, 19]
    labels = torch.cat([data.train.labels, data.val.labels, data.test.labels])
    assert set(labels[:, 0].tolist()) == {IGNORE, 0, 1} and set(labels[:, 1].tolist()) == {IGNORE, 0, 1, 2}


def test_all_grayscale_gives_one_channel(tmp_path):
    data = load(make_folder(tmp_path, modes=lambda i: "L"))
    assert data.image_shape == (1, SIZE, SIZE) and len(data.mean) == 1
    assert torch.allclose(data.train.images.float().mean((1, 2, 3)),
                          torch.tensor([float(grey_of(i)) for i in range(20)]), atol=2)


def test_other_modes_are_converted(tmp_path):
    make_folder(tmp_path)
    Image.new("RGBA", (SIZE, SIZE), (200, 100, 50, 7)).save(tmp_path / "img_0.png")
    Image.new("P", (SIZE, SIZE), 3).save(tmp_path / "faces" / "img_2.png")
    data = load(tmp_path)
    assert data.image_shape == (3, SIZE, SIZE)
    assert data.train.images[0, :, 0, 0].tolist() == [200, 100, 50]  # alpha dropped


def test_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees: a 16x10 file shows 10 wide, 16 high
    for i in range(6):
        array = np.zeros((10, 16, 3), dtype=np.uint8)
        array[:, :8] = 200  # the left half is bright
        Image.fromarray(array).save(tmp_path / f"{i}.jpg", exif=exif, quality=95)
    write_csv(tmp_path, ["image", "smiling"], [[f"{i}.jpg", i % 2] for i in range(6)])
    data = load(tmp_path, val_fraction=0.2)
    assert data.image_shape == (3, 16, 10)
    top, bottom = data.train.images[0, 0, :8].float().mean(), data.train.images[0, 0, 8:].float().mean()
    assert top > 150 > 50 > bottom  # turned clockwise upright: the left half is now on top


def test_seeded_splits_without_a_split_column(tmp_path):
    root = make_folder(tmp_path, split=False)
    a = load(root, val_fraction=0.2, seed=0)
    assert (len(a.train), len(a.val), len(a.test)) == (18, 6, 6)  # test: as many as val
    parts = [rows_of(s) for s in (a.train, a.val, a.test)]
    assert sorted(sum(parts, [])) == list(range(N)) and all(p == sorted(p) for p in parts)
    again = load(root, val_fraction=0.2, seed=0)
    assert [rows_of(s) for s in (again.train, again.val, again.test)] == parts
    other = load(root, val_fraction=0.2, seed=1)
    assert rows_of(other.val) != parts[1]
    # Labels travel with their images.
    for k, i in enumerate(parts[1]):
        assert a.val.labels[k, 1] == (IGNORE if colour_of(i) is None else colour_of(i) - 1)


def test_rows_without_a_split_fill_the_splits_no_row_names(tmp_path):
    root = make_folder(tmp_path)
    header = ["image", "split", "smiling", "colour"]
    # Rows 25..29 are the official test set; the others have no split.
    write_csv(root, header, [[image_name(i), "test" if i >= 25 else "", smiling_of(i), colour_of(i)]
                             for i in range(N)])
    data = load(root, val_fraction=0.2)
    assert rows_of(data.test) == list(range(25, 30))
    assert len(data.val) == 5 and len(data.train) == 20  # 20% of the 25 rows without a split
    assert set(rows_of(data.val)) | set(rows_of(data.train)) == set(range(25))
    # Split names are read case-insensitively, with spaces trimmed.
    write_csv(root, header, [[image_name(i), " Test " if i >= 25 else "VAL" if i >= 20 else "train",
                              smiling_of(i), colour_of(i)] for i in range(N)])
    assert (len(load(root).val), len(load(root).test)) == (5, 5)


def train_test_only(root, n=N):
    """labels.csv with only train and test rows, the common case: rows 25.. are test."""
    write_csv(root, ["image", "split", "smiling", "colour"],
              [[image_name(i), "test" if i >= 25 else "train", smiling_of(i), colour_of(i)] for i in range(n)])


def test_a_train_test_csv_draws_val_from_the_train_rows(tmp_path):
    root = make_folder(tmp_path)
    train_test_only(root)
    data = load(root, val_fraction=0.2, seed=0)
    assert rows_of(data.test) == list(range(25, 30))  # the given test rows, untouched
    assert (len(data.train), len(data.val)) == (20, 5)  # 20% of the 25 train rows
    assert set(rows_of(data.train)) | set(rows_of(data.val)) == set(range(25))
    assert data.info["split_counts"] == {"train": 20, "val": 5, "test": 5}
    assert rows_of(load(root, val_fraction=0.2, seed=0).val) == rows_of(data.val)  # data.split_seed: the same
    assert rows_of(load(root, val_fraction=0.2, seed=1).val) != rows_of(data.val)
    assert len(load(root, val_fraction=0.01).val) == 1  # at least one row
    # what cannot work is still refused: no test rows at all, or a single train row to draw val from
    write_csv(root, ["image", "split", "smiling"], [[image_name(i), "train", i % 2] for i in range(N)])
    assert "no test rows (27 train, 3 val, 0 test)" in error_of(root)
    write_csv(root, ["image", "split", "smiling"], [[image_name(0), "train", 0], [image_name(1), "test", 1]])
    assert "no val rows (1 train, 0 val, 1 test)" in error_of(root)


def test_tasks_all_or_a_list_of_columns(tmp_path):
    root = make_folder(tmp_path, extra={"age": [i % 4 for i in range(N)]})
    assert load(root).task_names == ["smiling", "colour", "age"]
    assert load(root, "attributes").task_names == ["smiling", "colour", "age"]  # data.tasks' default
    picked = load(root, ["age", "smiling"])
    assert picked.task_names == ["age", "smiling"] and picked.tasks[0].num_classes == 4
    assert picked.train.labels[:, 0].tolist() == [i % 4 for i in range(20)]
    with pytest.raises(FolderDataError) as err:
        load(root, ["smiling", "Colour"])
    assert "'Colour'" in str(err.value) and "smiling, colour, age" in str(err.value)
    with pytest.raises(ValueError, match="unknown task set 'smiling'.*all.*list"):
        load(root, "smiling")


def test_image_size_resizes_images_of_any_size(tmp_path):
    root = make_folder(tmp_path)
    write_image(os.path.join(root, image_name(7)), 7, "RGB", size=(20, 14))
    data = load(root, image_size=8)
    assert data.image_shape == (3, 8, 8)
    assert torch.allclose(data.train.images[7].float().mean(), torch.tensor(float(grey_of(7))), atol=2)
    with pytest.raises(FolderDataError) as err:
        load(root)
    message = str(err.value)
    assert "img_0.png is 12x12" in message and "row 9 faces/img_7.jpg is 20x14" in message
    assert "data.image_size" in message


def test_load_data_and_limits_through_the_config(tmp_path):
    root = make_folder(tmp_path)
    data = load_data(cfg(root, tasks=["colour"], image_size=16, train_limit=10, test_limit=3))
    assert data.task_names == ["colour"] and data.image_shape == (3, 16, 16)
    assert (len(data.train), len(data.val), len(data.test)) == (10, 1, 3)
    assert len(load_task_data("folder", root, "all", None, 0.1, 0).train) == 20


# --- the cache -------------------------------------------------------------------------------

def test_cache_is_created_reused_and_rebuilt_when_the_csv_changes(tmp_path):
    root = make_folder(tmp_path)
    first = load(root, image_size=16)
    cache = os.path.join(root, "comod_cache_16.pt")
    assert first.info["cache"] == cache and os.path.isfile(cache)
    assert torch.load(cache, weights_only=True)["images"].shape == (N, 3, 16, 16)
    # Image 0 changes on disk: the cache (keyed by the CSV) is still used.
    write_image(os.path.join(root, image_name(0)), 20)
    second = load(root, image_size=16)
    assert torch.equal(first.train.images, second.train.images)
    # Another size is another cache file.
    native = load(root)
    assert os.path.isfile(os.path.join(root, "comod_cache_native.pt"))
    assert rows_of(native.train)[0] == 20
    # An edited CSV rebuilds the cache: image 0 is decoded again.
    with open(os.path.join(root, "labels.csv"), "a") as f:
        f.write(f"{image_name(0)},train,1,2\n")
    third = load(root, image_size=16)
    assert rows_of(third.train)[0] == 20 and len(third.train) == 21


def test_a_damaged_cache_is_rebuilt(tmp_path):
    root = make_folder(tmp_path)
    load(root)
    with open(os.path.join(root, "comod_cache_native.pt"), "wb") as f:
        f.write(b"not a cache")
    with pytest.warns(UserWarning, match="unreadable image cache"):
        data = load(root)
    assert len(data.train) == 20


# --- bad input -------------------------------------------------------------------------------

def error_of(root, **kwargs) -> str:
    with pytest.raises(FolderDataError) as err:
        load(root, **kwargs)
    assert isinstance(err.value, DatasetNotFoundError)  # reported as a missing dataset is
    return str(err.value)


def test_missing_labels_csv(tmp_path):
    message = error_of(tmp_path)
    assert str(tmp_path / "labels.csv") in message and "holds no labels.csv" in message
    assert "image" in message and "split" in message and "integer class labels" in message
    assert "does not exist" in error_of(tmp_path / "nope")


def test_missing_image_column(tmp_path):
    write_csv(tmp_path, ["file", "smiling"], [["a.png", 1]])
    message = error_of(tmp_path)
    assert "no column 'image'" in message and "file, smiling" in message
    write_csv(tmp_path, ["image;smiling"], [["a.png;1"]])
    assert "separate the cells by commas" in error_of(tmp_path)


def test_missing_image(tmp_path):
    root = make_folder(tmp_path)
    os.remove(os.path.join(root, image_name(3)))
    message = error_of(root)
    assert "row 5: img_3.jpg not found" in message and os.path.join(root, "img_3.jpg") in message
    assert "1 of 30 images" in message


def test_image_that_does_not_decode(tmp_path):
    root = make_folder(tmp_path)
    with open(os.path.join(root, image_name(6)), "wb") as f:
        f.write(b"this is no image")
    message = error_of(root)
    assert "row 8: img_6.png is not an image PIL can read" in message
    # A truncated file passes the header check and fails while decoding.
    make_folder(tmp_path)
    path = os.path.join(root, image_name(4))
    write_image(path, 4, "RGB", size=(300, 300))
    noisy = np.random.default_rng(0).integers(0, 256, (300, 300, 3), dtype=np.uint8)
    Image.fromarray(noisy).save(path)
    with open(path, "rb") as f:
        head = f.read(2000)
    with open(path, "wb") as f:
        f.write(head)
    message = error_of(root, image_size=12)
    assert "row 6: faces/img_4.png does not decode" in message


def test_label_that_is_not_an_integer(tmp_path):
    root = make_folder(tmp_path)
    rows = [[image_name(i), split_of(i), "yes" if i == 2 else smiling_of(i), colour_of(i)] for i in range(N)]
    write_csv(root, ["image", "split", "smiling", "colour"], rows)
    message = error_of(root)
    assert "row 4 (faces/img_2.png), column 'smiling': 'yes' is not an integer" in message
    # 1.0 is an integer (pandas writes integer columns with gaps so); 1.5 is not.
    rows[2][2] = "1.0"
    write_csv(root, ["image", "split", "smiling", "colour"], rows)
    assert load(root).train.labels[2, 0] == 1
    rows[2][2] = "1.5"
    write_csv(root, ["image", "split", "smiling", "colour"], rows)
    assert "'1.5' is not an integer" in error_of(root)


def test_task_with_a_single_class(tmp_path):
    root = make_folder(tmp_path, extra={"bald": [1 if i % 2 else None for i in range(N)]})
    message = error_of(root)
    assert "task column 'bald' has only the class 1" in message
    assert load(root, ["smiling"]).task_names == ["smiling"]  # fine when not asked for


def test_split_name_that_is_not_train_val_or_test(tmp_path):
    root = make_folder(tmp_path)
    rows = [[image_name(i), "training" if i == 12 else split_of(i), i % 2, 1 + i % 3] for i in range(N)]
    write_csv(root, ["image", "split", "smiling", "colour"], rows)
    message = error_of(root)
    assert "row 14 (img_12.png): split 'training' is not one of train, val, test" in message


def test_no_training_rows(tmp_path):
    root = make_folder(tmp_path)
    write_csv(root, ["image", "split", "smiling"], [[image_name(i), "val" if i % 2 else "test", i % 2]
                                                    for i in range(N)])
    message = error_of(root)
    assert "no training rows (0 train, 15 val, 15 test" in message
    # Too few rows without a split for train, val and test.
    write_csv(root, ["image", "smiling"], [[image_name(0), 0], [image_name(1), 1]])
    assert "no training rows" in error_of(root) and "data.val_fraction" in error_of(root)


def test_other_malformed_csvs(tmp_path):
    root = make_folder(tmp_path)
    write_csv(root, ["image", "split"], [[image_name(0), "train"]])
    assert "no task column" in error_of(root)
    write_csv(root, ["image", "smiling"], [[image_name(0), 1], ["", 0]])
    assert "row 3: the image cell is empty" in error_of(root)
    write_csv(root, ["image", "smiling"], [[image_name(0), 1, 5]])
    assert "row 2: 3 cells for the 2 columns" in error_of(root)
    write_csv(root, ["image", "smiling", "smiling"], [[image_name(0), 1, 0]])
    assert "'smiling' appears twice" in error_of(root)
    write_csv(root, ["image", "smiling"], [])
    assert "no rows" in error_of(root)


def test_config_level_errors():
    with pytest.raises(ConfigError, match=r"data.root: got None; expected the folder holding labels.csv"):
        parse_config({"data": {"dataset": "folder", "tasks": "all"}})
    with pytest.raises(ConfigError, match=r"data.tasks: got 'smiling'; expected all .* e.g. \[smiling\]"):
        parse_config({"data": {"dataset": "folder", "root": "/x", "tasks": "smiling"}})
    with pytest.raises(ConfigError, match=r"data.tasks: .*image and split are its reserved columns"):
        parse_config({"data": {"dataset": "folder", "root": "/x", "tasks": ["image", "smiling"]}})
    with pytest.raises(ConfigError, match=r"data.tasks: .*each column named once"):
        parse_config({"data": {"dataset": "folder", "root": "/x", "tasks": ["a", "a"]}})
    with pytest.raises(ConfigError, match=r"data.tasks: got \['a'\].*attributes.*needs dataset folder"):
        parse_config({"data": {"dataset": "synthetic", "tasks": ["a"]}})
    # The default task set (attributes) works for folder too; a list is kept as given.
    assert parse_config({"data": {"dataset": "folder", "root": "/x"}}).data.tasks == "attributes"
    listed = parse_config({"data": {"dataset": "folder", "root": "/x", "tasks": ["a", "b"]}})
    assert listed.data.tasks == ["a", "b"]


# --- end to end ------------------------------------------------------------------------------

def test_run_experiment_on_a_folder(tmp_path):
    from comod.train import run_experiment

    root = make_folder(tmp_path / "images")
    metrics = run_experiment(cfg(root, image_size=16), tmp_path / "run")
    for task in ("smiling", "colour"):
        for name in ("f1", "accuracy", "ece"):
            assert 0.0 <= metrics[f"test/{task}/{name}"] <= 1.0
    assert 0.0 <= metrics["test/mean_f1"] <= 1.0


def test_run_experiment_on_a_train_test_folder(tmp_path):
    from comod.train import run_experiment

    root = make_folder(tmp_path / "images")
    train_test_only(root)
    metrics = run_experiment(cfg(root, image_size=16, val_fraction=0.2), tmp_path / "run")
    assert 0.0 <= metrics["val/mean_f1"] <= 1.0 and 0.0 <= metrics["test/mean_f1"] <= 1.0
