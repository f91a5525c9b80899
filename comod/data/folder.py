"""Your own images as multi-task data: a folder with a ``labels.csv``.

The shape of CelebA's ``list_attr_celeba.txt``, as a CSV: one row per
image, a column ``image`` (a path relative to the folder), an optional
column ``split`` (``train``, ``val`` or ``test``) and one column per task,
named by its header and holding integer class labels. A task with two
classes is a binary attribute (one logit, as CelebA's); one with more is a
K-way task. An empty label cell leaves that image out of that task
(:data:`~comod.data.taskdata.IGNORE`). docs/guides/own-data.md is the guide.

Labels: each task's classes are the sorted distinct integers of its column,
numbered 0..K-1 in that order, so 0/1 stays 0/1, CelebA's -1/1 becomes
0/1 and 1/2/3 becomes 0/1/2; the task's ``class_names`` keep the values of
the CSV.

Splits: rows that name a split keep it. The other rows are shuffled with
``data.split_seed`` and fill the splits that no row names: ``val_fraction``
of them go to val and as many to test (each at least one), the rest to
train. A CSV without a ``split`` column is thus split 80/10/10 by default;
one that names only its test rows gets its val rows drawn from the rest.
Where still no row is val (every row is train or test, the common
train/test CSV), ``val_fraction`` of the train rows, drawn with the same
seed, become val (at least one, and at least one stays train).

Images are anything PIL reads, turned upright by their EXIF orientation:
all grayscale gives one channel, anything else is converted to RGB (alpha
dropped). They are resized to ``image_size`` squares when set; without it
they must all have one size. The images are decoded once, on a thread pool,
and cached as ``ROOT/comod_cache_{size}.pt`` (``native`` without
image_size), keyed by the SHA-256 of labels.csv's bytes and the size: an
edited CSV rebuilds it, a replaced image file under an unchanged CSV does
not (delete the cache file then).
"""
from __future__ import annotations

import csv
import hashlib
import io
import os
import re
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .taskdata import (IGNORE, DatasetNotFoundError, Split, TaskData, TaskSpec, channel_stats,
                       save_cache, search_roots)

CSV_NAME = "labels.csv"
IMAGE_COLUMN = "image"
SPLIT_COLUMN = "split"
SPLITS = ("train", "val", "test")
ALL = "all"
TASK_SETS = {
    ALL: "every task column of labels.csv; data.tasks may instead list some column names",
    "attributes": "the same as all (data.tasks' default, so dataset: folder needs no tasks setting)",
}
CACHE_VERSION = 1
GRAYSCALE_MODES = {"1", "L", "LA", "La", "I", "F", "I;16", "I;16L", "I;16B", "I;16N"}
INTEGER = re.compile(r"[+-]?\d+(\.0*)?")  # "1.0" too: pandas writes int columns with gaps as floats
CSV_HELP = (f"{CSV_NAME} is a comma-separated file with a header row: a column {IMAGE_COLUMN} "
            f"(image paths relative to data.root), an optional column {SPLIT_COLUMN} (train, val "
            f"or test) and one column of integer class labels per task (docs/guides/own-data.md)")
MAX_LISTED = 5


class FolderDataError(DatasetNotFoundError):
    """labels.csv or its images are missing or malformed. The message names
    the row, column and file, and the fix. A :class:`DatasetNotFoundError`,
    so everything that reports a missing dataset as one message (the command
    line, searches) reports these the same way."""


@dataclass
class Table:
    """labels.csv, parsed: per image its path, spreadsheet row number (the
    header is row 1) and split (None: not given), and the raw cells of
    every task column."""

    csv_path: str
    digest: str
    columns: list[str]
    paths: list[str]
    rows: list[int]
    splits: list[str | None]
    cells: dict[str, list[str]]
    has_split_column: bool


