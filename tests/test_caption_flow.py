"""The caption flow on a real Prefect API, with the tiny models: one pair shard and one failed table per slide,
budget, provenance, idempotent re-runs, regeneration under a new agents_hash, a lost task leaving its slide
pending, and the CLI with the PathGen JSON export."""

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import threading

import pyarrow.parquet as pq
import pytest

from flows.caption import caption_flow
from tasks.captions.records import FAILED_SCHEMA, PAIR_SCHEMA
from tasks.slides.shard import read_shard

from .conftest import CMU, write_tiff_slide

pytestmark = pytest.mark.prefect

CROP = "CMU-1-Small-Region-crop"  # a second, smaller slide: the top-left of CMU-1, written as an Aperio TIFF
SLIDES = [CMU.stem, CROP]


@pytest.fixture(scope="module")
def two_slide_store(tmp_path_factory, cmu_rgb):
    """A store holding 6 selected 224 px patches of each of two slides, extracted by the factory itself."""
    from pathgen.settings import load_settings
    from tasks.slides.extract import extract_slide
    from tasks.slides.sources import resolve_sources
    from tasks.store.objects import Store

    folder = tmp_path_factory.mktemp("caption-slides")
    crop = write_tiff_slide(folder / f"{CROP}.svs", cmu_rgb[:2048, :2048].copy(), mpp=0.499)
    root = folder / "store"
    settings = load_settings(
        overrides={"store": str(root), "patch.patch_px": 224, "selection.max_per_slide": 6}, environ={}
    )
    store = Store(settings.store)
    for ref in resolve_sources([str(CMU), str(crop)], settings):
        outcome = extract_slide(ref, settings, store)
        assert outcome.status == "ok" and outcome.patches == 6, outcome.error
    return root


@pytest.fixture
def store(two_slide_store, tmp_path):
    copy = tmp_path / "store"
    shutil.copytree(two_slide_store, copy)
    return copy


def _meta(path) -> dict[str, str]:
    raw = pq.ParquetFile(path).schema_arrow.metadata or {}
    return {k.decode(): v.decode() for k, v in raw.items()}


def _artifact_rows(key, flow_run_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    async def read():
        query = ArtifactFilter(
            key=ArtifactFilterKey(any_=[key]), flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])
        )
        async with get_client() as client:
            found = await client.read_artifacts(artifact_filter=query)
            return found[0].data if found else None

    data = asyncio.run(read())
    return json.loads(data) if isinstance(data, str) else data


def _files(store):
    found = [*store.glob("pairs/*/*"), *store.glob("failed/*/*")]
    return {p: p.stat().st_mtime_ns for p in sorted(found) if p.is_file()}


