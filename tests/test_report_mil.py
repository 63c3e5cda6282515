"""The store report's "Whole-slide tasks": one table per task with every (encoder, MIL model) run evaluated on it
side by side, random-weight encoders marked, and the features hashes with their encoder and slide counts. Built
from eval/mil/<run>/<task>.json files laid out as the train-mil flow writes them (tasks/report.py reads nothing
else), so the figures shown are exactly the ones in the files."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np

from tasks.features.store import FeatureTable, manifest_key, write_features
from tasks.report import markdown, store_report, text
from tasks.store.objects import Store

TASK = "camelyon16"
SHA = "ab" * 32
METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "auc")
PATHGEN_CLIP = {"spec": "pathgen-clip-run1", "name": "ViT-B-16", "digest": "sha256:1", "random_weights": False}
TINY = {"spec": "tiny-random", "name": "tiny-random", "digest": "random-init", "random_weights": True}


def _eval_json(store: Store, run: str, model: str, encoder: dict, per_seed: dict, lr: float, task: str = TASK) -> str:
    """eval/mil/<run>/<task>.json as the contract lays it out; mean and std computed from the per-seed figures."""
    key = f"eval/mil/{run}/{task}.json"
    store.write_json(
        key,
        {
            "task": task,
            "task_sha256": SHA,
            "run": run,
            "model": model,
            "features": {"source": "f" * 16, "encoder": encoder, "random_weights": encoder["random_weights"]},
            "classes": ["normal", "tumor"],
            "chosen_lr": lr,
            "seeds": len(per_seed["auc"]),
            "mean": {m: statistics.fmean(per_seed[m]) for m in METRICS},
            "std": {m: statistics.pstdev(per_seed[m]) for m in METRICS},
            "per_seed": per_seed,
            "per_class_recall": {"normal": 0.5, "tumor": 0.5},
            "confusion": [[1, 1], [1, 1]],
            "confusion_png": f"eval/mil/{run}/{task}-confusion.png",
            "heatmaps": [],
            "random_weights": encoder["random_weights"],
        },
    )
    return key


def _seeds(rng: np.random.Generator) -> dict[str, list[float]]:
    return {m: [round(float(v), 4) for v in rng.uniform(0.4, 1.0, 3)] for m in METRICS}


def _store(tmp_path: Path) -> tuple[Store, dict[tuple[str, str], dict]]:
    store = Store(str(tmp_path / "store"))
    rng = np.random.default_rng(7)
    made = {}
    # written in an order unlike the table's, so the test sees the report sort them
    for encoder, model, run, lr in (
        (TINY, "acmil", "camelyon16-acmil-000000000003", 5e-4),
        (PATHGEN_CLIP, "acmil", "camelyon16-acmil-000000000001", 2e-4),
        (TINY, "abmil", "camelyon16-abmil-000000000004", 1e-4),
        (PATHGEN_CLIP, "abmil", "camelyon16-abmil-000000000002", 1e-4),
    ):
        seeds = _seeds(rng)
        _eval_json(store, run, model, encoder, seeds, lr)
        made[(encoder["spec"], model)] = {"run": run, "lr": lr, "seeds": seeds}
    _eval_json(store, "bracs-abmil-000000000005", "abmil", PATHGEN_CLIP, _seeds(rng), 2e-4, task="bracs")
    store.write_json("eval/pathgen-clip-run1-stage1/kather.json", {"zero_shot": {"balanced_accuracy": 0.5}})
    for features_hash, encoder, slides in (("a" * 16, PATHGEN_CLIP, 3), ("b" * 16, TINY, 2)):
        store.write_json(manifest_key(features_hash), {"encoder": encoder, "settings": {}, "created_at": "now"})
        for index in range(slides):
            table = FeatureTable(f"slide-{index}", np.ones((2, 4)), [[0, 0, 8, 8], [8, 0, 8, 8]], [1.0, 0.9])
            write_features(store, features_hash, table, {"encoder": encoder})
    store.write_json(f"features/{'b' * 16}/failed/slide-9.json", {"reason": "no tissue"})
    return store, made


def _cell(values: list[float]) -> str:
    return f"{statistics.fmean(values):.3f} ± {statistics.pstdev(values):.3f}"


def _task_rows(lines: list[str], task: str) -> list[list[str]]:
    """The text table under "Task <task>": each row split on runs of two spaces."""
    start = next(i for i, line in enumerate(lines) if line.startswith(f"Task {task}"))
    rows = []
    for line in lines[start + 3 :]:  # heading, column names, rule
        if not line.strip():
            break
        rows.append([cell.strip() for cell in line.strip().split("  ") if cell.strip()])
    return rows


def test_one_table_per_task_with_every_encoder_and_model_side_by_side(tmp_path: Path) -> None:
    store, made = _store(tmp_path)
    report = store_report(store)
    tasks = {t["task"]: t for t in report["mil"]["tasks"]}
    assert set(tasks) == {TASK, "bracs"}
    lines = text(report).splitlines()
    assert "Whole-slide tasks (mean ± std over seeds, test split):" in lines
    rows = _task_rows(lines, TASK)
    # encoder, then model: PathGen-CLIP beside its random-weight counterpart, each with ABMIL and ACMIL
    expected_order = [("pathgen-clip-run1", "abmil"), ("pathgen-clip-run1", "acmil"),
                      ("tiny-random", "abmil"), ("tiny-random", "acmil")]  # fmt: skip
    assert [(r[0].removesuffix(" (RANDOM WEIGHTS)"), r[1]) for r in rows] == expected_order
    for row, key in zip(rows, expected_order, strict=True):
        seeds = made[key]["seeds"]
        assert row[2:6] == [_cell(seeds[m]) for m in ("auc", "balanced_accuracy", "macro_f1", "accuracy")], row
        assert row[6:] == [made[key]["run"], f"{made[key]['lr']:g}"]
        assert row[0].endswith("(RANDOM WEIGHTS)") == (key[0] == "tiny-random"), row
    assert len(_task_rows(lines, "bracs")) == 1
    # the MIL files are not listed again among the CLIP evaluations
    evals = [line for line in lines if line.startswith("Eval ")]
    assert evals == ["Eval pathgen-clip-run1-stage1 on kather: zero_shot_balanced_accuracy 0.500"], evals


def test_features_hashes_with_encoder_and_slide_counts(tmp_path: Path) -> None:
    store, _ = _store(tmp_path)
    features = {f["features_hash"]: f for f in store_report(store)["mil"]["features"]}
    assert {h: (f["encoder"], f["random_weights"], f["slides"], f["failed"]) for h, f in features.items()} == {
        "a" * 16: ("pathgen-clip-run1", False, 3, 0),
        "b" * 16: ("tiny-random", True, 2, 1),
    }
    lines = text(store_report(store)).splitlines()
    start = lines.index("Slide features:")
    shown = [line.split() for line in lines[start + 3 : start + 5]]
    assert [s[:2] for s in shown] == [["a" * 16, "pathgen-clip-run1"], ["b" * 16, "tiny-random"]]
    assert shown[1][2:6] == ["(RANDOM", "WEIGHTS)", "2", "1"], shown


def test_markdown_tables_and_no_section_without_mil_results(tmp_path: Path) -> None:
    store, made = _store(tmp_path)
    md = markdown(store_report(store), extra=["| stage | state |"])
    header = "| encoder | model | AUC | balanced accuracy | macro-F1 | accuracy | run | lr |"
    assert md.count(header) == 2, md  # one table per task
    lines = md.splitlines()
    assert "## Whole-slide tasks (mean ± std over seeds, test split)" in lines, md
    task = lines.index(f"### Task {TASK}, task file sha256 {SHA[:12]}")
    assert lines[task + 1] == header and len(lines[task + 3 : lines.index("", task)]) == 4, md
    seeds = made[("tiny-random", "acmil")]["seeds"]
    cells = " | ".join(_cell(seeds[m]) for m in ("auc", "balanced_accuracy", "macro_f1", "accuracy"))
    row = f"| tiny-random (RANDOM WEIGHTS) | acmil | {cells} | camelyon16-acmil-000000000003 | 0.0005 |"
    assert row in md.splitlines(), md
    empty = Store(str(tmp_path / "empty"))
    empty.write_json("slides/x/slide.json", {"slide_id": "x", "status": "ok"})
    assert "Whole-slide tasks" not in text(store_report(empty))


def test_pathgen_status_prints_the_task_tables(tmp_path: Path) -> None:
    store, made = _store(tmp_path)
    env = dict(os.environ, PREFECT_API_URL="http://127.0.0.1:9/api", PREFECT_SERVER_ANALYTICS_ENABLED="false")
    done = subprocess.run(
        [sys.executable, "-m", "pathgen", "status", "--store", store.url],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = _task_rows(done.stdout.splitlines(), TASK)
    assert [r[6] for r in rows] == [made[k]["run"] for k in sorted(made)]
    assert sum("(RANDOM WEIGHTS)" in r[0] for r in rows) == 2
