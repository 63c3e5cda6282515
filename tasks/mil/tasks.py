"""Whole-slide task files: which slide has which label, and on which side of the paper's splits it falls.

A task is a CSV in CLAM's convention: ``slide_id`` and ``label`` columns, optional ``case_id`` (the patient; a slide
is its own case when absent) and ``split`` (``train``/``val``/``test``). ``read_task`` refuses a file that would train
on a wrong or leaking split, naming the file, the line and the fix; ``write_task`` writes rows atomically.

The builders read each benchmark's OFFICIAL download layout (nothing is opened but the label files; the slides are
only listed) and apply the PathGen-CLIP paper's protocol:

``build_camelyon16(root)``: ``root`` is the ``CAMELYON16`` folder (or the folder holding it)::

    training/normal/normal_001.tif ...      160 slides, label "normal"
    training/tumor/tumor_001.tif ...        110 slides, label "tumor"
    testing/images/test_001.tif ...         130 slides, labels from testing/reference.csv
    testing/reference.csv                   no header; rows "test_001,Tumor,Macro,Primary" / "test_003,Normal,,"

  The 270 training slides are split train/val 9:1 (243/27), the 130 test slides are the test set. One slide is one
  case (the data set publishes no patient identifiers). Sources: the CAMELYON16 tree documented by kaiko-ai/eva
  (docs/datasets/camelyon16.md, from https://camelyon17.grand-challenge.org/Data/) and CLAM's
  processing script reading ``CAMELYON16/testing/reference.csv`` (github.com/ralphc1212/CLAM).

``build_camelyon17(root)``: ``root`` is the ``CAMELYON17`` folder (or the folder holding it)::

    training/center_0/patient_000_node_0.tif ... training/center_4/patient_099_node_4.tif   (500 slides)
    training/stage_labels.csv               header "patient,stage"; one row per node slide
                                            ("patient_000_node_0.tif,negative|itc|micro|macro") and one per
                                            patient ("patient_000.zip,pN0"; the patient rows are not slide labels)

  The 100 labelled slides of centers 3 and 4 each (the fourth and fifth hospitals, 200 slides) are the test set;
  the other 300 are split train/val 9:1 BY PATIENT (54/6 patients, 270/30 slides), so a patient's five nodes stay
  on one side. The unlabelled ``testing/`` slides are not used. Label schemes (``scheme``): ``"binary"`` (default):
  ``negative`` (negative or itc) against ``metastasis`` (micro or macro), as CLAM did following the challenge's
  rule that "lymph nodes containing only ITC are not counted as positive" (mahmoodlab/CLAM issue #52,
  https://camelyon17.grand-challenge.org/Evaluation/); ``"any_tumor"``: itc counted as metastasis too; ``"stage"``:
  the four node classes. Sources: https://camelyon17.grand-challenge.org/Data/ (5 centers, 100 training patients
  of 5 nodes), the stage_labels.csv rows as quoted by public loaders reading
  ``CAMELYON17/training/stage_labels.csv``, and ``training/center_N/patient_XXX_node_Y.tif`` paths in public code.

``build_bracs(root)``: ``root`` is the ``BRACS_WSI`` folder (or the folder holding it)::

    {train,val,test}/Group_{BT,AT,MT}/Type_{N,PB,UDH | FEA,ADH | DCIS,IC}/BRACS_<id>.svs   (395/65/87 slides)

  The official split is kept as is (no seed). Labels are the seven subtypes (``classes="subtype"``) or the three
  groups BT/AT/MT (``classes="group"``). ``.qpdata`` annotation files beside the slides are ignored. A slide is
  its own case: patient identifiers live only in BRACS.xlsx, which is not read (a public loader reports one patient
  straddling the official train/val split there). Sources: https://www.bracs.icar.cnr.it/details/ (the groups,
  types and per-split counts) and public code listing ``BRACS_WSI/<split>/Group_<G>/Type_<T>/BRACS_<id>.svs``.

Splits are deterministic: cases are ordered by a hash of (seed, case id) within each label stratum, so the same
root and seed give a byte-identical file on any machine.
"""

from __future__ import annotations

import csv
import hashlib
import io
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

