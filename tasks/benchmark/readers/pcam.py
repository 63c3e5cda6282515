"""PatchCamelyon (PCam): 96 x 96 px lymph-node patches, metastatic tissue or not, read lazily from the HDF5 files.

Layout built against (the Zenodo record 2546921 and https://github.com/basveeling/pcam, as read by
kaiko-ai/eva ``src/eva/vision/data/datasets/classification/patch_camelyon.py``): one folder holding
``camelyonpatch_level_2_split_{train,valid,test}_{x,y}.h5`` (downloaded as ``.h5.gz``: gunzip them first) and the
``..._meta.csv`` files. In each ``_x.h5`` the dataset ``x`` is ``[N, 96, 96, 3]`` uint8 RGB; in each ``_y.h5`` the
dataset ``y`` is ``[N, 1, 1, 1]``, 1 when the centre 32 x 32 px hold metastatic tumour, else 0.

Zero-shot is scored on the official test split (32,768 patches) and the probe trains on the official train split
(262,144); the valid split is not used. The paper's authors released no PCam script (PathFoundation/PathGen-1.6M
``Zero-shot_classification/`` holds eight, none for PCam), so which split and prompt the paper scored is not
known; the class file's names and templates are ours. Patches are read one at a time from the open file, never as
one array: the train images are 7 GB.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from tasks.benchmark.datasets import BenchmarkTask, DatasetFormat, Split, class_spec

NAME = "pcam"
PREFIX = "camelyonpatch_level_2_split"
PATCH_SHAPE = (96, 96, 3)

# one open handle per (process, file): h5py handles do not survive a fork, so a worker process opens its own; the
# lock keeps evaluate's image-loading threads from opening one file twice (the second handle would leak)
_OPEN: dict[tuple[int, str], Any] = {}
_OPENING = threading.Lock()


def _file(folder: Path, split: str, kind: str) -> Path:
    return folder / f"{PREFIX}_{split}_{kind}.h5"


def _h5(path: Path) -> Any:
    import h5py

    key = (os.getpid(), str(path))
    with _OPENING:
        if key not in _OPEN:
            _OPEN[key] = h5py.File(path, "r")
        return _OPEN[key]


def _close(path: Path) -> None:
    with _OPENING:
        handle = _OPEN.pop((os.getpid(), str(path)), None)
    if handle is not None:
        handle.close()


@dataclass(frozen=True)
class H5Images:
    """The patches of one ``_x.h5`` file, opened on first use in each process."""

    path: Path
    count: int
    key: str = "x"

    def __len__(self) -> int:
        return self.count

    def load(self, index: int) -> Image.Image:
        try:
            array = np.asarray(_h5(self.path)[self.key][index], dtype=np.uint8)
        except (OSError, KeyError) as exc:
            raise ValueError(f"{self.name(index)} cannot be read ({exc}); download the file again") from None
        return Image.fromarray(array, "RGB")

    def name(self, index: int) -> str:
        return f"{self.path}[{index}]"

    def close(self) -> None:
        """Close this process's handle (after an evaluation); the next ``load`` opens it again."""
        _close(self.path)


def detect(folder: Path) -> bool:
    """The test split's two files, as ``.h5`` or as downloaded (``.h5.gz``)."""
    return all(
        _file(folder, "test", kind).is_file() or _file(folder, "test", kind).with_suffix(".h5.gz").is_file()
        for kind in ("x", "y")
    )


def _require(path: Path) -> None:
    if path.is_file():
        return
    gz = path.with_suffix(".h5.gz")
    if gz.is_file():
        raise ValueError(f"{gz} is still gzip-compressed as downloaded; run `gunzip {gz}` (h5py reads only .h5)")
    raise ValueError(f"PCam file {path} is missing; download it from {FORMAT.source}")


def _split(folder: Path, split: str) -> Split:
    import h5py

    x_path, y_path = _file(folder, split, "x"), _file(folder, split, "y")
    for path in (x_path, y_path):
        _require(path)
    try:
        with h5py.File(x_path, "r") as fx, h5py.File(y_path, "r") as fy:
            x, y = fx["x"], fy["y"]
            shape, labels = tuple(x.shape), np.asarray(y[:]).reshape(-1)
    except (OSError, KeyError) as exc:
        raise ValueError(
            f"{x_path.name} / {y_path.name} cannot be read as PCam HDF5 ({exc}); they must hold datasets 'x' and 'y'"
        ) from None
    if len(shape) != 4 or shape[1:] != PATCH_SHAPE:
        raise ValueError(f"{x_path}: dataset 'x' has shape {shape}; PCam patches are [N, 96, 96, 3]")
    if shape[0] != len(labels):
        raise ValueError(f"{x_path.name} holds {shape[0]} patches but {y_path.name} {len(labels)} labels")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError(f"{y_path}: labels must be 0 (no tumour) or 1 (metastatic tumour)")
    return Split(H5Images(x_path, shape[0]), labels.astype(np.int64), split)


def read(folder: Path) -> list[BenchmarkTask]:
    folder = Path(folder)
    test = _split(folder, "test")
    has_train = _file(folder, "train", "x").is_file() and _file(folder, "train", "y").is_file()
    train = _split(folder, "train") if has_train else None
    train_files = f"{PREFIX}_train_{{x,y}}.h5"
    probe = f"the probe trains on the official train split ({train_files})" if train else f"no probe: no {train_files}"
    split = f"official PCam test split ({PREFIX}_test_{{x,y}}.h5, {len(test.labels)} patches); {probe}"
    return [BenchmarkTask(NAME, NAME, folder, class_spec(NAME), test, train, split)]


FORMAT = DatasetFormat(
    name=NAME,
    title="PatchCamelyon (PCam)",
    source="https://zenodo.org/records/2546921 (gunzip the .h5.gz files)",
    layout=f"{PREFIX}_{{train,valid,test}}_{{x,y}}.h5 in one folder",
    detect=detect,
    read=read,
    paper=True,
)
