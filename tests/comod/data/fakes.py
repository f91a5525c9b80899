"""Tiny datasets written in the real on-disk formats, so the loaders run on
exactly the bytes they meet in the wild: gzipped IDX (Fashion-MNIST),
Python 2 pickles (CIFAR-100), JPEGs plus space-separated annotation lists
(CelebA, torchvision's layout)."""
from __future__ import annotations

import gzip
import os
import pickle
import struct

import numpy as np
from PIL import Image

CELEBA_ATTRIBUTES = (
    "5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose "
    "Black_Hair Blond_Hair Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee "
    "Gray_Hair Heavy_Makeup High_Cheekbones Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard "
    "Oval_Face Pale_Skin Pointy_Nose Receding_Hairline Rosy_Cheeks Sideburns Smiling Straight_Hair "
    "Wavy_Hair Wearing_Earrings Wearing_Hat Wearing_Lipstick Wearing_Necklace Wearing_Necktie Young"
).split()

CIFAR100_SUPERCLASSES = {
    "aquatic_mammals": "beaver dolphin otter seal whale",
    "fish": "aquarium_fish flatfish ray shark trout",
    "flowers": "orchid poppy rose sunflower tulip",
    "food_containers": "bottle bowl can cup plate",
    "fruit_and_vegetables": "apple mushroom orange pear sweet_pepper",
    "household_electrical_devices": "clock keyboard lamp telephone television",
    "household_furniture": "bed chair couch table wardrobe",
    "insects": "bee beetle butterfly caterpillar cockroach",
    "large_carnivores": "bear leopard lion tiger wolf",
    "large_man-made_outdoor_things": "bridge castle house road skyscraper",
    "large_natural_outdoor_scenes": "cloud forest mountain plain sea",
    "large_omnivores_and_herbivores": "camel cattle chimpanzee elephant kangaroo",
    "medium_mammals": "fox porcupine possum raccoon skunk",
    "non-insect_invertebrates": "crab lobster snail spider worm",
    "people": "baby boy girl man woman",
    "reptiles": "crocodile dinosaur lizard snake turtle",
    "small_mammals": "hamster mouse rabbit shrew squirrel",
    "trees": "maple_tree oak_tree palm_tree pine_tree willow_tree",
    "vehicles_1": "bicycle bus motorcycle pickup_truck train",
    "vehicles_2": "lawn_mower rocket streetcar tank tractor",
}
CIFAR100_COARSE = sorted(CIFAR100_SUPERCLASSES)
CIFAR100_FINE = sorted(f for members in CIFAR100_SUPERCLASSES.values() for f in members.split())
CIFAR100_COARSE_OF_FINE = [CIFAR100_COARSE.index(c) for f in CIFAR100_FINE
                           for c, members in CIFAR100_SUPERCLASSES.items() if f in members.split()]


# --- Fashion-MNIST: big-endian IDX, gzipped like the distributed files ----------------------

def write_idx(path: str, array: np.ndarray, gz: bool) -> None:
    # magic = 0x00 0x00 <type 0x08 = uint8> <number of dimensions>, then each dimension (int32 BE)
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    opener = gzip.open if gz else open
    with opener(path + (".gz" if gz else ""), "wb") as f:
        f.write(data)


def write_fashion_mnist(directory: str, n_train: int = 60, n_test: int = 20, gz: bool = True) -> dict:
    """Four IDX files in ``directory``; labels cycle through the 10 classes
    and each image's pixels equal 10 * its label (so order can be checked)."""
    os.makedirs(directory, exist_ok=True)
    out = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % 10
        images = np.repeat(labels[:, None, None] * 10, 28 * 28).reshape(n, 28, 28)
        write_idx(os.path.join(directory, f"{split}-images-idx3-ubyte"), images, gz)
        write_idx(os.path.join(directory, f"{split}-labels-idx1-ubyte"), labels, gz)
        out[split] = labels
    return out


# --- CIFAR-100: dicts pickled by Python 2 (str keys as 8-bit strings) -----------------------

