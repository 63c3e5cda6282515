"""Labelled patch benchmarks as they are downloaded: the typed record a reader returns, the reader registry, format
detection and the suites.

A reader (one module per format under ``tasks/benchmark/readers/``, each exposing ``FORMAT``) recognises its
dataset by its files and reads it without conversion into one or more ``BenchmarkTask`` (LC25000 gives two: lung
and colon). A task holds the split zero-shot is scored on (``test``), the split a linear probe trains on
(``train``, when the dataset has one or the reader derives one), the split the probe is scored on when it is not
``test`` (``probe_test``), its classes with their names and prompt templates (a class file
``tasks/clip/data/<format>-classes.json``, as ``pathgen evaluate --classes`` reads), and a sentence saying which
split each is and where it came from.

``test`` is the split the paper's zero-shot is scored on, as the PathGen-1.6M authors' own scripts read it
(github.com/PathFoundation/PathGen-1.6M, ``Zero-shot_classification/clip_acc_*.py``): for several datasets that
is not the official test split (all of NCT-CRC-HE-100K, SICAPv2's ``partition/Test/Train.xlsx``, every row of the
skin set's tiles-v2.csv, every labelled image where there is no official split). The probe then trains on the
official train split, or a derived one, and is scored on ``probe_test`` so it never tests on what it trained on.
"""

from __future__ import annotations

import csv
import hashlib
import importlib
import pkgutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image

from tasks.clip.metrics import ClassSpec, load_class_spec

CLASS_FILES = Path(__file__).resolve().parents[1] / "clip" / "data"
MAX_DEPTH = 3  # how deep under --root a dataset folder is looked for (a download unpacks a folder or two deep)
# share of the groups (slides, patients, images) a derived split gives the probe's training side, for every dataset
# without an official split: zero-shot scores all of it anyway, so the derived split serves only the probe, whose
# train and test sides are then about equal; the paper publishes no probe split for these datasets
DERIVED_TRAIN_FRACTION = 0.5


class Images(Protocol):
    """Images by index, read when asked for, so a 300,000-patch set never sits in memory."""

    def __len__(self) -> int: ...

    def load(self, index: int) -> Image.Image:
        """The image as RGB; a ValueError naming it when its bytes are not an image."""
        ...

    def name(self, index: int) -> str:
        """What a person finds it by (a file path, or ``file.h5[index]``)."""
        ...

    def close(self) -> None:
        """Let go of open files (an HDF5 handle) once an evaluation is done; a later ``load`` opens them again."""
        ...


@dataclass(frozen=True)
class ImageFiles:
    """Images stored one per file."""

    paths: tuple[Path, ...]

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> Image.Image:
        path = self.paths[index]
        try:
            with Image.open(path) as image:
                return image.convert("RGB")
        except OSError as exc:  # the dataset's content: named, so it is replaced rather than retried
            raise ValueError(f"{path} cannot be read as an image ({exc}); remove or replace it") from None

    def name(self, index: int) -> str:
        return str(self.paths[index])

    def close(self) -> None:  # every load opens and closes its own file
        return None


@dataclass(frozen=True)
class Split:
    images: Images
    labels: np.ndarray  # int64 indices into the task's classes.folders, one per image
    name: str  # "test", "train", "all", or what the dataset calls it

    def __post_init__(self) -> None:
        if len(self.images) != len(self.labels):
            raise ValueError(f"split {self.name!r}: {len(self.images)} images but {len(self.labels)} labels")
        if len(self.labels) == 0:
            raise ValueError(f"split {self.name!r} has no images")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: np.ndarray, name: str) -> Split:
        return Split(_Subset(self.images, tuple(int(i) for i in indices)), self.labels[indices], name)


@dataclass(frozen=True)
class _Subset:
    images: Images
    indices: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, index: int) -> Image.Image:
        return self.images.load(self.indices[index])

    def name(self, index: int) -> str:
        return self.images.name(self.indices[index])

    def close(self) -> None:
        self.images.close()


