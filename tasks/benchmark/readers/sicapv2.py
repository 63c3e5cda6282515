"""SICAPv2 (Silva-Rodriguez et al. 2020): 512 x 512 px prostate biopsy patches graded non-cancerous or Gleason 3/4/5.

Layout built against (the Mendeley Data record 9xxm58dvs3, ``SICAPv2.zip``; its folder as listed by the few-shot
readers that load ``partition/Test/{Train,Test}.xlsx`` with pandas, e.g. the ``SicapV2`` dataset classes found
with the code search): ``SICAPv2/images/*.jpg``, ``masks/``, ``partition/Test/{Train,Test}.xlsx`` (the official
patient-level split), ``partition/Validation/Val{1..4}/`` (cross-validation folds, not used) and
``wsi_labels.xlsx``. Each partition sheet has the columns ``image_name``, ``NC``, ``G3``, ``G4``, ``G5`` (one-hot,
the patch's grade) and ``G4C`` (cribriform, a subset of G4, not a class here).

Zero-shot is scored on ``partition/Test/Train.xlsx``, as the paper's own script does (PathFoundation/PathGen-1.6M
``Zero-shot_classification/clip_acc_SICAP_v2.py`` reads that sheet, drops ``G4C`` and keeps the rows with exactly
one of NC, G3, G4, G5; its prompt "An H&E image of {}" and its grade descriptions are in ``sicapv2-classes.json``).
The linear probe trains on the same sheet and is scored on the official held-out ``Test.xlsx`` (``probe_test``).
A row with no single grade, or whose image is not in ``images/``, is left out and counted in the split sentence.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from tasks.benchmark.datasets import BenchmarkTask, DatasetFormat, ImageFiles, Split, class_spec

NAME = "sicapv2"
PARTITION = Path("partition") / "Test"
NAME_COLUMN = "image_name"


def detect(folder: Path) -> bool:
    return (folder / "images").is_dir() and (folder / PARTITION / "Train.xlsx").is_file()


def _rows(sheet: Path) -> list[dict[str, object]]:
    from openpyxl import load_workbook

    try:
        book = load_workbook(sheet, read_only=True, data_only=True)
    except Exception as exc:  # openpyxl raises zipfile, KeyError and XML errors alike for a broken file
        raise ValueError(f"{sheet} cannot be read as an .xlsx spreadsheet ({exc}); download SICAPv2 again") from None
    try:
        rows = list(book.worksheets[0].iter_rows(values_only=True))
    finally:
        book.close()
    header = [str(h).strip() if h is not None else "" for h in (rows[0] if rows else ())]
    return [dict(zip(header, row, strict=False)) for row in rows[1:] if any(v is not None for v in row)]


def _grade(row: dict[str, object], grades: list[str]) -> int | None:
    """The index of the one grade column that is 1, else None."""
    try:
        hot = [i for i, g in enumerate(grades) if float(row.get(g) or 0) == 1.0]
    except (TypeError, ValueError):
        return None
    return hot[0] if len(hot) == 1 else None


def _split(folder: Path, sheet_name: str, grades: list[str], skipped: Counter[str]) -> Split:
    sheet = folder / PARTITION / sheet_name
    if not sheet.is_file():
        raise ValueError(f"SICAPv2 partition {sheet} is missing; download SICAPv2 again from {FORMAT.source}")
    rows = _rows(sheet)
    if not rows:
        raise ValueError(f"{sheet} lists no patches; download SICAPv2 again from {FORMAT.source}")
    missing = [c for c in (NAME_COLUMN, *grades) if c not in rows[0]]
    if missing:
        raise ValueError(f"{sheet} lacks the columns {', '.join(missing)}; SICAPv2 sheets have {NAME_COLUMN}, NC..G5")
    paths, labels = [], []
    for row in rows:
        image, grade = folder / "images" / str(row[NAME_COLUMN]).strip(), _grade(row, grades)
        if grade is None:
            skipped[f"{sheet_name} rows without a single grade"] += 1
        elif not image.is_file():
            skipped[f"{sheet_name} rows whose image is not in images/"] += 1
        else:
            paths.append(image)
            labels.append(grade)
    split = f"{PARTITION.as_posix()}/{sheet_name}"  # the sheet, not "train"/"test": zero-shot scores Train.xlsx
    return Split(ImageFiles(tuple(paths)), np.asarray(labels, dtype=np.int64), split)


def read(folder: Path) -> list[BenchmarkTask]:
    folder = Path(folder)
    spec = class_spec(NAME)
    skipped: Counter[str] = Counter()
    test = _split(folder, "Train.xlsx", spec.folders, skipped)
    split = (
        f"zero-shot on {PARTITION}/Train.xlsx ({len(test.labels)} single-grade patches), as the paper's "
        f"clip_acc_SICAP_v2.py; "
    )
    try:
        probe_test: Split | None = _split(folder, "Test.xlsx", spec.folders, skipped)
    except ValueError as exc:  # the probe's side only: zero-shot needs Train.xlsx alone
        probe_test = None
        split += f"no probe: {exc}"
    else:
        split += (
            f"the probe trains on the same sheet and is scored on the official patient-level "
            f"{PARTITION}/Test.xlsx ({len(probe_test.labels)})"
        )
    left_out = "; ".join(f"{n} {why}" for why, n in sorted(skipped.items()))
    split += f"; left out: {left_out}" if left_out else ""
    # train is test, one Split: its images need embedding only once
    train = test if probe_test is not None else None
    return [BenchmarkTask(NAME, NAME, folder, spec, test, train, split, probe_test)]


FORMAT = DatasetFormat(
    name=NAME,
    title="SICAPv2 (prostate Gleason grades)",
    source="https://data.mendeley.com/datasets/9xxm58dvs3 (SICAPv2.zip)",
    layout="images/*.jpg and partition/Test/{Train,Test}.xlsx (image_name, NC, G3, G4, G5)",
    detect=detect,
    read=read,
    paper=True,
)