def test_one_pair_shard_and_failed_table_per_slide_with_budget_provenance_and_reruns(prefect_api, tiny_models, store):
    cache, _ = tiny_models
    overrides = {"agents.model_cache": str(cache), "agents.slides_per_task": 1}
    state = caption_flow(store=str(store), overrides=overrides, return_state=True)
    assert state.is_completed()
    summary = state.result()
    assert (summary["slides"], summary["ok"], summary["skipped"], summary["pending"]) == (2, 2, 0, 0)
    assert summary["failed_slides"] == summary["pending_slides"] == [] and summary["random_weights"] is True
    assert (
        summary["pairs"] == summary["items"] and summary["pairs"] + summary["failed_items"] == 12 and summary["pairs"]
    )
    agents_hash = summary["agents_hash"]
    assert summary["pairs_prefix"] == f"{store}/pairs/{agents_hash}" and 0 < summary["max_tokens"] <= 77
    assert sum(summary["failures"].values()) == summary["failed_items"]

    # Per slide: its pair shard (the marker) and its failed table, nothing else; together they hold its patches.
    pair_files = [store / "pairs" / agents_hash / f"{slide}.parquet" for slide in SLIDES]
    failed_files = [store / "failed" / agents_hash / f"{slide}.parquet" for slide in SLIDES]
    assert sorted((store / "pairs" / agents_hash).iterdir()) == sorted(pair_files)
    assert sorted((store / "failed" / agents_hash).iterdir()) == sorted(failed_files)
    assert [p.name for p in store.glob("pairs/*")] == [agents_hash]  # no other folder, no .failed.parquet
    rows = []
    for slide, pair_file, failed_file in zip(SLIDES, pair_files, failed_files, strict=True):
        patch_file = store / "patches" / f"{slide}.parquet"
        patch_ids = set(read_shard(patch_file)["patch_id"].to_pylist())
        pairs, failed = read_shard(pair_file), read_shard(failed_file)
        assert pairs.schema.remove_metadata().equals(PAIR_SCHEMA)
        assert failed.schema.remove_metadata().equals(FAILED_SCHEMA)
        paired, lost = set(pairs["patch_id"].to_pylist()), set(failed["patch_id"].to_pylist())
        assert not paired & lost and paired | lost == patch_ids and len(patch_ids) == 6
        assert set(pairs["slide_id"].to_pylist()) <= {slide} and set(failed["slide_id"].to_pylist()) <= {slide}
        extraction_hash = _meta(patch_file)["pathgen.extraction_hash"]
        assert _meta(pair_file)["pathgen.extraction_hash"] == extraction_hash
        assert set(pairs["extraction_hash"].to_pylist()) <= {extraction_hash}
        assert _meta(pair_file)["pathgen.commit_id"] == _meta(failed_file)["pathgen.commit_id"]
        assert int(_meta(pair_file)["pathgen.failed_items"]) == failed.num_rows
        rows += pairs.to_pylist()
    assert len(rows) == summary["pairs"]
    assert all(r["caption_tokens"] <= 77 and r["caption"] for r in rows)
    row = rows[0]
    assert row["agents_hash"] == agents_hash and row["random_weights"] is True
    assert row["describe_model"].endswith("(random weights)") and "describe.v1@" in row["prompt_versions"]
    assert json.loads(row["sampling"])["summarize"]["max_new_tokens"] == 96
    assert row["image"][:2] == b"\xff\xd8" and row["selected_by"]

    run_id = state.state_details.flow_run_id
    table = {r["slide"]: r for r in _artifact_rows("caption-slides", run_id)}
    assert set(table) == set(SLIDES) and {r["status"] for r in table.values()} == {"ok"}
    for slide, pair_file, failed_file in zip(SLIDES, pair_files, failed_files, strict=True):
        assert table[slide]["items"] == read_shard(pair_file).num_rows
        assert table[slide]["failed"] == read_shard(failed_file).num_rows
    assert float(_artifact_rows("caption-progress", run_id)) == 100.0

    files = _files(store)
    again = caption_flow(store=str(store), overrides=overrides)
    assert (again["ok"], again["skipped"], again["pending"]) == (0, 2, 0) and again["agents_hash"] == agents_hash
    assert _files(store) == files  # nothing rewritten

    regenerated = caption_flow(store=str(store), overrides={**overrides, "agents.summarize.temperature": 0.9})
    assert regenerated["agents_hash"] != agents_hash and (regenerated["ok"], regenerated["skipped"]) == (2, 0)
    assert {p: p.stat().st_mtime_ns for p in files} == files  # earlier pairs untouched
    assert len(list(store.glob("pairs/*"))) == len(list(store.glob("failed/*"))) == 2
    assert len(list((store / "pairs" / regenerated["agents_hash"]).glob("*.parquet"))) == 2


def test_replies_that_fail_validation_go_to_the_failed_tables(prefect_api, tiny_models, store):
    cache, _ = tiny_models
    # Greedy describe: whether a random model's reply runs past the limit must not hang on the sampling seeds.
    overrides = {"agents.model_cache": str(cache), "agents.describe.max_words": 2, "agents.describe.temperature": 0.0}
    summary = caption_flow(store=str(store), overrides=overrides)
    assert summary["pairs"] == 0 and summary["failed_items"] == 12 and summary["failed"] == 0 and summary["ok"] == 2
    # Random models ramble past two words, or now and then stop at once (empty): both are recorded as such.
    assert set(summary["failures"]) <= {"describe:over-long", "describe:empty"}
    assert summary["failures"]["describe:over-long"] >= 6
    for slide in SLIDES:
        # A slide whose patches all failed is still done: an empty pair shard marks it.
        pairs = read_shard(store / "pairs" / summary["agents_hash"] / f"{slide}.parquet")
        assert pairs.num_rows == 0 and pairs.schema.remove_metadata().equals(PAIR_SCHEMA)
        failed = read_shard(store / "failed" / summary["agents_hash"] / f"{slide}.parquet")
        assert set(failed["stage"].to_pylist()) == {"describe"} and failed.num_rows == 6
        assert set(failed["slide_id"].to_pylist()) == {slide}
        details = dict(zip(failed["patch_id"].to_pylist(), failed["detail"].to_pylist(), strict=True))
        reasons = dict(zip(failed["patch_id"].to_pylist(), failed["reason"].to_pylist(), strict=True))
        assert all(details[k] for k, r in reasons.items() if r == "over-long")
    again = caption_flow(store=str(store), overrides=overrides)
    assert (again["ok"], again["skipped"]) == (0, 2)  # content failures are final: not retried