from tasks.files import write_atomic

SPLITS = ("train", "val", "test")
COLUMNS = ("case_id", "slide_id", "label", "split")
REQUIRED_COLUMNS = ("slide_id", "label")
DEFAULT_VAL_FRACTION = 0.1

CAMELYON17_TEST_CENTERS = (3, 4)
CAMELYON17_SCHEMES: dict[str, dict[str, str]] = {
    "binary": {"negative": "negative", "itc": "negative", "micro": "metastasis", "macro": "metastasis"},
    "any_tumor": {"negative": "negative", "itc": "metastasis", "micro": "metastasis", "macro": "metastasis"},
    "stage": {"negative": "negative", "itc": "itc", "micro": "micro", "macro": "macro"},
}
BRACS_GROUPS = {"N": "BT", "PB": "BT", "UDH": "BT", "FEA": "AT", "ADH": "AT", "DCIS": "MT", "IC": "MT"}
_BRACS_SPLIT_FOLDERS = {"train": "train", "training": "train", "val": "val", "validation": "val"}
_BRACS_SPLIT_FOLDERS |= {"test": "test", "testing": "test"}


class TaskError(ValueError):
    """A task file or a data set's label file is wrong; the message names the file, the line and the fix."""


@dataclass(frozen=True, order=True)
class TaskRow:
    slide_id: str
    label: str
    case_id: str
    split: str = ""
    line: int | None = field(default=None, compare=False)  # where the row was read, for errors found later


@dataclass(frozen=True)
class Task:
    path: Path
    rows: tuple[TaskRow, ...]

    @property
    def labels(self) -> list[str]:
        return sorted({row.label for row in self.rows})

    def split(self, name: str) -> list[TaskRow]:
        return [row for row in self.rows if row.split == name]


# ---------------------------------------------------------------------------------------------- reading, writing


