"""LC25000 lung and colon histopathology images (Borkowski et al. 2019, arXiv:1912.12142), as downloaded: two tasks,
``lc25000-lung`` (3 classes) and ``lc25000-colon`` (2 classes), as the paper reports them.

Layout built against: the dataset's README, https://github.com/tampapath/lung_colon_image_set/blob/master/README.md
(LC25000.zip; Kaggle's andrewmvd/lung-and-colon-cancer-histopathological-images holds the same folder): the main
folder ``lung_colon_image_set/`` holds ``lung_image_sets/{lung_aca,lung_n,lung_scc}/`` and
``colon_image_sets/{colon_aca,colon_n}/``, 5,000 768x768 ``.jpeg`` images per class (``lungaca1.jpeg``,
``colonn1.jpeg``, ...). A download holding only one of the two halves gives only that task.

Zero-shot is scored on every image of each half, as the paper's own scripts do (PathFoundation/PathGen-1.6M
``Zero-shot_classification/clip_acc_lc25000_{lung,colon}.py`` walk all of ``lung_image_sets`` /
``colon_image_sets`` for ``.jpeg``; their prompt "An image of {}" and class names are in
``lc25000-{lung,colon}-classes.json``).

There is no official split, so the probe's is derived. The images are augmentations of 1,250 originals (750 lung,
500 colon; arXiv:1912.12142), and nothing in the files tells which original an image came from, so the derived
split is by image: augmentations of one original can be on both sides, which flatters the linear probe (zero-shot
does not train and is unaffected). Every ``split`` sentence says so.
"""

from __future__ import annotations

import functools
from pathlib import Path

from tasks.benchmark.datasets import BenchmarkTask, DatasetFormat, ImageFiles, Split, class_spec, derived_probe_sides
from tasks.clip.metrics import ClassSpec, load_labelled_images

NAME = "lc25000"
HALVES = (("lc25000-lung", "lung_image_sets"), ("lc25000-colon", "colon_image_sets"))  # task name, subfolder


@functools.cache
def _classes(task: str) -> ClassSpec:
    return class_spec(task)  # tasks/clip/data/<task>-classes.json


def _has_half(folder: Path, task: str, subfolder: str) -> bool:
    return all((folder / subfolder / key).is_dir() for key in _classes(task).folders)


def detect(folder: Path) -> bool:
    folder = Path(folder)
    return any(_has_half(folder, task, subfolder) for task, subfolder in HALVES)


def _read_half(folder: Path, task: str, subfolder: str) -> BenchmarkTask:
    spec = _classes(task)
    images = load_labelled_images(folder / subfolder, spec)
    everything = Split(ImageFiles(tuple(images.paths)), images.labels, "all images")
    names = [path.name for path in images.paths]
    train, probe_test, probe = derived_probe_sides(everything, names, task, "images", "image", "its file name")
    split = (
        f"no official split; zero-shot on all {len(images.paths)} images in {folder / subfolder} "
        f"({', '.join(spec.folders)}), as the paper's clip_acc_{task.replace('-', '_')}.py; {probe}; LC25000 is "
        "augmented from 1,250 originals and the files do not say which, so augmentations of one original may be on "
        "both sides (the linear probe is flattered, zero-shot is not)"
    )
    return BenchmarkTask(task, NAME, folder, spec, everything, train, split, probe_test)


def read(folder: Path) -> list[BenchmarkTask]:
    folder = Path(folder)
    present = [(task, subfolder) for task, subfolder in HALVES if (folder / subfolder).is_dir()]
    if not present:
        raise ValueError(
            f"{folder} holds neither lung_image_sets/ nor colon_image_sets/; give the lung_colon_image_set folder "
            "of LC25000.zip"
        )
    return [_read_half(folder, task, subfolder) for task, subfolder in present]


FORMAT = DatasetFormat(
    name=NAME,
    title="LC25000 lung and colon histopathology images",
    source="https://github.com/tampapath/lung_colon_image_set",
    layout="lung_colon_image_set/{lung_image_sets/{lung_aca,lung_n,lung_scc},colon_image_sets/{colon_aca,colon_n}}/*.jpeg",
    detect=detect,
    read=read,
    paper=True,
)