class Python2Pickler(pickle._Pickler):
    """Writes str and bytes (numpy's raw array data) as Python 2's 8-bit
    strings (SHORT_BINSTRING/BINSTRING), as in the distributed files: they
    load as str with ``encoding="latin1"`` (torchvision's way) and as bytes
    with ``encoding="bytes"``."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj: str | bytes) -> None:
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[str] = save_py2_str
    dispatch[bytes] = save_py2_str


def write_py2_pickle(path: str, obj) -> None:
    with open(path, "wb") as f:
        Python2Pickler(f, protocol=2).dump(obj)


def cifar_batch(fine: np.ndarray, label: str) -> dict:
    n = len(fine)
    # Each image is one grey level, 2 * its fine label, so order and labels can be checked.
    data = np.repeat((fine * 2).astype(np.uint8)[:, None], 3 * 32 * 32, axis=1)
    return {"filenames": [f"fake_{i}.png" for i in range(n)], "batch_label": label,
            "fine_labels": fine.tolist(),
            "coarse_labels": [CIFAR100_COARSE_OF_FINE[f] for f in fine.tolist()],
            "data": data}


def write_cifar100(root: str, n_test: int = 20) -> dict:
    """``root/cifar-100-python/{train,test,meta}``: train holds each fine
    class once (so every superclass shows its five), test ``n_test``."""
    folder = os.path.join(root, "cifar-100-python")
    os.makedirs(folder, exist_ok=True)
    fine = {"train": np.arange(100), "test": (np.arange(n_test) * 7) % 100}
    write_py2_pickle(os.path.join(folder, "train"), cifar_batch(fine["train"], "training batch 1 of 1"))
    write_py2_pickle(os.path.join(folder, "test"), cifar_batch(fine["test"], "testing batch 1 of 1"))
    write_py2_pickle(os.path.join(folder, "meta"), {"fine_label_names": CIFAR100_FINE,
                                                    "coarse_label_names": CIFAR100_COARSE})
    return fine


# --- CelebA: torchvision's layout, annotation lists as distributed --------------------------

CELEBA_PARTITION = (0,) * 8 + (1,) * 2 + (2,) * 2


def celeba_attributes(n: int) -> np.ndarray:
    """+-1 like the file; attribute j of image i is 1 when (i + j) % 3 == 0."""
    i, j = np.meshgrid(np.arange(n), np.arange(40), indexing="ij")
    return np.where((i + j) % 3 == 0, 1, -1)


def write_celeba(root: str, height: int = 44, width: int = 36) -> dict:
    """Twelve JPEGs (8 train, 2 valid, 2 test) of one grey level each, 20 * (i + 1),
    and the five annotation lists in their distributed formats."""
    folder = os.path.join(root, "celeba")
    images = os.path.join(folder, "img_align_celeba")
    os.makedirs(images, exist_ok=True)
    n = len(CELEBA_PARTITION)
    names = [f"{i + 1:06d}.jpg" for i in range(n)]
    for i, name in enumerate(names):
        pixels = np.full((height, width, 3), 20 * (i + 1), dtype=np.uint8)
        Image.fromarray(pixels).save(os.path.join(images, name), format="JPEG", quality=95)
    attr = celeba_attributes(n)

    def write(filename: str, lines: list[str]) -> None:
        with open(os.path.join(folder, filename), "w") as f:
            f.write("\n".join(lines) + "\n")

    write("list_attr_celeba.txt", [str(n), " ".join(CELEBA_ATTRIBUTES) + " "]
          + [f"{name} " + " ".join(f"{v:2d}" for v in row) for name, row in zip(names, attr)])
    write("list_eval_partition.txt", [f"{name} {p}" for name, p in zip(names, CELEBA_PARTITION)])
    write("identity_CelebA.txt", [f"{name} {1000 + i % 3}" for i, name in enumerate(names)])
    write("list_bbox_celeba.txt", [str(n), "image_id x_1 y_1 width height"]
          + [f"{name}    95  71 226 313" for name in names])
    write("list_landmarks_align_celeba.txt",
          [str(n), "lefteye_x lefteye_y righteye_x righteye_y nose_x nose_y "
                   "leftmouth_x leftmouth_y rightmouth_x rightmouth_y"]
          + [f"{name} 69  109  106  113   77  142   73  152  108  154" for name in names])
    return {"names": names, "attr": (attr + 1) // 2, "partition": CELEBA_PARTITION}