def read_table(base: str) -> Table:
    csv_path = os.path.join(base, CSV_NAME)
    if not os.path.isfile(csv_path):
        where = (f"{base} does not exist" if not os.path.exists(base) else
                 f"{base} is not a folder" if not os.path.isdir(base) else
                 f"{base} holds no {CSV_NAME}")
        raise FolderDataError(f"{csv_path} not found ({where}). data.root must be the folder "
                              f"holding {CSV_NAME}: {CSV_HELP}.")
    with open(csv_path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")  # a spreadsheet's byte-order mark is not part of the header
    except UnicodeDecodeError as err:
        raise FolderDataError(f"{csv_path} is not UTF-8 text ({err}); save it as UTF-8 CSV") from None
    records = csv.reader(io.StringIO(text, newline=""))
    header = [name.strip() for name in next(records, [])]
    if not any(header):
        raise FolderDataError(f"{csv_path} is empty; {CSV_HELP}")
    for i, name in enumerate(header):
        if not name:
            raise FolderDataError(f"{csv_path} row 1: column {i + 1} has no name; name it or delete it")
        if name in header[:i]:
            raise FolderDataError(f"{csv_path} row 1: column {name!r} appears twice; rename one")
    if IMAGE_COLUMN not in header:
        hint = ""
        if len(header) == 1 and any(sep in header[0] for sep in ";\t "):
            hint = " (it reads as one column: separate the cells by commas)"
        raise FolderDataError(f"{csv_path} has no column {IMAGE_COLUMN!r}; its header is "
                              f"{', '.join(header)}{hint}. {CSV_HELP}.")
    columns = [c for c in header if c not in (IMAGE_COLUMN, SPLIT_COLUMN)]
    paths, rows, splits = [], [], []
    cells: dict[str, list[str]] = {c: [] for c in columns}
    for row, record in enumerate(records, start=2):
        if not any(cell.strip() for cell in record):
            continue  # blank lines
        if len(record) > len(header):
            raise FolderDataError(f"{csv_path} row {row}: {len(record)} cells for the {len(header)} "
                                  f"columns of the header ({', '.join(header)}); a path or label "
                                  f"with a comma must be quoted")
        values = dict(zip(header, (cell.strip() for cell in record)))  # missing cells read as empty
        image = values.get(IMAGE_COLUMN, "")
        if not image:
            raise FolderDataError(f"{csv_path} row {row}: the {IMAGE_COLUMN} cell is empty; "
                                  f"every row needs an image path")
        split = values.get(SPLIT_COLUMN, "").lower() or None
        if split is not None and split not in SPLITS:
            raise FolderDataError(f"{csv_path} row {row} ({image}): split {values[SPLIT_COLUMN]!r} "
                                  f"is not one of {', '.join(SPLITS)}; leave it empty to let "
                                  f"data.val_fraction and data.split_seed assign the row")
        paths.append(os.path.normpath(os.path.join(base, image)))
        rows.append(row)
        splits.append(split)
        for c in columns:
            cells[c].append(values.get(c, ""))
    if not paths:
        raise FolderDataError(f"{csv_path} has a header but no rows; add one row per image")
    return Table(csv_path, hashlib.sha256(raw).hexdigest(), columns, paths, rows, splits, cells,
                 SPLIT_COLUMN in header)


def select_tasks(table: Table, task_set: str | list[str]) -> list[str]:
    if not table.columns:
        raise FolderDataError(f"{table.csv_path} has no task column, only {IMAGE_COLUMN}"
                              f"{' and ' + SPLIT_COLUMN if table.has_split_column else ''}; "
                              f"add one column of integer class labels per task")
    if isinstance(task_set, str):
        return list(table.columns)
    unknown = [c for c in task_set if c not in table.columns]
    if unknown:
        what = "is not a task column" if len(unknown) == 1 else "are not task columns"
        raise FolderDataError(f"data.tasks: {', '.join(map(repr, unknown))} {what} of "
                              f"{table.csv_path}; its task columns are: {', '.join(table.columns)}")
    return list(task_set)


def parse_task(table: Table, column: str) -> tuple[TaskSpec, torch.Tensor]:
    """One task column as a TaskSpec and labels 0..K-1 (IGNORE where empty)."""
    values = []
    for i, cell in enumerate(table.cells[column]):
        if not cell:
            values.append(None)
        elif INTEGER.fullmatch(cell):
            values.append(int(float(cell)) if "." in cell else int(cell))
        else:
            raise FolderDataError(f"{table.csv_path} row {table.rows[i]} ({relative(table, i)}), "
                                  f"column {column!r}: {cell!r} is not an integer; task labels "
                                  f"are integer classes such as 0, 1, 2 (an empty cell leaves "
                                  f"the image out of the task)")
    classes = sorted({v for v in values if v is not None})
    if len(classes) < 2:
        found = f"only the class {classes[0]}" if classes else "no labels at all"
        raise FolderDataError(f"{table.csv_path}: task column {column!r} has {found}; a task needs "
                              f"at least two classes (drop the column, or leave it out of data.tasks)")
    index = {v: k for k, v in enumerate(classes)}
    labels = torch.tensor([IGNORE if v is None else index[v] for v in values], dtype=torch.long)
    return TaskSpec(column, len(classes), tuple(str(v) for v in classes)), labels


def relative(table: Table, i: int) -> str:
    return os.path.relpath(table.paths[i], os.path.dirname(table.csv_path))


def assign_splits(table: Table, val_fraction: float, seed: int) -> dict[str, torch.Tensor]:
    """Row indices of each split, in row order (rules in the module docstring)."""
    given = {s for s in table.splits if s is not None}
    free = torch.tensor([i for i, s in enumerate(table.splits) if s is None], dtype=torch.long)
    assigned = list(table.splits)
    n, shares = 0, []
    if len(free):
        shares = [s for s in ("val", "test") if s not in given]
        perm = free[torch.randperm(len(free), generator=torch.Generator().manual_seed(seed))]
        n = max(1, round(len(free) * val_fraction)) if shares else 0
        start = 0
        for share in shares:
            for i in perm[start:start + n].tolist():
                assigned[i] = share
            start += n
        for i in perm[start:].tolist():
            assigned[i] = "train"
    if "val" not in assigned:
        _carve_val_from_train(assigned, val_fraction, seed)
    index = {s: torch.tensor([i for i, a in enumerate(assigned) if a == s], dtype=torch.long)
             for s in SPLITS}
    counts = ", ".join(f"{len(v)} {k}" for k, v in index.items())
    if len(index["train"]) == 0:
        raise FolderDataError(
            f"{table.csv_path}: no training rows ({counts} of {len(table.paths)} rows). Mark rows "
            f"train in the {SPLIT_COLUMN} column or leave their cell empty"
            + (f"; data.val_fraction={val_fraction} sends {n} of the {len(free)} rows without a "
               f"split to {' and to '.join(shares)} each: lower it, or add rows" if n else ""))
    if len(index["test"]) == 0:
        raise FolderDataError(f"{table.csv_path}: no test rows ({counts}); mark some rows test "
                              f"in the {SPLIT_COLUMN} column or leave some split cells empty")
    if len(index["val"]) == 0:  # one train row, none to spare
        raise FolderDataError(f"{table.csv_path}: no val rows ({counts}), and a single train row to draw "
                              f"them from; mark some rows val, or add train rows")
    return index


def _carve_val_from_train(assigned: list[str | None], val_fraction: float, seed: int) -> None:
    """Make ``val_fraction`` of the train rows val (at least one, leaving at least one train row),
    drawn with ``seed``; in place."""
    train = torch.tensor([i for i, a in enumerate(assigned) if a == "train"], dtype=torch.long)
    n = min(max(1, round(len(train) * val_fraction)), len(train) - 1)
    if n < 1:
        return
    perm = train[torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))]
    for i in perm[:n].tolist():
        assigned[i] = "val"


