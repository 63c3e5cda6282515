"""The train_mil flow on a real Prefect API (its task's tags, its summary and metrics artifact, the finished run
skipped) and the `pathgen train-mil` command (what it prints, RANDOM WEIGHTS, exit 2 for a bad task file)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from flows.train_mil import train_mil_flow
from tasks.mil.tasks import TaskRow, read_task, write_task
from tasks.store.objects import Store

from .conftest import ROOT
from .test_flow_cli import _artifact, _task_tags
from .test_mil_run import HASH, SPLITS, build_features

pytestmark = pytest.mark.prefect


def _overrides(work: Path) -> dict:
    return {"mil.epochs": 2, "mil.learning_rates": [5e-3], "mil.seeds": 2, "mil.work_dir": str(work),
            "mil.heatmap_top_k": 2, "mil.device": "cpu"}  # fmt: skip


def _pathgen(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pathgen", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


def test_the_flow_trains_reports_and_skips_a_finished_run_and_the_command_prints_it(prefect_api, tmp_path):
    store = Store(str(tmp_path / "store"))
    task = write_task(build_features(store), tmp_path / "camelyon.csv")
    state = train_mil_flow(
        task=str(task), features=HASH, model="abmil", store=str(tmp_path / "store"),
        overrides=_overrides(tmp_path / "work"), return_state=True,
    )  # fmt: skip
    assert state.is_completed(), state.result(raise_on_failure=False)
    summary = state.result()
    assert summary["status"] == "trained" and summary["run"].startswith("camelyon-abmil-")
    assert summary["eval"] == f"eval/mil/{summary['run']}/camelyon.json" and store.exists(summary["eval"])
    assert summary["chosen_lr"] == 5e-3 and summary["random_weights"] is True and summary["features"] == HASH
    assert set(summary["mean"]) == set(summary["std"]) == {"accuracy", "balanced_accuracy", "macro_f1", "auc"}
    assert len(summary["per_seed"]) == 2 and len(summary["heatmaps"]) == SPLITS["test"]
    run_id = state.state_details.flow_run_id
    assert {"train-mil", "gpu"} in [tags & {"train-mil", "gpu"} for tags in _task_tags(run_id)]
    report = _artifact("train-mil-metrics", run_id)
    assert report is not None and "RANDOM WEIGHTS" in report.data and "| auc |" in report.data

    env = dict(os.environ, PREFECT_API_URL=prefect_api)
    settings = [f"--set=mil.{k.split('.', 1)[1]}={v}" for k, v in _overrides(tmp_path / "work").items()]
    done = _pathgen("train-mil", "--task", str(task), "--features", HASH, "--model", "abmil",
                    "--store", str(tmp_path / "store"), *settings, env=env)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"run: {summary['run']} (skipped)" in done.stdout  # the finished run is not trained again
    assert "chosen lr 0.005" in done.stdout and "auc" in done.stdout and "±" in done.stdout
    assert summary["eval_uri"] in done.stdout and "heatmaps:   4" in done.stdout
    assert "RANDOM WEIGHTS" in done.stdout

    rows = [*read_task(task).rows, TaskRow("not_featured", "tumor", "not_featured", "train")]
    bad = write_task(rows, tmp_path / "bad.csv")
    refused = _pathgen("train-mil", "--task", str(bad), "--features", HASH, "--store", str(tmp_path / "store"),
                       env=env)  # fmt: skip
    assert refused.returncode == 2 and "bad.csv" in refused.stderr and "'not_featured'" in refused.stderr


def test_the_command_refuses_a_missing_task_file_before_prefect(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    missing = _pathgen("train-mil", "--task", str(tmp_path / "nope.csv"), "--store", str(tmp_path), env=env)
    assert missing.returncode == 2 and "nope.csv: no such task file" in missing.stderr
    assert not (tmp_path / "prefect-home").exists()  # refused before any API was started


def test_the_flow_refuses_missing_or_random_features_before_any_work(prefect_api, tmp_path):
    task = write_task([TaskRow("a", "x", "a", "test")], tmp_path / "t.csv")
    state = train_mil_flow(task=str(task), store=str(tmp_path / "store"), return_state=True)
    assert not state.is_completed()
    assert "pathgen features" in str(state.result(raise_on_failure=False))

    store = Store(str(tmp_path / "store"))
    task = write_task(build_features(store), tmp_path / "task.csv")  # their manifest: a random-weight encoder
    production = {**_overrides(tmp_path / "work"), "models.allow_random_weights": False}
    state = train_mil_flow(task=str(task), features=HASH, store=str(tmp_path / "store"), overrides=production,
                           return_state=True)  # fmt: skip
    assert not state.is_completed() and "random weights" in str(state.result(raise_on_failure=False))
    assert not store.list("models/mil")  # nothing trained
