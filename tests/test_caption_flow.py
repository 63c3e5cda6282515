"""The caption flow on a real Prefect API, with the tiny models: shards, budget, failed tables, idempotent
re-runs, regeneration under a new agents_hash, and the CLI with the PathGen JSON export."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from flows.caption import caption_flow
from tasks.captions.shard import PAIR_SCHEMA
from tasks.slides.shard import read_shard

pytestmark = pytest.mark.prefect


@pytest.fixture
def store(extracted_store, tmp_path):
    copy = tmp_path / "store"
    shutil.copytree(extracted_store, copy)
    return copy


def _tables(root, suffix):
    return {p.name: read_shard(p) for p in sorted(root.glob(f"pairs/*/*{suffix}"))}


def test_caption_shards_with_budget_provenance_and_reruns(prefect_api, tiny_models, store):
    cache, _ = tiny_models
    overrides = {"agents.model_cache": str(cache), "agents.shard_size": 5}
    summary = caption_flow(store=str(store), overrides=overrides)
    assert summary["shards"] == 3 and summary["random_weights"] is True
    assert summary["pairs"] + summary["failed"] == 12 and summary["pairs"] > 0
    pairs = [t for name, t in _tables(store, ".parquet").items() if not name.endswith(".failed.parquet")]
    failed = _tables(store, ".failed.parquet")
    assert len(pairs) == 3 and len(failed) == 3
    rows = [r for t in pairs for r in t.to_pylist()]
    assert len(rows) == summary["pairs"]
    assert all(r["caption_tokens"] <= 77 and r["caption"] for r in rows)
    assert pairs[0].schema.remove_metadata().equals(PAIR_SCHEMA)
    row = rows[0]
    assert row["agents_hash"] == summary["agents_hash"] and row["random_weights"] is True
    assert row["describe_model"].endswith("(random weights)") and "describe.v1@" in row["prompt_versions"]
    assert json.loads(row["sampling"])["summarize"]["max_new_tokens"] == 96
    assert row["image"][:2] == b"\xff\xd8" and row["selected_by"]

    mtimes = {p: p.stat().st_mtime_ns for p in store.glob("pairs/*/*")}
    again = caption_flow(store=str(store), overrides=overrides)
    assert again["shards"] == 0 and again["already_done"] == 12 and again["agents_hash"] == summary["agents_hash"]
    assert {p: p.stat().st_mtime_ns for p in store.glob("pairs/*/*")} == mtimes

    regenerated = caption_flow(store=str(store), overrides={**overrides, "agents.summarize.temperature": 0.9})
    assert regenerated["agents_hash"] != summary["agents_hash"] and regenerated["shards"] == 3
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes  # earlier pairs untouched
    assert len(list(store.glob("pairs/*"))) == 2


def test_replies_that_fail_validation_go_to_the_failed_table(prefect_api, tiny_models, store):
    cache, _ = tiny_models
    summary = caption_flow(
        store=str(store), overrides={"agents.model_cache": str(cache), "agents.describe.max_words": 2}
    )
    assert summary["pairs"] == 0 and summary["failed"] == 12
    # Random models ramble past two words, or now and then stop at once (empty): both are recorded as such.
    assert set(summary["failures"]) <= {"describe:over-long", "describe:empty"}
    assert summary["failures"]["describe:over-long"] >= 6
    (failed,) = _tables(store, ".failed.parquet").values()
    assert set(failed["stage"].to_pylist()) == {"describe"} and failed.num_rows == 12
    details = dict(zip(failed["patch_id"].to_pylist(), failed["detail"].to_pylist(), strict=True))
    reasons = dict(zip(failed["patch_id"].to_pylist(), failed["reason"].to_pylist(), strict=True))
    assert all(details[k] for k, r in reasons.items() if r == "over-long")


def test_cli_caption_and_pathgen_json_export(prefect_api, tiny_models, store, tmp_path):
    cache, _ = tiny_models
    env = dict(os.environ, PREFECT_API_URL=prefect_api, PREFECT_SERVER_ANALYTICS_ENABLED="false")

    def pathgen(*args):
        return subprocess.run(
            [sys.executable, "-m", "pathgen", *args], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path
        )

    run = pathgen("caption", "--store", str(store), "--set", f"agents.model_cache={cache}")
    assert run.returncode == 0, run.stderr[-2000:]
    assert "RANDOM WEIGHTS" in run.stdout and "CLIP tokens" in run.stdout
    out = tmp_path / "pairs.json"
    export = pathgen("export", "pathgen-json", "--store", str(store), "--out", str(out))
    assert export.returncode == 0, export.stderr
    records = json.loads(out.read_text())
    assert records and set(records[0]) == {"wsi_id", "position", "caption"}
    assert records[0]["wsi_id"] == "CMU-1-Small-Region" and all(isinstance(v, str) for v in records[0]["position"])
    shown = pathgen("inspect", str(store), "--out", str(tmp_path / "sheet.png"))
    assert shown.returncode == 0, shown.stderr
    found = re.search(r"pairs/[0-9a-f]{12}: 1 shard\(s\), (\d+) pairs, (\d+) failed items", shown.stdout)
    assert found and int(found.group(1)) + int(found.group(2)) == 12
    assert int(found.group(1)) == len(records)
    bad = pathgen("caption", "--store", str(store), "--set", "agents.describe.backend=llama")
    assert bad.returncode == 2 and "agents.describe.backend" in bad.stderr


def test_a_lost_shard_is_reported_and_the_others_complete(prefect_api, tiny_models, store, monkeypatch):
    import tasks.captions.shard as caption_module

    cache, _ = tiny_models
    real = caption_module._load_patches
    calls = {"n": 0}

    def flaky(store_, items):
        calls["n"] += 1
        if calls["n"] == 1:
            raise ValueError("simulated unreadable patch shard")
        return real(store_, items)

    monkeypatch.setattr(caption_module, "_load_patches", flaky)
    summary = caption_flow(store=str(store), overrides={"agents.model_cache": str(cache), "agents.shard_size": 6})
    assert summary["shards"] == 2 and len(summary["failed_shards"]) == 1
    assert "simulated unreadable" in summary["failed_shards"][0]["error"]
    assert summary["pairs"] + summary["failed"] == 6  # the other shard completed
    monkeypatch.setattr(caption_module, "_load_patches", real)
    again = caption_flow(store=str(store), overrides={"agents.model_cache": str(cache), "agents.shard_size": 6})
    assert again["shards"] == 1 and again["already_done"] == 6  # the lost shard's patches were still pending