# --- images --------------------------------------------------------------------------------

def probe(path: str) -> tuple[str, tuple[int, int]]:
    """Mode and upright (width, height) from the header, without decoding."""
    with Image.open(path) as im:
        width, height = im.size
        # EXIF orientations 5 to 8 swap the axes. Read where the header holds the EXIF block
        # (JPEG, WebP, TIFF; a PNG's only when it comes before the pixels), never by decoding.
        if "exif" in im.info or im.format == "TIFF":
            if im.getexif().get(0x0112) in (5, 6, 7, 8):
                width, height = height, width
        return im.mode, (width, height)


def decode(path: str, gray: bool, size: int | None) -> np.ndarray:
    """uint8 ``[H, W]`` (gray) or ``[H, W, 3]``, upright, resized to ``size`` squares."""
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode.startswith("I;16"):  # 16-bit gray: keep the high byte, not a clipped low one
            im = Image.fromarray((np.asarray(im, dtype=np.uint16) >> 8).astype(np.uint8))
        im = im.convert("L" if gray else "RGB")
        if size is not None and im.size != (size, size):
            im = im.resize((size, size), Image.Resampling.BILINEAR)  # antialiased, as resize_images
        return np.array(im, dtype=np.uint8)  # a writable copy, for torch.from_numpy


