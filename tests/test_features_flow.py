"""The features flow on a real Prefect API (and on the SeaweedFS S3 store), and `pathgen features` / `pathgen export
features` (exit codes, what they print)."""

from __future__ import annotations

import asyncio

import h5py
import numpy as np
import pytest

from flows.features import features_flow
from pathgen.cli import main
from tasks.features.store import featured_slides, manifest_key, read_features
from tasks.store.objects import Store

from .conftest import CMU, DAPI

pytestmark = pytest.mark.prefect
FAST = {"features.target_mpp": 1.0, "retries.io_retries": 0, "features.group_size": 1}


def _task_tags(flow_run_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def read():
        async with get_client() as client:
            runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            return [(r.name, set(r.tags)) for r in runs]

    return asyncio.run(read())


def test_flow_features_slides_lists_failures_and_writes_the_manifest(prefect_api, tmp_path):
    store_url = str(tmp_path / "store")
    state = features_flow(sources=[str(CMU), str(DAPI)], store=store_url, overrides=FAST, processes=False,
                          return_state=True)  # fmt: skip
    assert state.is_completed()
    summary = state.result()
    assert (summary["ok"], summary["failed"], summary["pending"], summary["slides"]) == (1, 1, 0, 2)
    assert summary["failed_slides"][0]["slide_id"] == DAPI.stem and summary["random_weights"] is True
    assert summary["encoder"] == "tiny-random" and summary["dim"] == 32
    store = Store(store_url)
    fhash = summary["features_hash"]
    assert featured_slides(store, fhash) == [CMU.stem]
    assert read_features(store, fhash, CMU.stem).meta["counts"]["kept"] == summary["patches"] > 0
    manifest = store.read_json(manifest_key(fhash))
    assert manifest["encoder"]["digest"] == "random-init" and manifest["settings"]["target_mpp"] == 1.0
    tasks = _task_tags(state.state_details.flow_run_id)
    assert tasks and all(name.startswith("feature-slides") and {"features", "gpu"} <= tags for name, tags in tasks)
    again = features_flow(sources=[str(CMU), str(DAPI)], store=store_url, overrides=FAST, processes=False)
    assert (again["ok"], again["skipped"], again["failed"]) == (0, 1, 1) and again["features_hash"] == fhash


def test_flow_fails_when_no_slide_succeeds_and_refuses_random_weights_in_production(prefect_api, tmp_path):
    state = features_flow(sources=[str(DAPI)], store=str(tmp_path / "s"), overrides=FAST, processes=False,
                          return_state=True)  # fmt: skip
    assert state.is_failed() and "no slide succeeded" in str(state.result(raise_on_failure=False))
    refused = features_flow(sources=[str(CMU)], store=str(tmp_path / "p"), processes=False, return_state=True,
                            overrides={**FAST, "models.allow_random_weights": False})  # fmt: skip
    assert refused.is_failed() and "random weights" in str(refused.result(raise_on_failure=False))
    assert not (tmp_path / "p" / "features").exists() or not list((tmp_path / "p" / "features").rglob("*.parquet"))


def test_flow_on_the_s3_store(prefect_api, bucket):
    summary = features_flow(sources=[str(CMU)], store=bucket, overrides=FAST, processes=False)
    assert summary["ok"] == 1 and summary["store"] == bucket
    store = Store(bucket)
    table = read_features(store, summary["features_hash"], CMU.stem)
    assert len(table.features) == summary["patches"] and table.meta["source_uri"] == str(CMU)
    assert store.exists(manifest_key(summary["features_hash"]))


def test_cli_features_then_export_h5(prefect_api, tmp_path, capsys):
    store = str(tmp_path / "store")
    sets = [arg for key, value in FAST.items() for arg in ("--set", f"{key}={value}")]
    assert main(["features", str(tmp_path / "missing.svs"), "--store", store]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["features", str(CMU), "--store", store, "--threads", *sets]) == 0
    out = capsys.readouterr().out
    assert "featured 1 slides: 1 ok" in out and "RANDOM WEIGHTS" in out and "encoder tiny-random" in out
    fhash = out.split("features_hash: ")[1].split()[0]
    assert main(["features", str(DAPI), "--store", store, "--threads", *sets]) == 1  # none succeeded
    assert main(["export", "features", "--format", "h5", "--store", store, "--out", str(tmp_path / "h5")]) == 0
    out = capsys.readouterr().out
    assert "wrote 1 slides" in out and fhash in out and "RANDOM WEIGHTS" in out
    with h5py.File(tmp_path / "h5" / f"{CMU.stem}.h5", "r") as f:
        features = f["features"][:]
    np.testing.assert_array_equal(features, read_features(Store(store), fhash, CMU.stem).features)
    assert (
        main(["export", "features", "--store", store, "--features-hash", "0" * 16, "--out", str(tmp_path / "x")]) == 2
    )
    assert fhash in capsys.readouterr().err


def test_flow_in_parts_features_each_slide_once(prefect_api, tmp_path):
    store_url = str(tmp_path / "store")
    summary = features_flow(sources=[str(CMU), str(DAPI)], store=store_url, overrides=FAST, processes=False, parts=2)
    assert (summary["ok"], summary["failed"], summary["slides"]) == (1, 1, 2) and summary["lost_parts"] == []
    assert [p["state"] for p in summary["parts"]] == ["Completed", "Completed"]
    assert featured_slides(Store(store_url), summary["features_hash"]) == [CMU.stem]
