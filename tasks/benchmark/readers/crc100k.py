"""CRC-100K (Kather et al. 2018): 224 x 224 px colorectal patches, nine tissue classes, in class folders.

Layout built against (the Zenodo record 1214456, as described in kaiko-ai/eva ``docs/datasets/crc.md``): the zips
``NCT-CRC-HE-100K.zip`` (100,000 patches of 86 slides), ``NCT-CRC-HE-100K-NONORM.zip`` (the same without Macenko
colour normalisation, not used) and ``CRC-VAL-HE-7K.zip`` (7,180 patches of 50 other patients) each unpack to a
folder of that name holding ``ADI BACK DEB LYM MUC MUS NORM STR TUM/`` with ``.tif`` patches.

Zero-shot is scored on NCT-CRC-HE-100K, as the paper's own script does (PathFoundation/PathGen-1.6M
``Zero-shot_classification/clip_acc_crc.py`` walks ``.../crc/NCT-CRC-HE-100K`` for every ``.tif``; its prompt
"An H&E patch of {}" and class names are in ``crc100k-classes.json``). The linear probe trains on NCT-CRC-HE-100K
and is scored on CRC-VAL-HE-7K (``probe_test``), the official held-out patients; without CRC-VAL-HE-7K beside it
there is no probe (it would test on what it trained on).

The dataset folder is the one the zips were unpacked into, when it holds nothing else, or else ``NCT-CRC-HE-100K``
itself (CRC-VAL-HE-7K is then looked for beside it), so a root holding other datasets too is never taken for this
one and the two sets are never found as two datasets.
"""

from __future__ import annotations

from pathlib import Path

from tasks.benchmark.datasets import BenchmarkTask, DatasetFormat, class_spec, folder_split

NAME = "crc100k"
ZERO_SHOT = "NCT-CRC-HE-100K"  # the set the paper's zero-shot scores; also the probe's training set
PROBE_TEST = "CRC-VAL-HE-7K"
CLASSES = ("ADI", "BACK", "DEB", "LYM", "MUC", "MUS", "NORM", "STR", "TUM")
OWN_FOLDERS = frozenset({ZERO_SHOT, PROBE_TEST, "NCT-CRC-HE-100K-NONORM", "__MACOSX"})


def _is_zero_shot_folder(folder: Path) -> bool:
    return folder.name == ZERO_SHOT and all((folder / c).is_dir() for c in CLASSES)


def detect(folder: Path) -> bool:
    if _is_zero_shot_folder(folder):
        return True
    if not _is_zero_shot_folder(folder / ZERO_SHOT):
        return False
    subfolders = {p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")}
    return subfolders <= OWN_FOLDERS


def read(folder: Path) -> list[BenchmarkTask]:
    folder = Path(folder)
    zero_shot_dir = folder if folder.name == ZERO_SHOT else folder / ZERO_SHOT
    if not zero_shot_dir.is_dir():
        raise ValueError(
            f"{folder} holds no {ZERO_SHOT}/, the set the paper scores CRC-100K zero-shot on; download "
            f"{ZERO_SHOT}.zip from {FORMAT.source} (CRC-VAL-HE-7K alone can be scored with `pathgen evaluate "
            "--dataset CRC-VAL-HE-7K --classes tasks/clip/data/crc100k-classes.json`)"
        )
    spec = class_spec(NAME)
    test = folder_split(zero_shot_dir, spec, ZERO_SHOT)
    held_out = zero_shot_dir.parent / PROBE_TEST
    probe_test = folder_split(held_out, spec, PROBE_TEST) if held_out.is_dir() else None
    split = f"zero-shot on all of {ZERO_SHOT}/ ({len(test.labels)} patches), as the paper's clip_acc_crc.py; " + (
        f"the probe trains on {ZERO_SHOT}/ and is scored on the official held-out {PROBE_TEST}/ "
        f"({len(probe_test.labels)})"
        if probe_test is not None
        else f"no probe: {PROBE_TEST}/ not found beside {ZERO_SHOT}/"
    )
    train = test if probe_test is not None else None  # one Split: its images need embedding only once
    return [BenchmarkTask(NAME, NAME, folder, spec, test, train, split, probe_test)]


FORMAT = DatasetFormat(
    name=NAME,
    title="CRC-100K (NCT-CRC-HE-100K / CRC-VAL-HE-7K)",
    source="https://zenodo.org/records/1214456 (NCT-CRC-HE-100K.zip and CRC-VAL-HE-7K.zip)",
    layout=f"{ZERO_SHOT}/ (and {PROBE_TEST}/), each with {' '.join(CLASSES)}/ of .tif patches",
    detect=detect,
    read=read,
    paper=True,
)