def image_error(table: Table, i: int, err: Exception) -> str:
    if isinstance(err, FileNotFoundError):
        problem = f"not found (looked for {table.paths[i]})"
    elif isinstance(err, IsADirectoryError):
        problem = "is a folder, not an image"
    elif isinstance(err, UnidentifiedImageError):
        problem = "is not an image PIL can read"
    else:
        problem = f"does not decode ({type(err).__name__}: {err})"
    return f"row {table.rows[i]}: {relative(table, i)} {problem}"


def run_all(table: Table, work, items: list[int]) -> list:
    """``work(i)`` for every row index, on a thread pool (PIL releases the
    GIL while it decodes and resizes); bad rows are reported together."""
    def safe(i):
        try:
            return work(i), None
        except Exception as err:  # PIL raises OSError, SyntaxError, EOFError, ... on bad files
            return None, image_error(table, i, err)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            results = list(pool.map(safe, items))
    errors = [e for _, e in results if e is not None]
    if errors:
        more = f"\n  ... and {len(errors) - MAX_LISTED} more" if len(errors) > MAX_LISTED else ""
        raise FolderDataError(f"{table.csv_path}: {len(errors)} of {len(items)} images cannot be "
                              f"read (paths are relative to {os.path.dirname(table.csv_path)}):\n  "
                              + "\n  ".join(errors[:MAX_LISTED]) + more)
    return [r for r, _ in results]


def decode_images(table: Table, size: int | None) -> torch.Tensor:
    n = len(table.paths)
    headers = run_all(table, lambda i: probe(table.paths[i]), list(range(n)))
    gray = all(mode in GRAYSCALE_MODES for mode, _ in headers)
    if size is None:
        first = headers[0][1]
        for i, (_, wh) in enumerate(headers):
            if wh != first:
                raise FolderDataError(
                    f"{table.csv_path}: images differ in size: row {table.rows[0]} "
                    f"{relative(table, 0)} is {first[0]}x{first[1]}, row {table.rows[i]} "
                    f"{relative(table, i)} is {wh[0]}x{wh[1]} (width x height). Set data.image_size "
                    f"(e.g. data.image_size: 64) to resize every image to one square size")
        width, height = first
    else:
        width = height = size
    out = torch.empty((n, 1 if gray else 3, height, width), dtype=torch.uint8)

    def fill(i: int) -> None:
        array = decode(table.paths[i], gray, size)
        if array.shape[:2] != (height, width):  # the header lied (a damaged file)
            raise ValueError(f"decoded as {array.shape[1]}x{array.shape[0]}, "
                             f"its header says {width}x{height}")
        out[i] = torch.from_numpy(array.reshape(height, width, -1)).permute(2, 0, 1)

    run_all(table, fill, list(range(n)))
    return out


