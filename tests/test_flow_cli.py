"""The extract flow on a real Prefect API, and the `pathgen` command's contract (exit codes, output)."""

import asyncio
import json
import os
import subprocess
import sys

import pytest
import yaml

from flows.extract import extract_flow

from .conftest import CMU, DAPI, SLIDES

pytestmark = pytest.mark.prefect


def _artifact(key, flow_run_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    async def read():
        query = ArtifactFilter(
            key=ArtifactFilterKey(any_=[key]), flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])
        )
        async with get_client() as client:
            found = await client.read_artifacts(artifact_filter=query)
            return found[0] if found else None

    return asyncio.run(read())


def _task_tags(flow_run_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def read():
        async with get_client() as client:
            runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            return [set(r.tags) for r in runs]

    tags = asyncio.run(read())
    assert tags
    return tags


def test_flow_completes_and_lists_failed_slides(prefect_api, tmp_path):
    state = extract_flow(
        sources=[str(SLIDES), str(tmp_path / "missing.svs")],
        store=str(tmp_path / "store"),
        overrides={"extract.group_size": 1, "retries.io_retries": 0},
        processes=False,
        return_state=True,
    )
    assert state.is_completed()
    summary = state.result()
    assert (summary["ok"], summary["failed"], summary["slides"]) == (1, 2, 3)
    assert {f["slide_id"] for f in summary["failed_slides"]} == {"missing", DAPI.stem}
    run_id = state.state_details.flow_run_id
    table = _artifact("extract-slides", run_id)
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert {r["slide"]: r["status"] for r in rows} == {CMU.stem: "ok", DAPI.stem: "failed", "missing": "failed"}
    progress = _artifact("extract-progress", run_id)
    assert float(progress.data) == 100.0
    # Representative selection (the default) embeds patches: its tasks carry the gpu tag.
    assert all("gpu" in tags for tags in _task_tags(run_id))


def test_flow_fails_when_no_slide_succeeds(prefect_api, tmp_path):
    state = extract_flow(sources=[str(DAPI)], store=str(tmp_path / "store"), processes=False, return_state=True)
    assert state.is_failed()
    assert "no slide succeeded" in str(state.result(raise_on_failure=False))


def test_flow_fails_on_wrong_settings_before_any_work(prefect_api, tmp_path):
    state = extract_flow(
        sources=[str(CMU)], store=str(tmp_path / "store"), overrides={"tissue.threshold": 2}, return_state=True
    )
    assert state.is_failed()
    assert "tissue.threshold" in str(state.result(raise_on_failure=False))
    assert not (tmp_path / "store").exists()


def _pathgen(args, api_url, cwd):
    env = dict(os.environ, PREFECT_API_URL=api_url, PREFECT_SERVER_ANALYTICS_ENABLED="false")
    return subprocess.run(
        [sys.executable, "-m", "pathgen", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_cli_extract_exit_codes_and_inspect(prefect_api, tmp_path):
    store = tmp_path / "store"
    ok = _pathgen(
        ["extract", str(SLIDES), "--store", str(store), "--set", "extract.group_size=1"], prefect_api, tmp_path
    )
    assert ok.returncode == 0, ok.stderr
    assert "1 ok" in ok.stdout and "1 failed" in ok.stdout and "no bright-field tissue" in ok.stdout
    assert f"pathgen inspect file://{store}" in ok.stdout
    assert (store / "patches" / f"{CMU.stem}.parquet").exists()
    assert json.loads((store / "slides" / DAPI.stem / "slide.json").read_text())["status"] == "failed"

    again = _pathgen(["extract", str(CMU), "--store", str(store)], prefect_api, tmp_path)
    assert again.returncode == 0 and "1 already done" in again.stdout

    none = _pathgen(["extract", str(DAPI), "--store", str(store)], prefect_api, tmp_path)
    assert none.returncode == 1 and "no slide succeeded" in none.stderr

    bad = _pathgen(["extract", str(CMU), "--set", "selection.method=best"], prefect_api, tmp_path)
    assert bad.returncode == 2 and "selection.method" in bad.stderr and "'random'" in bad.stderr
    usage = _pathgen(["extract"], prefect_api, tmp_path)
    assert usage.returncode == 2

    sheet = tmp_path / "sheet.png"
    shown = _pathgen(["inspect", str(store), "--out", str(sheet)], prefect_api, tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert "2 slide(s): 1 failed, 1 ok" in shown.stdout and "image: binary" in shown.stdout
    from PIL import Image

    assert Image.open(sheet).size[0] > 0
    one = _pathgen(["inspect", f"{store}/patches/{CMU.stem}.parquet", "--out", str(sheet)], prefect_api, tmp_path)
    assert one.returncode == 0 and "1 shard(s)" in one.stdout and "patches, schema 1" in one.stdout


def test_a_lost_worker_leaves_its_slides_pending_and_the_run_goes_on(prefect_api, tmp_path, monkeypatch):
    import tasks.slides.extract as extract_module

    real = extract_module.extract_slides

    def dies_on_dapi(refs, settings, logger=None):
        if any(r.slide_id == DAPI.stem for r in refs):
            raise MemoryError("worker killed")
        return real(refs, settings, logger)

    monkeypatch.setattr(extract_module, "extract_slides", dies_on_dapi)
    store = tmp_path / "store"
    overrides = {"extract.group_size": 1, "retries.task_retries": 0}
    state = extract_flow(
        sources=[str(CMU), str(DAPI)], store=str(store), overrides=overrides, processes=False, return_state=True
    )
    assert state.is_completed()
    summary = state.result()
    assert (summary["ok"], summary["failed"], summary["pending"]) == (1, 0, 1)
    (pending,) = summary["pending_slides"]
    assert pending["slide_id"] == DAPI.stem and "worker killed" in pending["error"]
    assert not (store / "slides" / DAPI.stem).exists()  # nothing on record: the next run does it
    table = _artifact("extract-slides", state.state_details.flow_run_id)
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert {r["slide"]: r["status"] for r in rows} == {CMU.stem: "ok", DAPI.stem: "pending"}

    monkeypatch.setattr(extract_module, "extract_slides", real)
    again = extract_flow(sources=[str(CMU), str(DAPI)], store=str(store), overrides=overrides, processes=False)
    assert (again["skipped"], again["failed"], again["pending"]) == (1, 1, 0)
    record = json.loads((store / "slides" / DAPI.stem / "slide.json").read_text())
    assert record["status"] == "failed" and "no bright-field tissue" in record["error"]


def test_cli_caption_before_any_extraction_names_the_store_and_the_fix(prefect_api, tmp_path):
    store = tmp_path / "store"
    run = _pathgen(["caption", "--store", str(store)], prefect_api, tmp_path)
    assert run.returncode == 1, run.stdout[-2000:] + run.stderr[-2000:]
    assert f"no patch shards in the store file://{store}" in run.stderr
    assert f"pathgen extract SOURCE --store file://{store}" in run.stderr
    assert "captioned" not in run.stdout
    assert not store.exists()  # nothing made for a run that had nothing to do

    store.mkdir()  # an existing but empty store says the same
    empty = _pathgen(["caption", "--store", str(store)], prefect_api, tmp_path)
    assert empty.returncode == 1 and "no patch shards" in empty.stderr, empty.stdout[-2000:] + empty.stderr[-2000:]
    assert not any(store.iterdir())


def test_caption_flow_on_an_empty_store_fails_naming_it_without_creating_it(prefect_api, tmp_path):
    from flows.caption import caption_flow

    store = tmp_path / "store"
    state = caption_flow(store=str(store), return_state=True)  # as a deployment would run it
    assert state.is_failed()
    error = str(state.result(raise_on_failure=False))
    assert f"no patch shards in the store file://{store}" in error and "pathgen extract SOURCE" in error
    assert not store.exists()


def _pathgen_settings(args, env, cwd):
    return subprocess.run(
        [sys.executable, "-m", "pathgen", "settings", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_settings_takes_map_entries_lists_and_refuses_an_unknown_variable(tmp_path):
    env = dict(os.environ, PATHGEN_SLIDES__PROJECTS__S1="TCGA-LUAD")
    shown = _pathgen_settings(["--set", "slides.mpp_overrides.nompp=0.5", "--set", "slides.roots=/a,/b"], env, tmp_path)
    assert shown.returncode == 0, shown.stderr
    slides = yaml.safe_load(shown.stdout)["slides"]
    assert slides["mpp_overrides"] == {"nompp": 0.5} and slides["projects"] == {"s1": "TCGA-LUAD"}
    assert slides["roots"] == ["/a", "/b"]

    typo = _pathgen_settings([], dict(env, PATHGEN_PATCH__TARGET_MP="0.25"), tmp_path)  # deliberately unknown
    assert typo.returncode == 2 and "did you mean PATHGEN_PATCH__TARGET_MPP" in typo.stderr, typo.stderr