@dataclass(frozen=True)
class BenchmarkTask:
    name: str  # the row of the benchmark summary: "pcam", "lc25000-lung"
    format: str  # the reader's name
    folder: Path  # the dataset folder as downloaded
    classes: ClassSpec  # folders are the class keys; label i is classes.folders[i]
    test: Split  # zero-shot is scored here: the split the paper's zero-shot scores
    train: Split | None  # the linear probe trains here; None when there is nothing to train on
    split: str  # which split, and where it came from: said in every result
    probe_test: Split | None = None  # the linear probe is scored here; None: on ``test``

    def close(self) -> None:
        """Let go of the files its splits hold open (PCam's HDF5 handles), once it is evaluated."""
        for split in (self.test, self.train, self.probe_test):
            if split is not None:
                split.images.close()


@dataclass(frozen=True)
class DatasetFormat:
    name: str  # the --format value
    title: str  # "PatchCamelyon (PCam)"
    source: str  # where to download it, printed when it is missing
    layout: str  # the files it is recognised by, in one line
    detect: Callable[[Path], bool]  # cheap: looks at names, never reads images
    read: Callable[[Path], list[BenchmarkTask]]
    paper: bool  # one of the paper's zero-shot datasets


SUITES: dict[str, Sequence[str] | None] = {
    "paper": ("pcam", "crc100k", "sicapv2", "bach", "osteo", "skin", "mhist", "wsss4luad", "lc25000"),
    "all": None,  # every format there is a reader for
}


def formats() -> dict[str, DatasetFormat]:
    """Every reader under tasks/benchmark/readers/, by format name."""
    from tasks.benchmark import readers

    found = {}
    for module in pkgutil.iter_modules(readers.__path__):
        fmt = importlib.import_module(f"{readers.__name__}.{module.name}").FORMAT
        found[fmt.name] = fmt
    return dict(sorted(found.items()))


def suite_formats(suite: str) -> list[DatasetFormat]:
    known = formats()
    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}; choose one of: {', '.join(SUITES)}")
    names = SUITES[suite] or list(known)
    return [known[name] for name in names]


def class_spec(format_name: str) -> ClassSpec:
    """The shipped class names and synonyms of a format (``tasks/clip/data/<format>-classes.json``)."""
    return load_class_spec(CLASS_FILES / f"{format_name}-classes.json")


