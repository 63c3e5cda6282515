"""WSSS4LUAD lung adenocarcinoma patches (Han et al. 2022, arXiv:2204.06455), as downloaded.

Layout built against: the challenge release (https://wsss4luad.grand-challenge.org/; arXiv:2204.06455: 10,091
patch-level labelled training patches) as public code reads it: ``1.training/*.png`` with the patch label in the
name, ``<slide>-<x>-<y>-[tumor, stroma, normal].png`` (e.g. ``436219-7159-48057-[1, 0, 0].png``), plus
``2.validation/{img,mask}`` and ``3.testing/{img,mask}`` (pixel masks of larger regions, not used here).

Classes: tumor vs non-tumor, over all labelled training patches, as the paper's own script scores it
(PathFoundation/PathGen-1.6M ``Zero-shot_classification/clip_acc_WSSS4LUAD.py`` reads every ``.png`` of
``.../WSSS/1.training``, labels a patch tumour when the first flag of its name's vector is 1, else normal, and
prompts "An H&E image of tumor tissue." / "An H&E image of normal tissue.", which ``wsss4luad-classes.json``
holds; the key stays ``non-tumor`` because such a patch may hold stroma only). One class per patch exists only as
"holds tumour or not": over half of the patches hold two or three tissues.

Zero-shot is scored on every labelled patch of ``1.training``. There is no official patch-level split, so the
probe's is derived by slide (the name before ``-<x>-<y>``): no slide is on both sides.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import numpy as np

from tasks.benchmark.datasets import BenchmarkTask, DatasetFormat, ImageFiles, Split, class_spec, derived_probe_sides
from tasks.clip.metrics import ClassSpec

NAME = "wsss4luad"
TRAINING = "1.training"
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
    everything = Split(ImageFiles(tuple(paths)), np.asarray(labels, dtype=np.int64), "all labelled patches")
    train, probe_test, probe = derived_probe_sides(everything, slides, NAME, "patches", "slide")
    split = (
        f"no official patch-level split; zero-shot on all {len(paths)} labelled patches in {folder / TRAINING}, as "
        f"the paper's clip_acc_WSSS4LUAD.py (tumor when the name's [tumor, stroma, normal] has tumor, else "
        f"non-tumor); {probe}"
    )
    if unlabelled:
        split += f"; {len(unlabelled)} .png files without a label in the name left out (e.g. {unlabelled[0]})"
    return [BenchmarkTask(NAME, NAME, folder, spec, everything, train, split, probe_test)]


FORMAT = DatasetFormat(
    name=NAME,
    title="WSSS4LUAD lung adenocarcinoma patches (tumor vs non-tumor)",
    source="https://wsss4luad.grand-challenge.org/",
    layout="1.training/<slide>-<x>-<y>-[tumor, stroma, normal].png (+ 2.validation/, 3.testing/)",
    detect=detect,
    read=read,
    paper=True,
)