def read_task(path: str | Path, labels: Collection[str] | None = None) -> Task:
    """The validated task at ``path``; ``labels``, when given, is the set a label must belong to."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise TaskError(f"{path}: no such task file; build one with `pathgen mil-task` or fix the path") from None
    except UnicodeDecodeError as exc:
        raise TaskError(f"{path}: not a UTF-8 CSV ({exc.reason}); save it as UTF-8 CSV") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    _check_header(path, reader.fieldnames)
    rows = [_parse_row(path, reader.line_num, record, labels) for record in reader]
    if not rows:
        raise TaskError(f"{path}: the task has a header but no slides; add one row per slide")
    check_rows(rows, path)
    return Task(path, tuple(rows))


def _check_header(path: Path, header: Sequence[str] | None) -> None:
    if not header:
        raise TaskError(f"{path}: empty file; a task needs the header `slide_id,label` (optional case_id, split)")
    names = [name.strip() for name in header]
    if missing := [name for name in REQUIRED_COLUMNS if name not in names]:
        raise TaskError(
            f"{path}, line 1: header {','.join(names)!r} lacks {', '.join(missing)}; "
            "a task needs the columns slide_id,label (optional case_id, split)"
        )
    if unknown := [name for name in names if name not in COLUMNS]:
        raise TaskError(
            f"{path}, line 1: unknown column(s) {', '.join(map(repr, unknown))}; "
            f"the columns are {', '.join(COLUMNS)}: rename or drop the others"
        )
    if duplicated := sorted(name for name, count in Counter(names).items() if count > 1):
        raise TaskError(f"{path}, line 1: column(s) {', '.join(duplicated)} appear twice; keep one of each")


def _parse_row(path: Path, line: int, record: dict, labels: Collection[str] | None) -> TaskRow:
    where = f"{path}, line {line}"
    if None in record:
        raise TaskError(f"{where}: more fields than the header has columns; quote a value holding a comma")
    if any(value is None for value in record.values()):
        raise TaskError(f"{where}: fewer fields than the header has columns; give every column a value")
    values = {key.strip(): value.strip() for key, value in record.items()}
    slide_id, label = values["slide_id"], values["label"]
    if not slide_id:
        raise TaskError(f"{where}: empty slide_id; give the slide's id (its file name without extension)")
    if not label:
        raise TaskError(f"{where}: slide {slide_id!r} has an empty label; label it or drop the row")
    if labels is not None and label not in labels:
        known = ", ".join(sorted(labels))
        raise TaskError(f"{where}: slide {slide_id!r} has the unknown label {label!r}; the labels are {known}")
    split = values.get("split", "")
    if "split" in values and split not in SPLITS:
        raise TaskError(f"{where}: slide {slide_id!r} has the split {split!r}; a split is one of train, val, test")
    case_id = values.get("case_id", slide_id)
    if "case_id" in values and not case_id:
        raise TaskError(f"{where}: slide {slide_id!r} has an empty case_id; give its patient (or its slide id)")
    return TaskRow(slide_id, label, case_id, split, line)


def check_rows(rows: Sequence[TaskRow], source: str | Path) -> None:
    """Refuse a slide listed twice and a case on two splits (a patient on both sides leaks into the test)."""
    first_line: dict[str, int | None] = {}
    case_split: dict[str, TaskRow] = {}
    for row in rows:
        where = f"{source}, line {row.line}" if row.line else f"{source}"
        if row.slide_id in first_line:
            raise TaskError(
                f"{where}: slide {row.slide_id!r} is listed again "
                f"(first at line {first_line[row.slide_id]}); keep one row per slide"
            )
        first_line[row.slide_id] = row.line
        seen = case_split.setdefault(row.case_id, row)
        if seen.split != row.split:
            raise TaskError(
                f"{where}: case {row.case_id!r} is on the {row.split or 'unset'!r} split but its "
                f"slide {seen.slide_id!r} (line {seen.line}) is on {seen.split or 'unset'!r}; "
                "put all slides of a case on one split"
            )


def require_slides(task: Task, known: Collection[str], what: str = "features") -> None:
    """Refuse a task naming slides absent from ``known`` (e.g. the slides that have features), naming the rows."""
    missing = [row for row in task.rows if row.slide_id not in known]
    if missing:
        shown = "; ".join(f"line {row.line}: {row.slide_id!r}" for row in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise TaskError(
            f"{task.path}: {len(missing)} slide(s) have no {what}: {shown}{more}; compute their {what} or drop the rows"
        )


def write_task(rows: Iterable[TaskRow], out: str | Path) -> Path:
    """Write ``rows`` to ``out`` (sorted by split then slide): a temporary file renamed over it, never half a file."""
    out = Path(out)
    ordered = sorted(rows, key=lambda row: (_split_rank(row.split), row.slide_id))
    # numbered as they will stand in the file (the header is line 1), so an error points into it
    check_rows([_with_line(row, number) for number, row in enumerate(ordered, start=2)], out)

    def write(partial: Path) -> None:
        with open(partial, "w", encoding="utf-8", newline="") as stream:
            writer = csv.writer(stream, lineterminator="\n")
            writer.writerow(COLUMNS)
            writer.writerows((row.case_id, row.slide_id, row.label, row.split) for row in ordered)

    write_atomic(out, write)
    return out


def _split_rank(split: str) -> int:
    return SPLITS.index(split) if split in SPLITS else len(SPLITS)


def split_counts(rows: Iterable[TaskRow]) -> dict[str, int]:
    counts = Counter(row.split for row in rows)
    return {name: counts[name] for name in sorted(counts, key=_split_rank)}


# ---------------------------------------------------------------------------------------------- splitting


def assign_val(
    rows: Sequence[TaskRow],
    seed: int = 0,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    label_order: Sequence[str] | None = None,
) -> list[TaskRow]:
    """Split training ``rows`` into train/val by case, stratified by the case's label.

    ``round(cases * val_fraction)`` cases (halves rounded up; at least one when there are two cases) go to val,
    shared among the label strata by largest remainder. A case's stratum is its most severe label in
    ``label_order`` (default: alphabetical). Within a stratum, cases are ordered by sha256(seed, case id).
    """
    cases: dict[str, list[TaskRow]] = defaultdict(list)
    for row in rows:
        cases[row.case_id].append(row)
    order = list(label_order) if label_order is not None else sorted({row.label for row in rows})
    strata: dict[str, list[str]] = defaultdict(list)
    for case_id, case_rows in cases.items():
        strata[max((row.label for row in case_rows), key=order.index)].append(case_id)
    quotas = _quotas({label: len(ids) for label, ids in strata.items()}, _val_total(len(cases), val_fraction))
    val_cases: set[str] = set()
    for label, ids in strata.items():
        ranked = sorted(ids, key=lambda case_id: _case_rank(seed, case_id))
        val_cases.update(ranked[: quotas[label]])
    return [_with_split(row, "val" if row.case_id in val_cases else "train") for row in rows]


def _val_total(cases: int, val_fraction: float) -> int:
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    exact = Fraction(str(val_fraction)) * cases
    total = int(exact + Fraction(1, 2))  # round half up, the same on every platform
    return max(total, 1) if cases >= 2 and val_fraction > 0 else total


def _quotas(sizes: dict[str, int], total: int) -> dict[str, int]:
    whole = sum(sizes.values())
    exact = {label: Fraction(total * size, whole) for label, size in sizes.items()}
    quotas = {label: int(share) for label, share in exact.items()}
    by_remainder = sorted(sizes, key=lambda label: (-(exact[label] - quotas[label]), -sizes[label], label))
    for label in by_remainder[: total - sum(quotas.values())]:
        quotas[label] += 1
    return quotas


def _case_rank(seed: int, case_id: str) -> str:
    return hashlib.sha256(f"{seed}\0{case_id}".encode()).hexdigest()


def _with_split(row: TaskRow, split: str) -> TaskRow:
    return TaskRow(row.slide_id, row.label, row.case_id, split, row.line)


def _with_line(row: TaskRow, line: int) -> TaskRow:
    return TaskRow(row.slide_id, row.label, row.case_id, row.split, line)


# ---------------------------------------------------------------------------------------------- CAMELYON16


def build_camelyon16(root: str | Path, seed: int = 0, val_fraction: float = DEFAULT_VAL_FRACTION) -> list[TaskRow]:
    """The CAMELYON16 task: 270 official training slides split train/val 9:1, the 130 test slides as test."""
    base = _dataset_folder(Path(root), "CAMELYON16", "training")
    training = [
        TaskRow(slide_id, label, slide_id)
        for label in ("normal", "tumor")
        for slide_id in _slides(base / "training" / label, rf"{label}_\d+", ".tif")
    ]
    test = _camelyon16_test(base / "testing")
    if not training:
        raise TaskError(f"{base / 'training'}: no normal_XXX.tif or tumor_XXX.tif slides; point --root at CAMELYON16")
    return assign_val(training, seed, val_fraction, ("normal", "tumor")) + test


def _camelyon16_test(testing: Path) -> list[TaskRow]:
    slides = set(_slides(testing / "images", r"test_\d+", ".tif"))
    reference = testing / "reference.csv"
    labels = _camelyon16_reference(reference)
    if unlabelled := sorted(slides - labels.keys()):
        raise TaskError(
            f"{reference}: no row for {', '.join(unlabelled[:5])}{' ...' if len(unlabelled) > 5 else ''}; "
            "use the reference.csv shipped with the same CAMELYON16 download"
        )
    for slide_id, (_label, line) in labels.items():
        if slide_id not in slides:
            raise TaskError(
                f"{reference}, line {line}: {slide_id!r} has no slide {testing / 'images' / (slide_id + '.tif')}; "
                "restore the file or drop the row"
            )
    return [TaskRow(slide_id, label, slide_id, "test", line) for slide_id, (label, line) in sorted(labels.items())]


def _camelyon16_reference(reference: Path) -> dict[str, tuple[str, int]]:
    labels: dict[str, tuple[str, int]] = {}
    for line, fields in _csv_lines(reference):
        name = fields[0].removesuffix(".tif") if fields else ""
        if line == 1 and not re.fullmatch(r"test_\d+", name):
            continue  # a header row, which some copies carry
        if not re.fullmatch(r"test_\d+", name):
            raise TaskError(f"{reference}, line {line}: {fields[0]!r} is not a test slide name (test_XXX)")
        label = fields[1].strip().lower() if len(fields) > 1 else ""
        if label not in ("normal", "tumor"):
            raise TaskError(f"{reference}, line {line}: {name} has the class {label!r}; expected Normal or Tumor")
        if name in labels:
            raise TaskError(f"{reference}, line {line}: {name} is listed again (line {labels[name][1]})")
        labels[name] = (label, line)
    return labels


# ---------------------------------------------------------------------------------------------- CAMELYON17


def build_camelyon17(
    root: str | Path,
    seed: int = 0,
    scheme: str = "binary",
    val_fraction: float = DEFAULT_VAL_FRACTION,
    test_centers: Collection[int] = CAMELYON17_TEST_CENTERS,
) -> list[TaskRow]:
    """The CAMELYON17 task: the 500 labelled node slides; centers 3 and 4 test, the rest train/val 9:1 by patient."""
    if scheme not in CAMELYON17_SCHEMES:
        raise ValueError(f"unknown CAMELYON17 scheme {scheme!r}; choose one of {', '.join(CAMELYON17_SCHEMES)}")
    base = _dataset_folder(Path(root), "CAMELYON17", "training")
    centers = _camelyon17_centers(base / "training")
    stages_file = _camelyon17_stage_file(base)
    stages = _camelyon17_stages(stages_file)
    if unlabelled := sorted(centers.keys() - stages.keys()):
        raise TaskError(f"{stages_file}: no stage for slide(s) {', '.join(unlabelled[:5])}; use the matching file")
    mapping = CAMELYON17_SCHEMES[scheme]
    rows, test = [], []
    for slide_id, (stage, line) in sorted(stages.items()):
        if slide_id not in centers:
            raise TaskError(
                f"{stages_file}, line {line}: slide {slide_id!r} is not under training/center_N/; "
                "restore the slide or drop the row"
            )
        row = TaskRow(slide_id, mapping[stage], slide_id.rsplit("_node_", 1)[0], "", line)
        (test if centers[slide_id] in test_centers else rows).append(row)
    order = list(dict.fromkeys(mapping.values()))
    return assign_val(rows, seed, val_fraction, order) + [_with_split(row, "test") for row in test]


def _camelyon17_centers(training: Path) -> dict[str, int]:
    centers: dict[str, int] = {}
    patients: dict[str, int] = {}
    folders = sorted(path for path in training.glob("center_*") if path.is_dir()) if training.is_dir() else []
    if not folders:
        raise TaskError(f"{training}: no center_N folders; point --root at the CAMELYON17 download")
    for folder in folders:
        if not re.fullmatch(r"center_\d+", folder.name):
            raise TaskError(f"{folder}: not a center folder (center_0 ... center_4); rename or move it")
        center = int(folder.name.removeprefix("center_"))
        for slide_id in _slides(folder, r"patient_\d+_node_\d+", ".tif"):
            patient = slide_id.rsplit("_node_", 1)[0]
            if patients.setdefault(patient, center) != center:
                raise TaskError(f"{folder / slide_id}.tif: {patient} also has slides in center_{patients[patient]}")
            centers[slide_id] = center
    return centers


def _camelyon17_stage_file(base: Path) -> Path:
    candidates = [base / "training" / "stage_labels.csv", base / "stage_labels.csv", base / "training" / "stages.csv"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    tried = ", ".join(str(path) for path in candidates)
    raise TaskError(f"no CAMELYON17 stage file (tried {tried}); put the official stage_labels.csv in training/")


def _camelyon17_stages(path: Path) -> dict[str, tuple[str, int]]:
    stages: dict[str, tuple[str, int]] = {}
    for line, fields in _csv_lines(path):
        name = fields[0].strip() if fields else ""
        if line == 1 and name.lower() == "patient":
            continue
        if re.fullmatch(r"patient_\d+\.zip", name):
            continue  # a patient's pN stage, not a slide label
        match = re.fullmatch(r"(patient_\d+_node_\d+)\.tif", name)
        if not match:
            raise TaskError(f"{path}, line {line}: {name!r} is neither patient_XXX_node_Y.tif nor patient_XXX.zip")
        stage = fields[1].strip().lower() if len(fields) > 1 else ""
        if stage not in CAMELYON17_SCHEMES["stage"]:
            raise TaskError(
                f"{path}, line {line}: {name} has the stage {stage!r}; expected negative, itc, micro or macro"
            )
        if match[1] in stages:
            raise TaskError(f"{path}, line {line}: {name} is listed again (line {stages[match[1]][1]})")
        stages[match[1]] = (stage, line)
    return stages


# ---------------------------------------------------------------------------------------------- BRACS


def build_bracs(root: str | Path, classes: str = "subtype") -> list[TaskRow]:
    """The BRACS task: its official 395/65/87 split, seven subtypes (or the three groups with classes="group")."""
    if classes not in ("subtype", "group"):
        raise ValueError(f"unknown BRACS classes {classes!r}; choose subtype or group")
    base = Path(root) / "BRACS_WSI" if (Path(root) / "BRACS_WSI").is_dir() else Path(root)
    if not base.is_dir():
        raise TaskError(f"{base}: missing; point --root at the BRACS_WSI folder of the official download")
    rows: list[TaskRow] = []
    seen: dict[str, Path] = {}
    for split_folder in sorted(path for path in base.iterdir() if path.is_dir()):
        split = _BRACS_SPLIT_FOLDERS.get(split_folder.name.lower())
        if split is None:
            continue  # e.g. BRACS_RoI beside the WSI folders
        for path, subtype in _bracs_slides(split_folder):
            if path.stem in seen:
                raise TaskError(f"{path}: slide {path.stem} is also at {seen[path.stem]}; keep one copy")
            seen[path.stem] = path
            label = subtype if classes == "subtype" else BRACS_GROUPS[subtype]
            rows.append(TaskRow(path.stem, label, path.stem, split))
    if not rows:
        raise TaskError(f"{base}: no BRACS_WSI/{{train,val,test}}/Group_*/Type_*/*.svs slides; point --root there")
    return sorted(rows)


def _bracs_slides(split_folder: Path) -> Iterable[tuple[Path, str]]:
    for group in sorted(path for path in split_folder.iterdir() if path.is_dir()):
        for type_folder in sorted(path for path in group.iterdir() if path.is_dir()):
            subtype = type_folder.name.removeprefix("Type_")
            if BRACS_GROUPS.get(subtype) is None or group.name != f"Group_{BRACS_GROUPS[subtype]}":
                raise TaskError(
                    f"{type_folder}: not a BRACS type of {group.name} (Group_BT: Type_N, Type_PB, Type_UDH; "
                    "Group_AT: Type_FEA, Type_ADH; Group_MT: Type_DCIS, Type_IC); move the slides to their folder"
                )
            for path in sorted(type_folder.glob("*.svs")):
                yield path, subtype


# ---------------------------------------------------------------------------------------------- shared helpers


def _dataset_folder(root: Path, name: str, marker: str) -> Path:
    """``root`` itself when it holds ``marker``, else ``root/name`` (users point at either)."""
    if (root / marker).is_dir() or not (root / name / marker).is_dir():
        return root
    return root / name


def _slides(folder: Path, pattern: str, suffix: str) -> list[str]:
    """Slide ids (file stems) in ``folder``; a slide file whose name breaks the layout's pattern is refused."""
    if not folder.is_dir():
        raise TaskError(f"{folder}: missing; the official layout has this folder (see tasks/mil/tasks.py)")
    ids = []
    for path in sorted(folder.glob(f"*{suffix}")):
        if not re.fullmatch(pattern, path.stem):
            raise TaskError(f"{path}: unexpected slide name in {folder.name}/ (expected {pattern}{suffix})")
        ids.append(path.stem)
    return ids


def _csv_lines(path: Path) -> Iterable[tuple[int, list[str]]]:
    """(line number, fields) of each non-blank line of a label file."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise TaskError(f"{path}: missing; it ships with the official download") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    for fields in reader:
        if any(value.strip() for value in fields):
            yield reader.line_num, fields


BUILDERS: dict[str, Callable[..., list[TaskRow]]] = {
    "camelyon16": build_camelyon16,
    "camelyon17": build_camelyon17,
    "bracs": build_bracs,
}
