"""Kather et al. 2016 colorectal cancer texture tiles, as downloaded (not one of the paper's datasets).

Layout built against: zenodo record 53169 (https://zenodo.org/records/53169), the unpacked
``Kather_texture_2016_image_tiles_5000.zip``: one folder per class, ``01_TUMOR 02_STROMA 03_COMPLEX 04_LYMPHO
05_DEBRIS 06_MUCOSA 07_ADIPOSE 08_EMPTY``, 150x150 px ``.tif`` tiles inside, each tile named after the image it was
cut from, e.g. ``1A11_CRC-Prim-HE-07_022.tif_Row_601_Col_151.tif`` (slide CRC-Prim-HE-07, region 022). The shared
sample ``../shared/data/patches/kather2016-samples`` has the same layout. The class keys are those of
``tasks/clip/data/kather2016-classes.json``.

There is no official split. Tiles of one slide share staining and patient, so the derived split is by slide
(``CRC-Prim-HE-NN`` in the name; a tile whose name carries none is its own group, and the count is said).
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

from tasks.benchmark.datasets import (
    BenchmarkTask,
    DatasetFormat,
    ImageFiles,
    Split,
    class_spec,
    derived_split,
)
from tasks.clip.metrics import ClassSpec, load_labelled_images

NAME = "kather2016"
TRAIN_FRACTION = 0.3  # of the slides; the larger part stays for zero-shot, which is what the benchmark reports
SLIDE = re.compile(r"CRC-Prim-HE-\d+")


@functools.cache
def _classes() -> ClassSpec:
    return class_spec(NAME)


def detect(folder: Path) -> bool:
    return all((Path(folder) / key).is_dir() for key in _classes().folders)


def _slide(path: Path) -> str | None:
    found = SLIDE.search(path.name)
    return found.group(0) if found else None


def read(folder: Path) -> list[BenchmarkTask]:
    folder = Path(folder)
    spec = _classes()
    tiles = load_labelled_images(folder, spec)
    slides = [_slide(path) for path in tiles.paths]
    groups = [slide or path.name for slide, path in zip(slides, tiles.paths, strict=True)]
    everything = Split(ImageFiles(tuple(tiles.paths)), tiles.labels, "all")
    train, test = derived_split(everything, groups, TRAIN_FRACTION, NAME)
    group_of = {str(path): group for path, group in zip(tiles.paths, groups, strict=True)}
    in_test = {group_of[test.images.name(i)] for i in range(len(test.labels))}
    unnamed = slides.count(None)
    split = (
        f"no official split: {len(test.labels)} of the {len(tiles.paths)} tiles in {folder} (class folders "
        f"{spec.folders[0]}..{spec.folders[-1]}) are the derived test split and {len(train.labels)} the train "
        f"split, by source slide (CRC-Prim-HE-NN in the tile name; {len(in_test)} of {len(set(groups))} slides "
        f"in test, about {TRAIN_FRACTION:.0%} to train by a stable hash), so no slide is on both sides"
        + (f"; {unnamed} tiles name no slide and are split one by one" if unnamed else "")
    )
    return [BenchmarkTask(NAME, NAME, folder, spec, test, train, split)]


FORMAT = DatasetFormat(
    name=NAME,
    title="Kather 2016 colorectal cancer texture tiles",
    source="https://zenodo.org/records/53169",
    layout="Kather_texture_2016_image_tiles_5000/ with class folders 01_TUMOR .. 08_EMPTY of .tif tiles",
    detect=detect,
    read=read,
    paper=False,
)
