"""WSSS4LUAD lung adenocarcinoma patches (Han et al. 2022, arXiv:2204.06455), as downloaded.

Layout built against: the challenge release (https://wsss4luad.grand-challenge.org/; arXiv:2204.06455: 10,091
patch-level labelled training patches) as public code reads it: ``1.training/*.png`` with the patch label in the
name, ``<slide>-<x>-<y>-[tumor, stroma, normal].png`` (e.g. ``436219-7159-48057-[1, 0, 0].png``), plus
``2.validation/{img,mask}`` and ``3.testing/{img,mask}`` (pixel masks of larger regions, not used here).

Classes: tumor vs non-tumor, over all labelled training patches. Why not the three tissue classes: a patch's label
is a multi-label vector and over half of the patches hold two or three tissues (public code counts 4,693
single-label patches of the 10,091), so one class per patch exists only as "holds tumor or not"; the zero-shot
scripts of the paper's own group (code search: ``.../clip_zeroshot_cls/WSSS/1.training`` with the prompts "An H&E
image of tumor tissue." / "An H&E image of normal tissue.", label tumor when the first flag is 1, else normal) score
exactly this, on every training patch.

No official patch-level test split: the split is derived by slide (the name before ``-<x>-<y>``), so no slide is on
both sides; zero-shot is scored on the derived test part.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import numpy as np

from tasks.benchmark.datasets import BenchmarkTask, DatasetFormat, ImageFiles, Split, class_spec, derived_split
from tasks.clip.metrics import ClassSpec

NAME = "wsss4luad"
TRAINING = "1.training"
TRAIN_FRACTION = 0.3  # of the slides; the larger part stays for zero-shot, which is what the benchmark reports
LABELLED = re.compile(r"^(?P<stem>.+?)-?\[\s*(?P<tumor>[01])\s*,\s*(?P<stroma>[01])\s*,\s*(?P<normal>[01])\s*\]$")
POSITION = re.compile(r"-\d+-\d+$")  # the -<x>-<y> after the slide in a patch name


@functools.cache
def _classes() -> ClassSpec:
    return class_spec(NAME)


def detect(folder: Path) -> bool:
    return (Path(folder) / TRAINING).is_dir()


def _slide(stem: str) -> str:
    return POSITION.sub("", stem) or stem


def _patches(training: Path) -> tuple[list[Path], list[int], list[str], list[str]]:
    """Labelled patches (path, label, slide) and the names of .png files that carry no label."""
    tumor, non_tumor = (_classes().folders.index(key) for key in ("tumor", "non-tumor"))
    paths, labels, slides, unlabelled = [], [], [], []
    for path in sorted(training.glob("*.png")):
        found = LABELLED.match(path.stem)
        if found is None or found["tumor"] + found["stroma"] + found["normal"] == "000":
            unlabelled.append(path.name)
            continue
        paths.append(path)
        labels.append(tumor if found["tumor"] == "1" else non_tumor)
        slides.append(_slide(found["stem"]))
    return paths, labels, slides, unlabelled


def read(folder: Path) -> list[BenchmarkTask]:
    folder = Path(folder)
    spec = _classes()
    paths, labels, slides, unlabelled = _patches(folder / TRAINING)
    if not paths:
        raise ValueError(
            f"{folder / TRAINING} holds no patch named <slide>-<x>-<y>-[tumor, stroma, normal].png "
            f"({len(unlabelled)} other .png files); give the WSSS4LUAD folder with the challenge's 1.training/"
        )
    everything = Split(ImageFiles(tuple(paths)), np.asarray(labels, dtype=np.int64), "all")
    train, test = derived_split(everything, slides, TRAIN_FRACTION, NAME)
    slide_of = {str(path): slide for path, slide in zip(paths, slides, strict=True)}
    in_test = {slide_of[test.images.name(i)] for i in range(len(test.labels))}
    split = (
        f"no official patch-level test split: {len(test.labels)} of the {len(paths)} labelled patches in "
        f"{folder / TRAINING} are the derived test split and {len(train.labels)} the train split, by slide "
        f"({len(in_test)} of {len(set(slides))} slides in test, about {TRAIN_FRACTION:.0%} to train by a stable "
        "hash), so no slide is on both sides; label tumor when the name's [tumor, stroma, normal] has tumor, "
        "else non-tumor"
    )
    if unlabelled:
        split += f"; {len(unlabelled)} .png files without a label in the name left out (e.g. {unlabelled[0]})"
    return [BenchmarkTask(NAME, NAME, folder, spec, test, train, split)]


FORMAT = DatasetFormat(
    name=NAME,
    title="WSSS4LUAD lung adenocarcinoma patches (tumor vs non-tumor)",
    source="https://wsss4luad.grand-challenge.org/",
    layout="1.training/<slide>-<x>-<y>-[tumor, stroma, normal].png (+ 2.validation/, 3.testing/)",
    detect=detect,
    read=read,
    paper=True,
)
