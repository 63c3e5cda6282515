"""The factory's terminal side: `pathgen status` reads a store alone, and a run that would use random weights where
they are not allowed fails before any work, naming the setting."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from .conftest import CMU

ROOT = Path(__file__).resolve().parents[1]
DEAD_API = "http://127.0.0.1:9/api"  # nothing may reach Prefect in these checks


def _pathgen(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PREFECT_API_URL=DEAD_API, PREFECT_SERVER_ANALYTICS_ENABLED="false")
    command = [sys.executable, "-m", "pathgen", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)


def test_status_reads_the_store_alone(captioned_store: Path, tmp_path: Path) -> None:
    done = _pathgen("status", "--store", str(captioned_store), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "Slides: 1 (1 ok)" in out, out
    assert "pairs from 1 slides" in out and "RANDOM WEIGHTS: captions are noise" in out, out
    assert f"{CMU.stem}: " in out and "thumbnail.png" in out, out
    missing = _pathgen("status", "--store", str(tmp_path / "nothing"), cwd=tmp_path)
    assert missing.returncode == 1 and "no store at" in missing.stdout


def test_a_run_refusing_random_weights_fails_before_any_work(tmp_path: Path) -> None:
    store = tmp_path / "store"
    done = _pathgen("run", str(CMU), "--store", str(store), "--set", "models.allow_random_weights=false", cwd=tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "models.allow_random_weights is false" in done.stderr
    for setting in ("embedding.model", "agents.describe.model", "clip.pretrained"):
        assert setting in done.stderr, done.stderr
    assert not store.exists()  # nothing was written, and Prefect (a dead URL here) was never asked
    production = _pathgen(
        "run",
        "--config",
        str(ROOT / "deploy" / "production.yaml"),
        "--set",
        "agents.summarize.model=",
        "--stages",
        "caption",
        cwd=tmp_path,
    )
    assert production.returncode == 2 and "agents.summarize.model is unset" in production.stderr, production.stderr


def test_unknown_stage_is_named(tmp_path: Path) -> None:
    done = _pathgen("run", str(CMU), "--store", str(tmp_path / "s"), "--stages", "extract,train", cwd=tmp_path)
    assert done.returncode == 2 and "unknown factory stages ['train']" in done.stderr, done.stderr


# -- the whole-slide stages: features and train-mil ----------------------------------------------------------------


def test_whole_slide_stages_are_asked_for_by_name_and_run_in_order() -> None:
    from flows.factory import checked_stages
    from tasks.models import DEFAULT_STAGES

    assert checked_stages(["train-mil", "features", "extract", "train-clip"]) == [
        "extract", "train-clip", "features", "train-mil",
    ]  # fmt: skip
    assert not {"features", "train-mil"} & set(DEFAULT_STAGES)


def test_whole_slide_stages_refuse_random_features_before_any_work(tmp_path: Path) -> None:
    store = tmp_path / "store"
    task = tmp_path / "task.csv"
    task.write_text("slide_id,label,split\na,tumor,train\n")
    args = ("--store", str(store), "--set", "models.allow_random_weights=false", "--set", f"mil.task={task}")
    done = _pathgen("run", str(CMU), "--stages", "features,train-mil", *args, cwd=tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "features.encoder is unset and" in done.stderr and "holds no PathGen-CLIP" in done.stderr, done.stderr
    assert not store.exists()
    named = _pathgen("run", str(CMU), "--stages", "features", *args, "--set", "features.encoder=ViT-B-16", cwd=tmp_path)
    assert named.returncode == 2 and "features.encoder ViT-B-16: ViT-B-16 has no pretrained" in named.stderr


def test_train_mil_without_a_task_is_skipped_with_a_note(prefect_api, tmp_path: Path) -> None:
    from flows.factory import factory_flow

    summary = factory_flow(store=str(tmp_path / "store"), stages=["train-mil"])
    assert [(r["stage"], r["state"]) for r in summary["stages"]] == [("train-mil", "skipped")]
    assert "set mil.task" in summary["stages"][0]["note"]
    assert "| train-mil | skipped |" in summary["report"]
