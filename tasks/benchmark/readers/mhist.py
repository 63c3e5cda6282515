"""MHIST colorectal polyps, hyperplastic polyp (HP) vs sessile serrated adenoma (SSA) (Wei et al. 2021,
arXiv:2101.12355), as downloaded.

Layout built against: the dataset page https://bmirds.github.io/MHIST/ (download by request form: ``images.zip`` and
``annotations.csv``) and the layout kaiko-ai's eva documents for it (https://kaiko-ai.github.io/eva/dev/datasets/mhist):
a folder holding ``images/MHIST_aaa.png ...`` (3,152 images, 224x224 px) and ``annotations.csv`` with the columns
``Image Name``, ``Majority Vote Label`` (HP or SSA), ``Number of Annotators who Selected SSA (Out of 7)`` and
``Partition`` (train: 2,175 images, test: 977). The official partition is used as is: zero-shot on ``test``, the
linear probe trains on ``train``. The paper's authors released no MHIST script (PathFoundation/PathGen-1.6M
``Zero-shot_classification/`` holds eight, none for MHIST), so the paper's split and prompt for it are not known;
the class file's names are ours.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from tasks.benchmark.datasets import BenchmarkTask, DatasetFormat, ImageFiles, Split, class_spec, read_csv_rows
from tasks.clip.metrics import ClassSpec

NAME = "mhist"
ANNOTATIONS = "annotations.csv"
IMAGE, LABEL, PARTITION = "Image Name", "Majority Vote Label", "Partition"
PARTITIONS = ("train", "test")


@functools.cache
def _classes() -> ClassSpec:
    return class_spec(NAME)


def detect(folder: Path) -> bool:
    folder = Path(folder)
    images = folder / "images"
    if not ((folder / ANNOTATIONS).is_file() and images.is_dir()):
        return False
    # names only, and only the first: the MHIST_ prefix tells it from any other images/ + annotations.csv pair
    return any(path.name.startswith("MHIST_") for path, _ in zip(images.iterdir(), range(20), strict=False))


def _rows(csv_path: Path) -> list[dict[str, str]]:
    return read_csv_rows(csv_path, (IMAGE, LABEL, PARTITION), "use the annotations.csv that came with MHIST")


def _split(folder: Path, rows: list[dict[str, str]], partition: str, spec: ClassSpec) -> tuple[Split, int]:
    """The images of one partition, and how many of its rows name an image that is not in images/."""
    paths, labels, missing = [], [], 0
    for row in rows:
        if row[PARTITION].strip() != partition:
            continue
        path = folder / "images" / row[IMAGE].strip()
        if not path.is_file():
            missing += 1
            continue
        paths.append(path)
        labels.append(spec.folders.index(row[LABEL].strip()))
    if not paths:
        raise ValueError(
            f"{folder / ANNOTATIONS} names no {partition} image that exists in {folder / 'images'} "
            f"({missing} rows point at missing files); unpack images.zip there"
        )
    return Split(ImageFiles(tuple(paths)), np.asarray(labels, dtype=np.int64), partition), missing


def _check(csv_path: Path, rows: list[dict[str, str]], spec: ClassSpec) -> None:
    for number, row in enumerate(rows, start=2):  # line 1 is the header
        if row[LABEL].strip() not in spec.folders:
            raise ValueError(
                f"{csv_path} line {number}: label {row[LABEL]!r} is not one of {', '.join(spec.folders)} "
                f"(the classes of {NAME}-classes.json)"
            )
        if row[PARTITION].strip() not in PARTITIONS:
            raise ValueError(f"{csv_path} line {number}: partition {row[PARTITION]!r} is neither train nor test")


def read(folder: Path) -> list[BenchmarkTask]:
    folder = Path(folder)
    spec = _classes()
    csv_path = folder / ANNOTATIONS
    rows = _rows(csv_path)
    _check(csv_path, rows, spec)
    test, test_missing = _split(folder, rows, "test", spec)
    train, train_missing = _split(folder, rows, "train", spec)
    split = (
        f"official partition of {csv_path} (column {PARTITION}): {len(test.labels)} test images for zero-shot, "
        f"{len(train.labels)} train images for the linear probe; labels from {LABEL!r}"
    )
    if test_missing or train_missing:
        split += f"; {test_missing} test and {train_missing} train rows left out: their image is not in images/"
    return [BenchmarkTask(NAME, NAME, folder, spec, test, train, split)]


FORMAT = DatasetFormat(
    name=NAME,
    title="MHIST colorectal polyps (HP vs SSA)",
    source="https://bmirds.github.io/MHIST/",
    layout="images/MHIST_*.png + annotations.csv (Image Name, Majority Vote Label, Partition)",
    detect=detect,
    read=read,
    paper=True,
)
