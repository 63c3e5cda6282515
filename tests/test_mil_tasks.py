"""Task files for the whole-slide benchmarks: the official layouts, the paper's splits, and bad task files.

Each fixture mimics a data set's official download with empty placeholder slides (only names matter to the
builders) and the official counts, so the split sizes below are the protocol's: CAMELYON16 243/27/130,
CAMELYON17 270/30/200 (54/6 patients + centers 3 and 4), BRACS 395/65/87.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

from tasks.mil.tasks import (
    BRACS_GROUPS,
    Task,
    TaskError,
    TaskRow,
    assign_val,
    build_bracs,
    build_camelyon16,
    build_camelyon17,
    read_task,
    require_slides,
    split_counts,
    write_task,
)

C16_TEST_TUMORS = 49  # the official test set: 49 tumour and 81 normal slides
BRACS_COUNTS = {  # per split and type, from https://www.bracs.icar.cnr.it/details/ (Table 1)
    "train": {"N": 27, "PB": 120, "UDH": 56, "FEA": 24, "ADH": 28, "DCIS": 40, "IC": 100},
    "val": {"N": 10, "PB": 11, "UDH": 9, "FEA": 6, "ADH": 8, "DCIS": 9, "IC": 12},
    "test": {"N": 7, "PB": 16, "UDH": 9, "FEA": 11, "ADH": 12, "DCIS": 12, "IC": 20},
}


def _touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")


def _camelyon16(root: Path) -> Path:
    base = root / "CAMELYON16"
    for label, count in (("normal", 160), ("tumor", 110)):
        for number in range(1, count + 1):
            _touch(base / "training" / label / f"{label}_{number:03d}.tif")
    _touch(base / "training" / "lesion_annotations.zip")
    lines = []
    for number in range(1, 131):
        _touch(base / "testing" / "images" / f"test_{number:03d}.tif")
        tumour = number <= C16_TEST_TUMORS
        lines.append(f"test_{number:03d},Tumor,Macro,Primary" if tumour else f"test_{number:03d},Normal,,")
    (base / "testing" / "reference.csv").write_text("\n".join(lines) + "\n")
    return base


def _c17_stages(patient: int) -> list[str]:
    """Node stages of a fixture patient: all negative, one itc, one micro, or a macro and a micro."""
    kind = patient % 4
    stages = ["negative"] * 5
    if kind == 1:
        stages[0] = "itc"
    elif kind == 2:
        stages[1] = "micro"
    elif kind == 3:
        stages[2], stages[3] = "macro", "micro"
    return stages


def _camelyon17(root: Path) -> Path:
    base = root / "CAMELYON17"
    lines = ["patient,stage"]
    for patient in range(100):
        center = patient // 20
        lines.append(f"patient_{patient:03d}.zip,pN{patient % 3}")
        for node, stage in enumerate(_c17_stages(patient)):
            _touch(base / "training" / f"center_{center}" / f"patient_{patient:03d}_node_{node}.tif")
            lines.append(f"patient_{patient:03d}_node_{node}.tif,{stage}")
    _touch(base / "testing" / "patients" / "patient_100_node_0.tif")  # unlabelled: not part of the task
    (base / "training" / "stage_labels.csv").write_text("\n".join(lines) + "\n")
    return base


def _bracs(root: Path) -> Path:
    base = root / "BRACS_WSI"
    number = 1000
    for split, counts in BRACS_COUNTS.items():
        for subtype, count in counts.items():
            folder = base / split / f"Group_{BRACS_GROUPS[subtype]}" / f"Type_{subtype}"
            for _ in range(count):
                _touch(folder / f"BRACS_{number}.svs")
                number += 1
            _touch(folder / f"BRACS_{number - 1}.qpdata")  # annotations some slides carry: not slides
    return base


@pytest.fixture(scope="module")
def camelyon16(tmp_path_factory) -> Path:
    return _camelyon16(tmp_path_factory.mktemp("c16"))


@pytest.fixture(scope="module")
def camelyon17(tmp_path_factory) -> Path:
    return _camelyon17(tmp_path_factory.mktemp("c17"))


@pytest.fixture(scope="module")
def bracs(tmp_path_factory) -> Path:
    return _bracs(tmp_path_factory.mktemp("bracs"))


def _cases_by_split(rows: list[TaskRow]) -> dict[str, set[str]]:
    cases: dict[str, set[str]] = {}
    for row in rows:
        cases.setdefault(row.split, set()).add(row.case_id)
    return cases


def _assert_no_case_across_splits(rows: list[TaskRow]) -> None:
    cases = _cases_by_split(rows)
    for first in cases:
        for second in cases:
            if first < second:
                assert not cases[first] & cases[second], (first, second)


# ---------------------------------------------------------------------------------------------- builders


def test_camelyon16_official_split_and_9_to_1_validation(camelyon16):
    rows = build_camelyon16(camelyon16.parent)  # the folder holding CAMELYON16 works as well as CAMELYON16
    assert split_counts(rows) == {"train": 243, "val": 27, "test": 130}
    val_labels = Counter(row.label for row in rows if row.split == "val")
    assert val_labels == {"normal": 16, "tumor": 11}  # stratified: 27 x 160/270 and 27 x 110/270
    test = {row.slide_id: row.label for row in rows if row.split == "test"}
    assert Counter(test.values()) == {"tumor": C16_TEST_TUMORS, "normal": 130 - C16_TEST_TUMORS}
    assert test["test_001"] == "tumor" and test["test_130"] == "normal"
    assert {row.slide_id for row in rows if row.split != "test"} == {
        *(f"normal_{n:03d}" for n in range(1, 161)),
        *(f"tumor_{n:03d}" for n in range(1, 111)),
    }
    _assert_no_case_across_splits(rows)


def test_camelyon17_centers_3_and_4_test_the_rest_split_by_patient(camelyon17):
    rows = build_camelyon17(camelyon17)
    assert split_counts(rows) == {"train": 270, "val": 30, "test": 200}
    cases = _cases_by_split(rows)
    assert (len(cases["train"]), len(cases["val"]), len(cases["test"])) == (54, 6, 40)
    assert {int(case[-3:]) // 20 for case in cases["test"]} == {3, 4}
    _assert_no_case_across_splits(rows)
    labels = {row.slide_id: row.label for row in rows}
    assert labels["patient_001_node_0"] == "negative"  # itc is not a positive node (the challenge's rule)
    assert labels["patient_002_node_1"] == "metastasis"
    val_patients = {int(case[-3:]) for case in cases["val"]}
    assert any(_has_metastasis(p) for p in val_patients) and not all(_has_metastasis(p) for p in val_patients)


def _has_metastasis(patient: int) -> bool:
    return any(stage in ("micro", "macro") for stage in _c17_stages(patient))


def test_camelyon17_label_schemes(camelyon17):
    stage = {row.slide_id: row.label for row in build_camelyon17(camelyon17, scheme="stage")}
    assert set(stage.values()) == {"negative", "itc", "micro", "macro"}
    any_tumor = {row.slide_id: row.label for row in build_camelyon17(camelyon17, scheme="any_tumor")}
    assert any_tumor["patient_001_node_0"] == "metastasis"
    with pytest.raises(ValueError, match="scheme"):
        build_camelyon17(camelyon17, scheme="pN")


def test_bracs_keeps_the_official_split_with_seven_types_or_three_groups(bracs):
    rows = build_bracs(bracs.parent)
    assert split_counts(rows) == {"train": 395, "val": 65, "test": 87}
    for split, counts in BRACS_COUNTS.items():
        assert Counter(row.label for row in rows if row.split == split) == counts
    assert all(re.fullmatch(r"BRACS_\d+", row.slide_id) for row in rows)  # no .qpdata among the slides
    groups = Counter(row.label for row in build_bracs(bracs, classes="group"))
    assert groups == {"BT": 27 + 120 + 56 + 10 + 11 + 9 + 7 + 16 + 9, "AT": 24 + 28 + 6 + 8 + 11 + 12, "MT": 193}


@pytest.mark.parametrize("dataset", ["camelyon16", "camelyon17"])
def test_same_root_and_seed_give_the_same_bytes_and_another_seed_another_split(dataset, request, tmp_path):
    root = request.getfixturevalue(dataset)
    build = build_camelyon16 if dataset == "camelyon16" else build_camelyon17
    first = write_task(build(root), tmp_path / "a.csv").read_bytes()
    again = write_task(build(root, seed=0), tmp_path / "b.csv").read_bytes()
    assert first == again
    other = build(root, seed=1)
    assert {r.slide_id for r in build(root) if r.split == "val"} != {r.slide_id for r in other if r.split == "val"}
    assert split_counts(other) == split_counts(build(root))  # the seed moves cases, never the sizes
    _assert_no_case_across_splits(other)


def test_written_task_reads_back_as_the_built_rows(camelyon17, tmp_path):
    rows = build_camelyon17(camelyon17)
    task = read_task(write_task(rows, tmp_path / "nested" / "c17.csv"))
    assert sorted(task.rows) == sorted(rows)
    assert task.labels == ["metastasis", "negative"]
    assert len(task.split("test")) == 200
    assert task.path.read_text().splitlines()[0] == "case_id,slide_id,label,split"
    assert list(tmp_path.joinpath("nested").iterdir()) == [tmp_path / "nested" / "c17.csv"]  # no partial left


def test_validation_size_rounding_is_pinned():
    def val_size(cases: int) -> int:
        rows = [TaskRow(f"s{n}", "a", f"s{n}") for n in range(cases)]
        return sum(row.split == "val" for row in assign_val(rows))

    assert [val_size(n) for n in (1, 2, 5, 14, 15, 270)] == [0, 1, 1, 1, 2, 27]  # round half up, >= 1 from 2


# ---------------------------------------------------------------------------------------------- builder errors


def test_camelyon16_label_file_errors_name_the_file_and_line(tmp_path):
    base = _camelyon16(tmp_path)
    reference = base / "testing" / "reference.csv"
    lines = reference.read_text().splitlines()
    reference.write_text("\n".join([*lines[:4], "test_005,Benign,,", *lines[5:]]) + "\n")
    with pytest.raises(TaskError, match=rf"{re.escape(str(reference))}, line 5: test_005 has the class 'benign'"):
        build_camelyon16(base)
    reference.write_text("\n".join(lines[:-1]) + "\n")  # test_130 lost its row
    with pytest.raises(TaskError, match=rf"{re.escape(str(reference))}: no row for test_130"):
        build_camelyon16(base)
    reference.write_text("\n".join([*lines, "test_131,Normal,,"]) + "\n")
    with pytest.raises(TaskError, match=r"line 131: 'test_131' has no slide .*test_131.tif"):
        build_camelyon16(base)


def test_camelyon17_label_file_errors_name_the_file_and_line(tmp_path):
    base = _camelyon17(tmp_path)
    stages = base / "training" / "stage_labels.csv"
    lines = stages.read_text().splitlines()
    at = re.escape(str(stages))
    stages.write_text("\n".join([*lines[:3], "patient_000_node_1.tif,tumour", *lines[4:]]) + "\n")
    with pytest.raises(TaskError, match=rf"{at}, line 4: patient_000_node_1.tif has the stage 'tumour'"):
        build_camelyon17(base)
    stages.write_text("\n".join([*lines, "patient_100_node_0.tif,negative"]) + "\n")
    with pytest.raises(TaskError, match=rf"{at}, line 602: slide 'patient_100_node_0' is not under training"):
        build_camelyon17(base)
    stages.write_text("\n".join(line for line in lines if not line.startswith("patient_042_node_3")) + "\n")
    with pytest.raises(TaskError, match=rf"{at}: no stage for slide\(s\) patient_042_node_3"):
        build_camelyon17(base)


def test_bracs_type_in_the_wrong_group_is_refused(tmp_path):
    base = _bracs(tmp_path)
    _touch(base / "val" / "Group_MT" / "Type_PB" / "BRACS_9999.svs")
    with pytest.raises(TaskError, match=r"Group_MT/Type_PB: not a BRACS type of Group_MT"):
        build_bracs(base)


# ---------------------------------------------------------------------------------------------- bad task files

BAD_TASKS = {
    "no label column": ("slide_id,split\na,train\n", r"line 1: header .* lacks label"),
    "unknown column": ("slide_id,label,splt\na,x,train\n", r"line 1: unknown column\(s\) 'splt'"),
    "unknown split": ("slide_id,label,split\na,x,train\nb,y,holdout\n", r"line 3: slide 'b' has the split 'holdout'"),
    "empty label": ("slide_id,label\na,x\nb,\n", r"line 3: slide 'b' has an empty label"),
    "empty slide": ("slide_id,label\n,x\n", r"line 2: empty slide_id"),
    "duplicate slide": ("slide_id,label\na,x\nb,y\na,y\n", r"line 4: slide 'a' is listed again \(first at line 2\)"),
    "case on two splits": (
        "case_id,slide_id,label,split\np1,a,x,train\np2,b,x,val\np1,c,y,test\n",
        r"line 4: case 'p1' is on the 'test' split but its slide 'a' \(line 2\) is on 'train'",
    ),
    "extra field": ("slide_id,label\na,x,oops\n", r"line 2: more fields than the header"),
    "missing field": ("slide_id,label,split\na,x\n", r"line 2: fewer fields than the header"),
    "no rows": ("slide_id,label\n", r"header but no slides"),
    "empty file": ("", r"empty file"),
}


@pytest.mark.parametrize("case", sorted(BAD_TASKS))
def test_bad_task_file_is_one_clear_error_naming_file_and_line(case, tmp_path):
    text, message = BAD_TASKS[case]
    path = tmp_path / f"{case.replace(' ', '_')}.csv"
    path.write_text(text)
    with pytest.raises(TaskError, match=rf"{re.escape(str(path))}.*{message}"):
        read_task(path)


def test_unknown_label_and_unknown_slides_name_the_rows(tmp_path):
    path = tmp_path / "task.csv"
    path.write_text("slide_id,label,split\na,tumor,train\nb,normal,train\nc,tumour,test\n")
    with pytest.raises(TaskError, match=r"line 4: slide 'c' has the unknown label 'tumour'; the labels are normal"):
        read_task(path, labels={"normal", "tumor"})
    task = read_task(path)
    assert [row.case_id for row in task.rows] == ["a", "b", "c"]  # without case_id a slide is its own case
    with pytest.raises(TaskError, match=r"task.csv: 2 slide\(s\) have no features: line 2: 'a'; line 4: 'c'"):
        require_slides(task, {"b"})
    require_slides(task, {"a", "b", "c"})
    with pytest.raises(TaskError, match=r"no such task file"):
        read_task(tmp_path / "missing.csv")


def test_write_task_refuses_a_leaking_split_and_keeps_the_old_file(tmp_path):
    out = tmp_path / "task.csv"
    write_task([TaskRow("a", "x", "p1", "train")], out)
    before = out.read_bytes()
    leaking = [TaskRow("a", "x", "p1", "train"), TaskRow("b", "y", "p1", "test")]
    with pytest.raises(TaskError, match=r"task.csv, line 3: case 'p1' is on the 'test' split"):
        write_task(leaking, out)
    assert out.read_bytes() == before
    assert [path.name for path in tmp_path.iterdir()] == ["task.csv"]
    assert isinstance(read_task(out), Task)
