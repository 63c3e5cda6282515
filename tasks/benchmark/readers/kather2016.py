"""Kather et al. 2016 colorectal cancer texture tiles, as downloaded (not one of the paper's datasets).

Layout built against: zenodo record 53169 (https://zenodo.org/records/53169), the unpacked
``Kather_texture_2016_image_tiles_5000.zip``: one folder per class, ``01_TUMOR 02_STROMA 03_COMPLEX 04_LYMPHO
05_DEBRIS 06_MUCOSA 07_ADIPOSE 08_EMPTY``, 150x150 px ``.tif`` tiles inside, each tile named after the image it was
cut from, e.g. ``1A11_CRC-Prim-HE-07_022.tif_Row_601_Col_151.tif`` (slide CRC-Prim-HE-07, region 022). The shared
sample ``../shared/data/patches/kather2016-samples`` has the same layout. The class keys are those of
``tasks/clip/data/kather2016-classes.json``.

There is no official split. As for the paper's datasets without one (the authors' scripts score every labelled
image: LC25000, WSSS4LUAD, Osteo), zero-shot is scored on every tile, and the linear probe's split is derived.
Tiles of one slide share staining and patient, so it is by slide (``CRC-Prim-HE-NN`` in the name; a tile whose
name carries none is its own group, and the count is said).
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

from tasks.benchmark.datasets import BenchmarkTask, DatasetFormat, ImageFiles, Split, class_spec, derived_probe_sides
from tasks.clip.metrics import ClassSpec, load_labelled_images

NAME = "kather2016"
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
    everything = Split(ImageFiles(tuple(tiles.paths)), tiles.labels, "all tiles")
    train, probe_test, probe = derived_probe_sides(
        everything, groups, NAME, "tiles", "slide", "source slide: CRC-Prim-HE-NN in the tile name"
    )
    unnamed = slides.count(None)
    split = (
        f"no official split; zero-shot on all {len(tiles.paths)} tiles in {folder} (class folders "
        f"{spec.folders[0]}..{spec.folders[-1]}); {probe}"
        + (f"; {unnamed} tiles name no slide and are split one by one" if unnamed else "")
    )
    return [BenchmarkTask(NAME, NAME, folder, spec, everything, train, split, probe_test)]


FORMAT = DatasetFormat(
    name=NAME,
    title="Kather 2016 colorectal cancer texture tiles",
    source="https://zenodo.org/records/53169",
    layout="Kather_texture_2016_image_tiles_5000/ with class folders 01_TUMOR .. 08_EMPTY of .tif tiles",
    detect=detect,
    read=read,
    paper=False,
)
