"""BACH (ICIAR 2018 Grand Challenge on BreAst Cancer Histology): 400 breast microscopy photos, four classes.

Layout built against (the Zenodo record 3632035, ``ICIAR2018_BACH_Challenge.zip``, as described in kaiko-ai/eva
``docs/datasets/bach.md``): ``ICIAR2018_BACH_Challenge/Photos/{Benign,InSitu,Invasive,Normal}/`` holding
``b001.tif``..``b100.tif``, ``is001``.., ``iv001``.., ``n001``.. (2048 x 1536 px),
``Photos/microscopy_ground_truth.csv`` (the same labels as the folders) and ``WSI/`` (not used). The challenge's
test photos (``ICIAR2018_BACH_Challenge_TestDataset``) have no public labels: there is no labelled test split.

Zero-shot is scored on every labelled photo, as the paper's own script does (PathFoundation/PathGen-1.6M
``Zero-shot_classification/clip_acc_BACH.py`` reads the authors' reformatted ``formalized_data/images`` folder of
photos whose name ends in the class letter A..D = Benign, InSitu, Invasive, Normal: the labelled photos, the test
set's labels being unpublished; its prompt "An H&E image of {}" and class names are in ``bach-classes.json``).

The linear probe's split is by patient, never one patient on both sides: the BACH organisers published which photos
share a patient, and kaiko-ai/eva (``src/eva/vision/data/datasets/classification/bach.py``) turned that into a
train / validation split of the 400 photos, 268 / 132, given as index ranges over the sorted files.
``TRAIN_NUMBERS`` is that split written as photo numbers per class; the probe trains on eva's train photos and is
scored on its validation photos (``probe_test``). A photo not named like the release (``<prefix><3 digits>.tif``
in its class folder) is left out and counted.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np

from tasks.benchmark.datasets import BenchmarkTask, DatasetFormat, ImageFiles, Split, class_spec
from tasks.clip.metrics import IMAGE_SUFFIXES

NAME = "bach"
TOP = "ICIAR2018_BACH_Challenge"
PREFIXES = {"Benign": "b", "InSitu": "is", "Invasive": "iv", "Normal": "n"}  # class folder -> file name prefix
PHOTO = re.compile(r"(b|is|iv|n)(\d{3})\.tiff?", re.IGNORECASE)


def _numbers(*spans: tuple[int, int]) -> frozenset[int]:
    return frozenset(n for first, last in spans for n in range(first, last + 1))


# eva's train index ranges (0, 41) (59, 60) (90, 139) (169, 240) (258, 260) (273, 345) (368, 400) over the files
# sorted Benign, InSitu, Invasive, Normal (100 each), as photo numbers 1..100 of each class
TRAIN_NUMBERS: dict[str, frozenset[int]] = {
    "Benign": _numbers((1, 41), (60, 60), (91, 100)),
    "InSitu": _numbers((1, 39), (70, 100)),
    "Invasive": _numbers((1, 40), (59, 60), (74, 100)),
    "Normal": _numbers((1, 45), (69, 100)),
}


def _photos(folder: Path) -> Path:
    return folder / "Photos"


def detect(folder: Path) -> bool:
    return all((_photos(folder) / c).is_dir() for c in PREFIXES)


def _resolve(folder: Path) -> Path:
    """The ``ICIAR2018_BACH_Challenge`` folder, also when given the folder the zip was unpacked into."""
    if not detect(folder) and detect(folder / TOP):
        return folder / TOP
    if not detect(folder):
        raise ValueError(f"{folder} holds no Photos/{{{','.join(PREFIXES)}}}/; download BACH from {FORMAT.source}")
    return folder


def _photos_by_side(photos: Path, spec_folders: list[str], skipped: Counter[str]) -> list[tuple[Path, int, bool]]:
    """Every release-named photo: its path, label, and whether eva's patient split puts it on the train side."""
    found = []
    for label, cls in enumerate(spec_folders):
        for path in sorted(p for p in (photos / cls).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
            match = PHOTO.fullmatch(path.name)
            if not match or match.group(1).lower() != PREFIXES[cls] or not 1 <= int(match.group(2)) <= 100:
                skipped[f"files in Photos/{cls}/ not named {PREFIXES[cls]}001..{PREFIXES[cls]}100.tif"] += 1
                continue
            found.append((path, label, int(match.group(2)) in TRAIN_NUMBERS[cls]))
    return found


def read(folder: Path) -> list[BenchmarkTask]:
    folder = _resolve(Path(folder))
    spec = class_spec(NAME)
    skipped: Counter[str] = Counter()
    found = _photos_by_side(_photos(folder), spec.folders, skipped)
    labels = np.asarray([label for _, label, _ in found], dtype=np.int64)
    test = Split(ImageFiles(tuple(path for path, _, _ in found)), labels, "all labelled photos")
    in_train = np.asarray([side for _, _, side in found], dtype=bool)
    left_out = "; ".join(f"{n} {why}" for why, n in sorted(skipped.items()))
    split = (
        f"no labelled official test set; zero-shot on all {len(test.labels)} labelled photos of Photos/, as the "
        f"paper's clip_acc_BACH.py; "
    )
    if in_train.any() and not in_train.all():
        train = test.subset(np.flatnonzero(in_train), "train (patient split)")
        probe_test = test.subset(np.flatnonzero(~in_train), "validation (patient split)")
        split += (
            f"the probe trains on kaiko-ai/eva's patient-level train photos ({len(train.labels)}) and is scored on "
            f"its validation photos ({len(probe_test.labels)})"
        )
    else:  # a partial download: zero-shot still scores every photo there is
        train = probe_test = None
        side = "train" if in_train.all() else "validation"
        split += f"no probe: every photo there is on kaiko-ai/eva's {side} side of its patient split"
    split += f"; left out: {left_out}" if left_out else ""
    return [BenchmarkTask(NAME, NAME, folder, spec, test, train, split, probe_test)]


FORMAT = DatasetFormat(
    name=NAME,
    title="BACH (ICIAR 2018 breast histology photos)",
    source="https://zenodo.org/records/3632035 (ICIAR2018_BACH_Challenge.zip)",
    layout=f"{TOP}/Photos/{{Benign,InSitu,Invasive,Normal}}/*.tif",
    detect=detect,
    read=read,
    paper=True,
)
