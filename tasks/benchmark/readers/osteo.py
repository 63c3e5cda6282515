"""Osteosarcoma (UT Southwestern / UT Dallas, TCIA "Osteosarcoma-Tumor-Assessment"): 1,144 tiles of 1024 x 1024 px
at 10x from 4 patients, labelled non-tumour, necrotic (non-viable) tumour or viable tumour.

Layout built against (the TCIA collection page, DOI 10.7937/tcia.2019.bvhjhdas, and public readers of it found with
the code search, e.g. an ``OSDataset`` class that walks ``Osteosarcoma-UT/`` and reads ``ML_Features_1144.csv``):
``Osteosarcoma-UT/Training-Set-1/set*/`` and ``Training-Set-2/set*/`` holding the tiles as ``.jpg``
(``Case-3-A14-37149-17859.jpg``), and the label table ``ML_Features_1144.csv`` (downloaded from the collection
page; put it in the same folder) with the columns ``image.name`` (``Case 3 A10-10547-25283``, ``Case 48 - P5
C13-24121-14200``: spaces where the file names have hyphens) and ``classification`` (``Non-Tumor``, ``Viable``,
``Non-Viable-Tumor``, and ``viable: non-viable`` for 53 mixed tiles).

Zero-shot is scored on every tile of the table, as the paper's own script does (PathFoundation/PathGen-1.6M
``Zero-shot_classification/clip_acc_osteo.py`` reads every row of ``ML_Features_1144.csv``, spells ``image.name``
as the tile's file name the way ``_key`` does, and labels the mixed ``viable: non-viable`` tiles viable tumour;
its prompt "An H&E image patch of {}" and class names are in ``osteo-classes.json``).

There is no official split, so the probe's is derived by slide (``Case 3 A10``: the name without its tile
coordinates): no slide is on both sides, but with 4 patients (Case 3, Case 4, Case 48, P9, one of them
single-class) a patient split cannot give both sides every class, so one patient's slides can be on both sides;
the split sentence says so.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np

from tasks.benchmark.datasets import (
    BenchmarkTask,
    DatasetFormat,
    ImageFiles,
    Split,
    class_spec,
    derived_probe_sides,
    read_csv_rows,
)
from tasks.clip.metrics import IMAGE_SUFFIXES

NAME = "osteo"
TABLE = "ML_Features_1144.csv"
NAME_COLUMN, CLASS_COLUMN = "image.name", "classification"
TILE_SETS = "Training-Set-*"
MIXED = "viable: non-viable"
MIXED_AS = "viable"  # the class the paper's script gives the mixed tiles (its csv2_label_dict)


def detect(folder: Path) -> bool:
    return (folder / TABLE).is_file() and any(p.is_dir() for p in folder.glob(TILE_SETS))


def _key(name: str) -> str:
    """Table names and file stems spelled alike: runs of spaces and hyphens become one hyphen, lower case."""
    return re.sub(r"[\s\-]+", "-", name.strip()).lower()


def _slide(key: str) -> str:
    return re.sub(r"-\d+-\d+$", "", key)  # drop the tile's x-y coordinates


def _tiles(folder: Path) -> dict[str, list[Path]]:
    found: dict[str, list[Path]] = {}
    for tile_set in sorted(p for p in folder.glob(TILE_SETS) if p.is_dir()):
        for path in sorted(tile_set.rglob("*")):
            if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
                found.setdefault(_key(path.stem), []).append(path)
    return found


def _table(folder: Path) -> list[dict[str, str]]:
    return read_csv_rows(folder / TABLE, (NAME_COLUMN, CLASS_COLUMN), f"download it again from {FORMAT.source}")


def _labelled(folder: Path, classes: list[str], skipped: Counter[str]) -> tuple[list[Path], list[int], list[str]]:
    """Tiles with their label and slide; ``skipped`` counts the rows left out, and the mixed tiles relabelled."""
    tiles, label_of = _tiles(folder), {c.lower(): i for i, c in enumerate(classes)}
    paths, labels, slides = [], [], []
    for row in _table(folder):
        key, cls = _key(row[NAME_COLUMN] or ""), (row[CLASS_COLUMN] or "").strip().lower()
        found = tiles.get(key, [])
        if cls == MIXED and len(found) == 1:
            skipped[MIXED] += 1
        if cls == MIXED:
            cls = MIXED_AS
        if cls not in label_of:
            skipped[f"rows with a class other than {', '.join(classes)}"] += 1
        elif len(found) != 1:
            skipped["rows with no tile file" if not found else "rows matching several tile files"] += 1
        else:
            paths.append(found[0])
            labels.append(label_of[cls])
            slides.append(_slide(key))
    return paths, labels, slides


def read(folder: Path) -> list[BenchmarkTask]:
    folder = Path(folder)
    spec = class_spec(NAME)
    skipped: Counter[str] = Counter()
    paths, labels, slides = _labelled(folder, spec.folders, skipped)
    if not paths:
        raise ValueError(f"no row of {folder / TABLE} matches a tile under {folder}/{TILE_SETS}/; check the download")
    every = Split(ImageFiles(tuple(paths)), np.asarray(labels, dtype=np.int64), "all tiles")
    train, probe_test, probe = derived_probe_sides(
        every, slides, NAME, "tiles", "slide", "image.name without its tile coordinates"
    )
    mixed = skipped.pop(MIXED, 0)
    left_out = "; ".join(f"{n} {why}" for why, n in sorted(skipped.items()))
    patients = " (a patient can be on both sides)" if train is not None else ""
    split = (
        f"no official split; zero-shot on all {len(every.labels)} tiles of {TABLE} found under {TILE_SETS}/ "
        f"({mixed} mixed '{MIXED}' tiles labelled viable tumour), as the paper's clip_acc_osteo.py; {probe}{patients}"
        + (f"; left out: {left_out}" if left_out else "")
    )
    return [BenchmarkTask(NAME, NAME, folder, spec, every, train, split, probe_test)]


FORMAT = DatasetFormat(
    name=NAME,
    title="Osteosarcoma tumour assessment (UT Southwestern, TCIA)",
    source=(
        "https://www.cancerimagingarchive.net/collection/osteosarcoma-tumor-assessment/ "
        "(the tiles, and ML_Features_1144.csv put beside their Training-Set-* folders)"
    ),
    layout=f"{TABLE} beside {TILE_SETS}/set*/ of .jpg tiles",
    detect=detect,
    read=read,
    paper=True,
)