def detect_format(folder: Path, candidates: Sequence[DatasetFormat] | None = None) -> DatasetFormat:
    """The one format whose files ``folder`` holds; an error naming the choices when none or several match."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"dataset folder {folder} does not exist")
    candidates = list(candidates) if candidates is not None else list(formats().values())
    matches = [fmt for fmt in candidates if fmt.detect(folder)]
    if len(matches) == 1:
        return matches[0]
    names = ", ".join(fmt.name for fmt in candidates)
    if not matches:
        raise ValueError(
            f"{folder} is not laid out as any known dataset; name its format with --format ({names}), or give "
            "--classes for a folder with one subfolder per class"
        )
    raise ValueError(
        f"{folder} looks like several datasets ({', '.join(f.name for f in matches)}); choose one with --format"
    )


def find_datasets(root: Path, suite: Sequence[DatasetFormat]) -> dict[str, list[Path]]:
    """Folders under ``root`` (itself included, up to MAX_DEPTH down) recognised as each format of the suite, in
    path order; a recognised folder is not searched further, so a dataset's own subfolders never count twice."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"benchmark root {root} does not exist; --root: a folder holding the downloaded datasets")
    found: dict[str, list[Path]] = {fmt.name: [] for fmt in suite}
    level = [root]
    for _ in range(MAX_DEPTH + 1):
        deeper = []
        for folder in level:
            matches = [fmt for fmt in suite if fmt.detect(folder)]
            for fmt in matches:
                found[fmt.name].append(folder)
            if not matches:
                deeper.extend(sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")))
        level = deeper
    return found


def positions_in(split: Split, whole: Split) -> np.ndarray | None:
    """Where ``split``'s images sit among ``whole``'s, when it is ``whole`` itself or a ``subset`` of it, however
    deep (a probe's train and test sides cut from the zero-shot images, and the paper probe's samples cut from
    those), so the features computed for ``whole`` serve it without embedding its images again; None when it holds
    other images."""
    return _positions(split.images, whole.images)


def _positions(images: Images, whole: Images) -> np.ndarray | None:
    if images is whole:
        return np.arange(len(whole), dtype=np.int64)
    if isinstance(images, _Subset):
        inner = _positions(images.images, whole)
        return None if inner is None else inner[np.asarray(images.indices, dtype=np.int64)]
    return None


def folder_split(folder: Path, spec: ClassSpec, name: str) -> Split:
    """One subfolder per class of ``spec`` (the class keys), images inside each."""
    from tasks.clip.metrics import load_labelled_images

    labelled = load_labelled_images(folder, spec)
    return Split(ImageFiles(tuple(labelled.paths)), labelled.labels, name)


def read_csv_rows(path: Path, columns: Sequence[str], fix: str) -> list[dict[str, str]]:
    """The rows of a dataset's CSV table (a UTF-8 byte order mark allowed), each by column name; a ValueError
    naming the file, what is wrong and ``fix`` (how to get a good one) when it cannot be read or lacks a column."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            missing = [column for column in columns if column not in (reader.fieldnames or [])]
            if missing:
                raise ValueError(
                    f"{path} lacks the column(s) {', '.join(missing)} (it has: "
                    f"{', '.join(reader.fieldnames or []) or 'none'}); {fix}"
                )
            return list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ValueError(f"{path} cannot be read as a CSV file ({exc}); {fix}") from None


def stable_fraction(key: str, salt: str = "") -> float:
    """A number in [0, 1) fixed by ``key`` alone: the same file lands in the same split on every machine and run,
    and adding files to a dataset never moves the others."""
    digest = hashlib.sha256(f"{salt}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _in_train(groups: Sequence[str], salt: str, train_fraction: float) -> np.ndarray:
    return np.array([stable_fraction(g, salt) < train_fraction for g in groups], dtype=bool)


def derived_split(
    split: Split, groups: Sequence[str], salt: str, train_fraction: float = DERIVED_TRAIN_FRACTION
) -> tuple[Split, Split]:
    """Train and test parts of a dataset without an official split, by group (a patient or a source image, so no
    group is on both sides): a group goes to train when ``stable_fraction(group) < train_fraction``."""
    if len(groups) != len(split.labels):
        raise ValueError(f"{len(groups)} groups for {len(split.labels)} images")
    in_train = _in_train(groups, salt, train_fraction)
    train, test = np.flatnonzero(in_train), np.flatnonzero(~in_train)
    if not len(train) or not len(test):
        raise ValueError(f"{len(set(groups))} groups cannot be split into train and test; the dataset is too small")
    return split.subset(train, "train (derived)"), split.subset(test, "test (derived)")


def derived_probe(whole: Split, groups: Sequence[str], salt: str) -> tuple[Split, Split] | None:
    """The linear probe's train and scored sides of a dataset without an official split, cut from the images
    zero-shot scores (``derived_split`` by group); None when its groups all fall on one side (a tiny download):
    zero-shot still scores every image, there is just no probe."""
    if len(groups) != len(whole.labels):
        raise ValueError(f"{len(groups)} groups for {len(whole.labels)} images")
    in_train = _in_train(groups, salt, DERIVED_TRAIN_FRACTION)
    return derived_split(whole, groups, salt) if in_train.any() and not in_train.all() else None


def derived_probe_sides(
    whole: Split, groups: Sequence[str], salt: str, items: str, group: str, how: str = ""
) -> tuple[Split | None, Split | None, str]:
    """The probe's train and scored sides of a dataset without an official split (``derived_probe``), and the
    sentence that says so: ``items`` is what an image is ("tiles"), ``group`` what keeps images together ("slide"),
    ``how`` where the group is read ("CRC-Prim-HE-NN in the tile name"). Both sides None when the groups all fall
    on one side."""
    sides = derived_probe(whole, groups, salt)
    said = (
        f"the probe's split is derived by {group} ({how + '; ' if how else ''}{len(set(groups))} {group}s, about "
        f"{DERIVED_TRAIN_FRACTION:.0%} to train by a stable hash, no {group} on both sides)"
    )
    if sides is None:
        return None, None, f"{said}: no probe: the {group}s all fall on one side"
    train, probe_test = sides
    return train, probe_test, f"{said}: it trains on {len(train)} {items} and is scored on {len(probe_test)}"