# --- cache and loading -----------------------------------------------------------------------

def cache_key(table: Table, size: int | None) -> dict:
    return {"version": CACHE_VERSION, "size": size if size is not None else "native",
            "csv_sha256": table.digest}


def load_cache(path: str, key: dict, n: int) -> torch.Tensor | None:
    if not os.path.isfile(path):
        return None
    try:
        cache = torch.load(path, weights_only=True)
    except Exception as err:  # a damaged or foreign file: decode again and overwrite it
        warnings.warn(f"ignoring the unreadable image cache {path} ({err}); decoding again")
        return None
    if not isinstance(cache, dict) or any(cache.get(k) != v for k, v in key.items()):
        return None
    images = cache.get("images")
    ok = isinstance(images, torch.Tensor) and images.dtype == torch.uint8 and images.dim() == 4
    return images if ok and len(images) == n else None


def check_task_set(task_set) -> None:
    if isinstance(task_set, str):
        if task_set not in TASK_SETS:
            raise ValueError(f"unknown task set {task_set!r} for folder; choose one of: {ALL}, or a "
                             f"list of labels.csv's column names (e.g. [{task_set}])")
        return
    if (not isinstance(task_set, (list, tuple)) or not task_set
            or not all(isinstance(c, str) and c for c in task_set)):
        raise ValueError(f"folder tasks must be {ALL!r} or a non-empty list of column names, "
                         f"got {task_set!r}")
    duplicates = sorted({c for c in task_set if list(task_set).count(c) > 1})
    if duplicates:
        raise ValueError(f"folder tasks list {', '.join(duplicates)} twice; name each column once")
    special = [c for c in task_set if c in (IMAGE_COLUMN, SPLIT_COLUMN)]
    if special:
        raise ValueError(f"folder tasks cannot include {', '.join(special)}: {IMAGE_COLUMN} and "
                         f"{SPLIT_COLUMN} are labels.csv's reserved columns, not tasks")


def load(root: str | None, task_set: str | list[str], image_size: int | None, val_fraction: float,
         seed: int) -> TaskData:
    """The images and tasks of ``ROOT/labels.csv`` (the module docstring has
    the format): the task columns ``task_set`` names (``all``: every one),
    splits given or drawn with ``val_fraction`` and ``seed``, images cached
    as ``ROOT/comod_cache_{image_size or 'native'}.pt``."""
    check_task_set(task_set)
    if image_size is not None and (not isinstance(image_size, int) or isinstance(image_size, bool)
                                   or image_size <= 0):
        raise ValueError(f"image_size must be a positive int (or None for the native size), "
                         f"got {image_size!r}")
    if root is None:
        raise FolderDataError(f"dataset folder needs data.root: the folder holding {CSV_NAME} "
                              f"({CSV_HELP})")
    base = search_roots(root)[0]
    table = read_table(base)
    columns = select_tasks(table, task_set)
    parsed = [parse_task(table, c) for c in columns]  # label errors before the long decode
    index = assign_splits(table, val_fraction, seed)
    key = cache_key(table, image_size)
    cache_path = os.path.join(base, f"comod_cache_{key['size']}.pt")
    images = load_cache(cache_path, key, len(table.paths))
    if images is None:
        images = decode_images(table, image_size)
        save_cache({**key, "images": images}, cache_path, "image")
    labels = torch.stack([column for _, column in parsed], dim=1)
    splits = {s: Split(images[i], labels[i]) for s, i in index.items()}
    del images  # the splits hold copies; the full tensor goes now
    mean, std = channel_stats(splits["train"].images)
    return TaskData(name="folder", tasks=[spec for spec, _ in parsed], mean=mean, std=std,
                    info={"source": table.csv_path, "task_set": task_set, "cache": cache_path,
                          "split_counts": {s: len(i) for s, i in index.items()},
                          "splits_given": sorted({s for s in table.splits if s is not None})},
                    **splits)
