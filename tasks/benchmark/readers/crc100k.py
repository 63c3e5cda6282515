"""CRC-100K (Kather et al. 2018): 224 x 224 px colorectal patches, nine tissue classes, in class folders.

Layout built against (the Zenodo record 1214456, as described in kaiko-ai/eva ``docs/datasets/crc.md``): the zips
``NCT-CRC-HE-100K.zip`` (100,000 patches of 86 slides, the training set), ``NCT-CRC-HE-100K-NONORM.zip`` (the same
without Macenko colour normalisation) and ``CRC-VAL-HE-7K.zip`` (7,180 patches of 50 other patients) each unpack to
a folder of that name holding ``ADI BACK DEB LYM MUC MUS NORM STR TUM/`` with ``.tif`` patches. Zero-shot is scored
on CRC-VAL-HE-7K, the set the papers report; the probe trains on NCT-CRC-HE-100K (the colour-normalised one, like
the test set; the NONORM folder only when it is the one there).

The dataset folder is the one the zips were unpacked into, when it holds nothing else, or else ``CRC-VAL-HE-7K``
itself (its training set is then looked for beside it), so a root holding other datasets too is never taken for
this one.
"""

from __future__ import annotations

from pathlib import Path

from tasks.benchmark.datasets import BenchmarkTask, DatasetFormat, class_spec, folder_split

NAME = "crc100k"
TEST = "CRC-VAL-HE-7K"
TRAINS = ("NCT-CRC-HE-100K", "NCT-CRC-HE-100K-NONORM")  # in order of preference
CLASSES = ("ADI", "BACK", "DEB", "LYM", "MUC", "MUS", "NORM", "STR", "TUM")
OWN_FOLDERS = frozenset({TEST, *TRAINS, "__MACOSX"})


def _is_test_folder(folder: Path) -> bool:
    return folder.name == TEST and all((folder / c).is_dir() for c in CLASSES)


def detect(folder: Path) -> bool:
    if _is_test_folder(folder):
        return True
    if not _is_test_folder(folder / TEST):
        return False
    subfolders = {p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")}
    return subfolders <= OWN_FOLDERS


def read(folder: Path) -> list[BenchmarkTask]:
    folder = Path(folder)
    test_dir = folder if folder.name == TEST else folder / TEST
    if not test_dir.is_dir():
        raise ValueError(f"{folder} holds no {TEST}/ (the CRC-100K test set); download it from {FORMAT.source}")
    spec = class_spec(NAME)
    test = folder_split(test_dir, spec, "test")
    train_dir = next((d for d in (test_dir.parent / n for n in TRAINS) if d.is_dir()), None)
    train = folder_split(train_dir, spec, "train") if train_dir else None
    probe = f"the probe trains on {train_dir.name}/" if train_dir else f"no probe: {' or '.join(TRAINS)}/ not found"
    split = f"official CRC-100K test set {TEST}/ ({len(test.labels)} patches); {probe}"
    return [BenchmarkTask(NAME, NAME, folder, spec, test, train, split)]


FORMAT = DatasetFormat(
    name=NAME,
    title="CRC-100K (NCT-CRC-HE-100K / CRC-VAL-HE-7K)",
    source="https://zenodo.org/records/1214456 (NCT-CRC-HE-100K.zip and CRC-VAL-HE-7K.zip)",
    layout=f"{TEST}/ and {TRAINS[0]}/, each with {' '.join(CLASSES)}/ of .tif patches",
    detect=detect,
    read=read,
    paper=True,
)
