"""The Heidelberg skin tissue tiles of Kriegsmann et al. 2022 ("Skin Cancer" in the paper): 16 classes, 12 normal
skin structures and 4 neoplasms, as downloaded.

Layout built against: heiDATA doi:10.11588/data/7QCR8S (https://doi.org/10.11588/data/7QCR8S), ``data.zip``, whose
top folder ``data/`` holds ``tiles-v2.csv``, ``class_dict.json`` and ``tiles/<class>/<class>_ws_<n>_<k>.jpg``. The
heiDATA page itself could not be read here; the layout is as public code that loads the download shows it (found by
code search: a download rule fetching heiDATA file 7166 = data.zip, dataset READMEs drawing the tree above, and
loaders reading the columns ``file``, ``class`` and ``set``, where ``set`` is Train, Validation or Test and ``file``
is the tile's path starting with ``data/``, relative to the folder that holds ``data/``). The class keys are the
``class`` values (``nontumor_skin_dermis_dermis``, ``tumor_skin_epithelial_bcc``, ...).

Zero-shot is scored on every row of ``tiles-v2.csv``, Train, Validation and Test alike, as the paper's own script
does (PathFoundation/PathGen-1.6M ``Zero-shot_classification/clip_acc_skincancer.py`` iterates over all rows and
never reads ``set``; its prompt "An H&E image of {}" and class names are in ``skin-classes.json``). The linear
probe uses the official ``set`` column: it trains on Train and is scored on Test (``probe_test``).
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from tasks.benchmark.datasets import BenchmarkTask, DatasetFormat, ImageFiles, Split, class_spec, read_csv_rows
from tasks.clip.metrics import ClassSpec

NAME = "skin"
TABLE = "tiles-v2.csv"
FILE, CLASS, SET = "file", "class", "set"
SETS = {"Test": "test", "Train": "train", "Validation": "validation"}  # the set column's values -> the split's name


@functools.cache
def _classes() -> ClassSpec:
    return class_spec(NAME)


def detect(folder: Path) -> bool:
    folder = Path(folder)
    return (folder / TABLE).is_file() and (folder / "tiles").is_dir()


def _rows(table: Path) -> list[dict[str, str]]:
    return read_csv_rows(table, (FILE, CLASS, SET), "use the tiles-v2.csv of the heiDATA data.zip")


def _tile(folder: Path, file: str) -> Path | None:
    """Where a ``file`` value is: relative to the folder above ``data/`` as released, or to ``folder`` itself when
    ``data/`` was unpacked under another name (the leading ``data/`` then dropped)."""
    relative = Path(file)
    for path in (folder.parent / relative, folder / relative, folder.joinpath(*relative.parts[1:])):
        if path.is_file():
            return path
    return None


def _check(table: Path, rows: list[dict[str, str]], spec: ClassSpec) -> None:
    for number, row in enumerate(rows, start=2):  # line 1 is the header
        if row[CLASS] not in spec.folders:
            raise ValueError(
                f"{table} line {number}: class {row[CLASS]!r} is not in {NAME}-classes.json; the known classes are "
                f"{', '.join(spec.folders)}"
            )
        if row[SET] not in SETS:
            raise ValueError(f"{table} line {number}: set {row[SET]!r} is not one of {', '.join(SETS)}")


def _tiles(folder: Path, rows: list[dict[str, str]], spec: ClassSpec) -> tuple[Split, list[str], int]:
    """Every row's tile (zero-shot), the split each comes from, and how many rows name a tile that is not there."""
    paths, labels, sets, missing = [], [], [], 0
    for row in rows:
        path = _tile(folder, row[FILE])
        if path is None:
            missing += 1
            continue
        paths.append(path)
        labels.append(spec.folders.index(row[CLASS]))
        sets.append(SETS[row[SET]])
    if not paths:
        raise ValueError(
            f"{folder / TABLE} names no tile that exists under {folder} ({missing} rows point at missing files); "
            "unpack all of data.zip"
        )
    return Split(ImageFiles(tuple(paths)), np.asarray(labels, dtype=np.int64), "all"), sets, missing


def read(folder: Path) -> list[BenchmarkTask]:
    folder = Path(folder)
    spec = _classes()
    table = folder / TABLE
    rows = _rows(table)
    _check(table, rows, spec)
    test, sets, missing = _tiles(folder, rows, spec)
    train_at, scored_at = (np.flatnonzero(np.asarray(sets) == name) for name in ("train", "test"))
    split = f"zero-shot on all {len(test.labels)} tiles of {table} (Train, Validation and Test), as the paper's "
    if len(train_at) and len(scored_at):
        train, probe_test = test.subset(train_at, "train"), test.subset(scored_at, "test")
        split += (
            f"clip_acc_skincancer.py; the probe trains on the {len(train_at)} Train tiles and is scored on the "
            f"{len(scored_at)} Test tiles (column {SET!r})"
        )
    else:
        train = probe_test = None
        split += f"clip_acc_skincancer.py; no probe: no Train or no Test tile (column {SET!r}) is there"
    if missing:
        split += f"; {missing} rows left out: their tile is not under {folder}"
    return [BenchmarkTask(NAME, NAME, folder, spec, test, train, split, probe_test)]


FORMAT = DatasetFormat(
    name=NAME,
    title="Skin Cancer (Kriegsmann et al. 2022, Heidelberg skin tissue tiles)",
    source="https://doi.org/10.11588/data/7QCR8S",
    layout="data/ with tiles-v2.csv (file, class, set) and tiles/<class>/*.jpg",
    detect=detect,
    read=read,
    paper=True,
)
