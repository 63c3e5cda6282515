"""``pathgen mil-task``: the task file built from a CAMELYON16-like layout, its printed counts, and refused input.

The fixture mimics the official download as tests/test_mil_tasks.py does (empty placeholder slides, the label file
in its official form), with a few slides only: the builder's split rules are pinned there, the command here.
"""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NORMAL, TUMOR, TEST_TUMOR, TEST_NORMAL = 12, 8, 3, 2


def _touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")


@pytest.fixture(scope="module")
def camelyon16(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("mil-cli") / "CAMELYON16"
    for label, count in (("normal", NORMAL), ("tumor", TUMOR)):
        for number in range(1, count + 1):
            _touch(base / "training" / label / f"{label}_{number:03d}.tif")
    lines = []
    for number in range(1, TEST_TUMOR + TEST_NORMAL + 1):
        _touch(base / "testing" / "images" / f"test_{number:03d}.tif")
        tumour = number <= TEST_TUMOR
        lines.append(f"test_{number:03d},Tumor,Macro,Primary" if tumour else f"test_{number:03d},Normal,,")
    (base / "testing" / "reference.csv").write_text("\n".join(lines) + "\n")
    return base


def _pathgen(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    # PYTHONPROFILEIMPORTTIME lists every module imported on stderr, so the test sees whether Prefect was touched;
    # PREFECT_HOME under tmp_path is where a started local API server would leave its record.
    env = os.environ | {"PYTHONPROFILEIMPORTTIME": "1", "PREFECT_HOME": str(tmp_path / "prefect-home")}
    env.pop("PREFECT_API_URL", None)
    return subprocess.run(
        [sys.executable, "-m", "pathgen", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


def _messages(stderr: str) -> str:
    return "\n".join(line for line in stderr.splitlines() if not line.startswith("import time:"))


def _table(stdout: str) -> dict[str, dict[str, int]]:
    """The printed counts table as {split: {column: count}}."""
    lines = [line.split() for line in stdout.splitlines()[1:] if line.strip()]
    header, body = lines[0], lines[1:]
    return {cells[0]: dict(zip(header[1:], map(int, cells[1:]), strict=True)) for cells in body}


def test_mil_task_writes_the_task_and_prints_counts_without_prefect(camelyon16, tmp_path):
    out = tmp_path / "tasks" / "camelyon16.csv"
    result = _pathgen("mil-task", "camelyon16", "--root", str(camelyon16), "--out", str(out), tmp_path=tmp_path)
    assert result.returncode == 0, _messages(result.stderr)

    with out.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["case_id", "slide_id", "label", "split"]
    written = Counter((row["split"], row["label"]) for row in rows)
    training = NORMAL + TUMOR
    assert written["val", "normal"] + written["val", "tumor"] == round(training * 0.1)  # the paper's 9:1
    assert written["test", "tumor"] == TEST_TUMOR and written["test", "normal"] == TEST_NORMAL
    assert written["train", "normal"] + written["val", "normal"] == NORMAL

    assert re.match(
        rf"wrote {re.escape(str(out))}: camelyon16, {len(rows)} slides, {len(rows)} cases, seed 0$",
        result.stdout.splitlines()[0],
    )
    table = _table(result.stdout)
    for split in ("train", "val", "test"):
        assert table[split]["normal"] == written[split, "normal"]
        assert table[split]["tumor"] == written[split, "tumor"]
        assert table[split]["slides"] == table[split]["cases"] == sum(row["split"] == split for row in rows)
    assert table["total"] == {
        "normal": NORMAL + TEST_NORMAL,
        "tumor": TUMOR + TEST_TUMOR,
        "slides": len(rows),
        "cases": len(rows),
    }

    imported = [line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if line.startswith("import")]
    assert "tasks.mil.tasks" in imported
    assert not [name for name in imported if name.split(".")[0] == "prefect"], "mil-task must not import Prefect"
    assert not (tmp_path / "prefect-home").exists(), "mil-task must not start a Prefect API server"


def test_mil_task_seed_changes_the_validation_split(camelyon16, tmp_path):
    outs = []
    for seed in ("0", "1"):
        out = tmp_path / f"seed{seed}.csv"
        args = ("mil-task", "camelyon16", "--root", str(camelyon16), "--out", str(out), "--seed", seed)
        result = _pathgen(*args, tmp_path=tmp_path)
        assert result.returncode == 0, _messages(result.stderr)
        assert result.stdout.splitlines()[0].endswith(f"seed {seed}")
        outs.append({row["slide_id"] for row in csv.DictReader(out.open()) if row["split"] == "val"})
    assert outs[0] != outs[1]


def test_mil_task_bad_root_exits_2_naming_it_and_writes_nothing(tmp_path):
    missing = tmp_path / "not-camelyon"
    out = tmp_path / "task.csv"
    result = _pathgen("mil-task", "camelyon16", "--root", str(missing), "--out", str(out), tmp_path=tmp_path)
    assert result.returncode == 2
    message = _messages(result.stderr)
    assert message.startswith("pathgen mil-task: ")
    assert str(missing) in message and "Traceback" not in message
    assert not out.exists() and result.stdout == ""


def test_mil_task_refuses_an_option_of_another_data_set(camelyon16, tmp_path):
    out = tmp_path / "task.csv"
    args = ("mil-task", "camelyon16", "--root", str(camelyon16), "--out", str(out), "--scheme", "stage")
    result = _pathgen(*args, tmp_path=tmp_path)
    assert result.returncode == 2
    assert (
        _messages(result.stderr) == "pathgen mil-task: --scheme does not apply to camelyon16 (it takes --seed); drop it"
    )
    assert not out.exists()