def test_cli_caption_and_pathgen_json_export(prefect_api, tiny_models, store, tmp_path):
    cache, _ = tiny_models
    env = dict(os.environ, PREFECT_API_URL=prefect_api, PREFECT_SERVER_ANALYTICS_ENABLED="false")

    def pathgen(*args):
        return subprocess.run(
            [sys.executable, "-m", "pathgen", *args], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path
        )

    run = pathgen("caption", "--store", str(store), "--set", f"agents.model_cache={cache}")
    assert run.returncode == 0, run.stderr[-2000:]
    assert "RANDOM WEIGHTS" in run.stdout and "CLIP tokens" in run.stdout and "captioned 2 slides" in run.stdout
    out = tmp_path / "pairs.json"
    export = pathgen("export", "pathgen-json", "--store", str(store), "--out", str(out))
    assert export.returncode == 0, export.stderr
    records = json.loads(out.read_text())
    assert records and set(records[0]) == {"wsi_id", "position", "caption", "random_weights"}
    assert records[0]["random_weights"] is True and "RANDOM WEIGHTS" in export.stdout
    assert {r["wsi_id"] for r in records} <= set(SLIDES) and all(isinstance(v, str) for v in records[0]["position"])
    shown = pathgen("inspect", str(store), "--out", str(tmp_path / "sheet.png"))
    assert shown.returncode == 0, shown.stderr
    found = re.search(r"pairs/[0-9a-f]{12}: 2 slide shard\(s\), (\d+) pairs, (\d+) failed items", shown.stdout)
    assert found and int(found.group(1)) + int(found.group(2)) == 12
    assert int(found.group(1)) == len(records)
    bad = pathgen("caption", "--store", str(store), "--set", "agents.describe.backend=llama")
    assert bad.returncode == 2 and "agents.describe.backend" in bad.stderr


def test_a_lost_task_leaves_its_slide_pending_and_a_rerun_completes_it(prefect_api, tiny_models, store, monkeypatch):
    import tasks.captions.caption as caption_module

    cache, _ = tiny_models
    real = caption_module._load
    lock, calls = threading.Lock(), []

    def flaky(store_, slide_id):
        with lock:
            calls.append(slide_id)
            first = len(calls) == 1
        if first:
            raise ValueError("simulated unreadable patch shard")
        return real(store_, slide_id)

    monkeypatch.setattr(caption_module, "_load", flaky)
    overrides = {"agents.model_cache": str(cache), "agents.slides_per_task": 1, "retries.task_retries": 0}
    state = caption_flow(store=str(store), overrides=overrides, return_state=True)
    assert state.is_completed()  # a lost task never sinks the run
    summary = state.result()
    assert (summary["slides"], summary["ok"], summary["pending"]) == (2, 1, 1)
    (pending,) = summary["pending_slides"]
    lost = pending["slide_id"]
    assert lost == calls[0] and "simulated unreadable" in pending["error"]
    (done,) = set(SLIDES) - {lost}
    folder = summary["agents_hash"]
    assert (store / "pairs" / folder / f"{done}.parquet").exists()
    assert not (store / "pairs" / folder / f"{lost}.parquet").exists()  # nothing committed for the lost slide
    assert not (store / "failed" / folder / f"{lost}.parquet").exists()
    assert summary["pairs"] + summary["failed_items"] == 6  # the other slide completed
    table = {r["slide"]: r["status"] for r in _artifact_rows("caption-slides", state.state_details.flow_run_id)}
    assert table == {done: "ok", lost: "pending"}

    files = _files(store)
    monkeypatch.setattr(caption_module, "_load", real)
    again = caption_flow(store=str(store), overrides=overrides)
    assert (again["ok"], again["skipped"], again["pending"]) == (1, 1, 0) and again["agents_hash"] == folder
    assert again["pairs"] + again["failed_items"] == 6  # the lost slide's patches, captioned now
    assert (store / "pairs" / folder / f"{lost}.parquet").exists()
    assert (store / "failed" / folder / f"{lost}.parquet").exists()
    assert all(p.stat().st_mtime_ns == t for p, t in files.items())  # the slide done before is untouched
