"""CelebA as multi-task data: 40 binary face attributes, official splits.

The method's main protocol: 40 attributes at 64x64 (docs/method.md,
"Datasets and protocols"). Annotations are parsed by torchvision's CelebA
class; the JPEGs are decoded once, in batches on all cores, resized and
cached as one uint8 tensor file, so every later load reads a single file.
"""
from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor

import torch
from torchvision.datasets import CelebA
from torchvision.io import ImageReadMode, decode_jpeg

from .taskdata import (DatasetNotFoundError, Split, TaskData, TaskSpec, channel_stats,
                       check_task_set, resize_images, save_cache, search_roots)

TASK_SETS = {"attributes": "40 binary face attributes (5_o_Clock_Shadow, ..., Young)"}
DEFAULT_SIZE = 64  # native 178x218 would take 24 GB as uint8 for the 202,599 images
SPLITS = {"train": "train", "val": "valid", "test": "test"}
FOLDER = CelebA.base_folder
IMAGE_FOLDER = "img_align_celeba"
ANNOTATIONS = tuple(name for _, _, name in CelebA.file_list if name.endswith(".txt"))
CACHE_VERSION = 1


class CelebAFiles(CelebA):
    """torchvision's parser with presence checks in place of md5 checks:
    torchvision compares the annotation files' md5s, which re-saved copies
    (line endings, trimmed subsets, the test fakes) fail although they parse
    the same."""

    def _check_integrity(self) -> bool:
        return has_files(self.root)


def has_files(base: str) -> bool:
    folder = os.path.join(base, FOLDER)
    return (all(os.path.isfile(os.path.join(folder, name)) for name in ANNOTATIONS)
            and os.path.isdir(os.path.join(folder, IMAGE_FOLDER)))


def locate(root: str | None) -> str:
    searched = search_roots(root)
    for base in searched:
        if has_files(base):
            return base
    raise DatasetNotFoundError("\n".join(
        [f"CelebA not found: no folder holds {FOLDER}/{IMAGE_FOLDER}/ and "
         f"{FOLDER}/{{{','.join(ANNOTATIONS)}}}.", "Looked in:"]
        + [f"  {os.path.join(base, FOLDER)}" for base in searched]
        + ["Get it in torchvision's layout: download img_align_celeba.zip and the annotation "
           "files from mmlab.ie.cuhk.edu.hk/projects/CelebA.html, unzip into ROOT/celeba/ "
           "(ROOT/celeba/img_align_celeba/000001.jpg, ROOT/celeba/list_attr_celeba.txt, ...), "
           "then set COMOD_DATA=ROOT or pass root;",
           "  or torchvision.datasets.CelebA(ROOT, download=True) when online (needs gdown)."]))


def read_bytes(path: str) -> torch.Tensor:
    with open(path, "rb") as f:
        return torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)


def decode_files(paths: list[str], size: int) -> torch.Tensor:
    """Read, decode (one batched call) and resize one chunk of JPEGs."""
    images = torch.stack(decode_jpeg([read_bytes(p) for p in paths], mode=ImageReadMode.RGB))
    return resize_images(images, size)


def decode_all(paths: list[str], size: int, chunk: int = 512) -> torch.Tensor:
    if not paths:
        return torch.empty((0, 3, size, size), dtype=torch.uint8)
    # Filled in place: concatenating chunks would briefly need twice the 2.5 GB of CelebA at 64x64.
    out = torch.empty((len(paths), 3, size, size), dtype=torch.uint8)

    def fill(start: int) -> None:
        out[start:start + chunk] = decode_files(paths[start:start + chunk], size)

    # torchvision 0.29 marks its decoders deprecated in favour of torchcodec (not a
    # dependency) and warns once per call; the decoder itself is unchanged.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torchvision\.io")
        # decode_jpeg and resize release the GIL, so threads use every core.
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            list(pool.map(fill, range(0, len(paths), chunk)))
    return out


def fingerprint(base: str) -> list[int]:
    """Sizes of the annotation files: a changed list (another subset, a new
    release) invalidates the cache, a copy to another disk does not."""
    return [os.path.getsize(os.path.join(base, FOLDER, name)) for name in ANNOTATIONS]


def build_cache(base: str, size: int) -> dict:
    cache = {"version": CACHE_VERSION, "size": size, "fingerprint": fingerprint(base)}
    for split, tv_split in SPLITS.items():
        dataset = CelebAFiles(base, split=tv_split, target_type="attr")
        # The header line ends in a space, which the parser keeps as an empty name.
        cache["attr_names"] = [n for n in dataset.attr_names if n]
        assert len(cache["attr_names"]) == dataset.attr.shape[1], (
            f"{len(cache['attr_names'])} attribute names for {dataset.attr.shape[1]} columns")
        paths = [os.path.join(base, FOLDER, IMAGE_FOLDER, f) for f in dataset.filename]
        cache[split] = {"images": decode_all(paths, size), "labels": dataset.attr.long()}
    return cache


def load_cache(path: str, base: str, size: int) -> dict | None:
    if not os.path.isfile(path):
        return None
    cache = torch.load(path, weights_only=True)
    expected = {"version": CACHE_VERSION, "size": size, "fingerprint": fingerprint(base)}
    return cache if all(cache.get(k) == v for k, v in expected.items()) else None


def load(root: str | None, task_set: str, image_size: int | None, val_fraction: float,
         seed: int) -> TaskData:
    """CelebA's official train/valid/test splits (``val_fraction`` and
    ``seed`` are unused), all 40 attributes with labels 0/1, images
    ``image_size`` square (default 64), cached in
    ``ROOT/celeba/comod_cache_{size}.pt``."""
    check_task_set("celeba", task_set, TASK_SETS)
    size = DEFAULT_SIZE if image_size is None else image_size
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise ValueError(f"image_size must be a positive int (or None for {DEFAULT_SIZE}), "
                         f"got {image_size!r}")
    base = locate(root)
    cache_path = os.path.join(base, FOLDER, f"comod_cache_{size}.pt")
    cache = load_cache(cache_path, base, size)
    if cache is None:
        cache = build_cache(base, size)
        save_cache(cache, cache_path, "CelebA")
    splits = {s: Split(cache[s]["images"], cache[s]["labels"]) for s in SPLITS}
    mean, std = channel_stats(splits["train"].images)
    return TaskData(name="celeba", tasks=[TaskSpec(n, 2) for n in cache["attr_names"]],
                    mean=mean, std=std, info={"source": os.path.join(base, FOLDER),
                                              "task_set": task_set, "cache": cache_path},
                    **splits)
