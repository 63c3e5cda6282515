"""One caption job split over real workers: a ``parts=2`` run of a deployment on a process pool built from the A100
template; the parent holds one worker while its two children are picked by two workers pinned to different GPUs
through their own CUDA_VISIBLE_DEVICES, which must reach the flow runs (the template must not override it)."""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from .conftest import CMU, write_tiff_slide

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.prefect
PARTS = 2


def _second_slide_name(first: str) -> str:
    """A name whose stable hash puts it in the other part than ``first``, so that both parts get a slide."""
    from tasks.work.units import part_of

    for index in range(100):
        name = f"CMU-crop-{index}"
        if part_of(name, PARTS) != part_of(first, PARTS):
            return name
    raise AssertionError("no name lands in the other part")


@pytest.fixture
def two_slide_store(extracted_store, cmu_rgb, tmp_path) -> Path:
    """The 12-patch CMU store plus a second slide (a crop of the same pixels) extracted into it."""
    from pathgen.settings import load_settings
    from tasks.slides.extract import extract_slide
    from tasks.slides.sources import resolve_sources
    from tasks.store.objects import Store

    root = tmp_path / "store"
    shutil.copytree(extracted_store, root)
    slide = tmp_path / "slides" / f"{_second_slide_name(CMU.stem)}.svs"
    slide.parent.mkdir()
    write_tiff_slide(slide, np.ascontiguousarray(cmu_rgb[:1536, :1536]), mpp=0.5)
    settings = load_settings(
        overrides={"store": str(root), "patch.patch_px": 224, "selection.max_per_slide": 4}, environ={}
    )
    outcome = extract_slide(resolve_sources([str(slide)], settings)[0], settings, Store(settings.store))
    assert outcome.status == "ok" and outcome.patches > 0, outcome
    return root


def _start_worker(pool: str, env: dict[str, str], log: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--limit", "1"]
    with open(log, "wb") as out:
        return subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (flow-run processes get a session of their own, out of the worker's group)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _stop(workers: list[subprocess.Popen]) -> None:
    for worker in workers:
        below = _descendants(worker.pid)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait(timeout=10)
        for pid in below:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("gpu", ["0", "1"])
def test_the_a100_template_passes_each_workers_gpu_through(gpu, monkeypatch):
    """Prefect merges the job env over the worker's own (process worker: ``{**os.environ, **job env}``), so a
    CUDA_VISIBLE_DEVICES in the template would pin every worker to the same GPU."""
    from prefect.client.schemas.objects import FlowRun
    from prefect.workers.process import ProcessJobConfiguration

    template = json.loads((ROOT / "deploy" / "pools" / "a100-process.json").read_text())
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", gpu)
    config = ProcessJobConfiguration(env=template["variables"]["properties"]["env"]["default"])
    config.prepare_for_flow_run(FlowRun(flow_id=uuid.uuid4()))
    assert config.env["CUDA_VISIBLE_DEVICES"] == gpu


@pytest.mark.timeout(600)  # three worker processes and three flow-run processes on a shared machine
def test_parts_run_on_separate_workers_with_their_own_gpus(prefect_api, tiny_models, two_slide_store, tmp_path):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        ArtifactFilterKey,
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterId,
    )
    from prefect.deployments import run_deployment
    from prefect.utilities.asyncutils import run_coro_as_sync

    cache, _ = tiny_models
    store = two_slide_store
    pool = f"pathgen-a100-{uuid.uuid4().hex[:6]}"
    template = json.loads((ROOT / "deploy" / "pools" / "a100-process.json").read_text())
    assert "CUDA_VISIBLE_DEVICES" not in template["variables"]["properties"]["env"]["default"]

    async def create_pool():
        async with get_client() as client:
            await client.create_work_pool(WorkPoolCreate(name=pool, type="process", base_job_template=template))

    run_coro_as_sync(create_pool())
    source = flow.from_source(source=str(ROOT), entrypoint="flows/caption.py:caption_flow")
    deployment_id = source.deploy(
        name=f"caption-parts-{uuid.uuid4().hex[:6]}",
        work_pool_name=pool,
        parameters={
            "store": str(store),
            "overrides": {
                "agents.model_cache": str(cache),
                "retries.task_retries": 0,
                # short replies: the random-weight models would ramble to the full budgets on a CPU
                **{f"agents.{role}.max_new_tokens": 16 for role in ("describe", "revise", "summarize")},
            },
            "parts": PARTS,
        },
        print_next_steps=False,
    )
    parent = run_deployment(deployment_id, timeout=0)

    async def runs():
        async with get_client() as client:
            return await client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
            )

    async def read(run_id):
        async with get_client() as client:
            return await client.read_flow_run(run_id)

    async def artifact(run_id, key):
        query = ArtifactFilter(key=ArtifactFilterKey(any_=[key]), flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]))
        async with get_client() as client:
            found = await client.read_artifacts(artifact_filter=query)
        assert len(found) == 1, (key, run_id, found)
        data = found[0].data
        return json.loads(data) if isinstance(data, str) else data

    async def parent_task_runs():
        async with get_client() as client:
            tasks = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[parent.id])))
        return {t.id for t in tasks}

    base = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    base.update(PREFECT_API_URL=prefect_api, PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_WORKER_QUERY_SECONDS="1")
    logs = {name: tmp_path / f"worker-{name}.log" for name in ("parent", "gpu0", "gpu1")}
    workers: list[subprocess.Popen] = []

    def wait_for(what: str, check, timeout: float):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if found := check():
                return found
            if any(w.poll() is not None for w in workers):
                break
            time.sleep(1)
        tails = {name: log.read_text(errors="replace")[-3000:] for name, log in logs.items() if log.exists()}
        state = run_coro_as_sync(read(parent.id)).state
        pytest.fail(f"timed out waiting for {what}; parent {state}; workers: {json.dumps(tails, indent=1)}")

    def started_parts():
        found = [r for r in run_coro_as_sync(runs()) if r.id != parent.id]
        return found if len(found) == PARTS else None

    try:
        workers.append(_start_worker(pool, base, logs["parent"]))
        wait_for("the parent run to be Running", lambda: run_coro_as_sync(read(parent.id)).state.is_running(), 120)
        children = wait_for("the parent to start its parts", started_parts, 90)
        # Both children are scheduled: start both GPU workers together, so each (limit 1) takes one part.
        workers.append(_start_worker(pool, {**base, "CUDA_VISIBLE_DEVICES": "0"}, logs["gpu0"]))
        workers.append(_start_worker(pool, {**base, "CUDA_VISIBLE_DEVICES": "1"}, logs["gpu1"]))
        finished = wait_for(
            "the parent run to finish",
            lambda: (r := run_coro_as_sync(read(parent.id))).state.is_final() and r,
            300,
        )
    finally:
        _stop(workers)

    parts_table = run_coro_as_sync(artifact(parent.id, "parts"))
    shown = json.dumps(parts_table, indent=1)
    print("parts table:\n" + shown)
    assert finished.state.is_completed(), (finished.state, shown)
    assert len(parts_table) == PARTS and all(row["state"] == "Completed" for row in parts_table), shown

    # The children: two runs of this deployment, each a subflow of the parent, each Completed.
    children = [run_coro_as_sync(read(c.id)) for c in children]
    assert len(children) == PARTS
    assert {c.parent_task_run_id for c in children} <= run_coro_as_sync(parent_task_runs()), shown
    assert all(c.state.is_completed() for c in children), [(c.name, c.state) for c in children]
    assert {c.parameters["part"] for c in children} == set(range(PARTS))

    # Each child ran on its own worker: one on GPU 0, one on GPU 1, in different processes.
    worker_of = {}
    for child in children:
        (row,) = run_coro_as_sync(artifact(child.id, "worker"))
        assert row["part"] == str(child.parameters["part"]) and row["parts"] == str(PARTS)
        worker_of[int(row["part"])] = row
    assert sorted(w["cuda_visible_devices"] for w in worker_of.values()) == ["0", "1"], shown
    assert len({w["pid"] for w in worker_of.values()}) == PARTS, shown
    for row in parts_table:
        part = worker_of[int(row["part"])]
        assert (row["cuda_visible_devices"], row["pid"]) == (part["cuda_visible_devices"], part["pid"]), shown

    # Every patch captioned exactly once over the parts: one pair shard per slide, written by its part's worker.
    from tasks.work.units import part_of

    patch_ids = {}
    for shard in sorted((store / "patches").glob("*.parquet")):
        patch_ids[shard.stem] = pq.read_table(shard, columns=["patch_id"])["patch_id"].to_pylist()
    assert len(patch_ids) == PARTS and {part_of(s, PARTS) for s in patch_ids} == set(range(PARTS))
    (pairs_dir,) = (store / "pairs").iterdir()
    pair_shards = sorted(pairs_dir.glob("*.parquet"))
    assert [p.stem for p in pair_shards] == sorted(patch_ids), pair_shards
    seen = []
    for pair_shard in pair_shards:
        slide_id = pair_shard.stem
        failed = store / "failed" / pairs_dir.name / f"{slide_id}.parquet"
        ids = pq.read_table(pair_shard, columns=["patch_id"])["patch_id"].to_pylist()
        ids += pq.read_table(failed, columns=["patch_id"])["patch_id"].to_pylist() if failed.exists() else []
        assert sorted(ids) == sorted(patch_ids[slide_id]), slide_id
        seen += ids
        metadata = {k.decode(): v.decode() for k, v in (pq.read_schema(pair_shard).metadata or {}).items()}
        writer = json.loads(metadata["pathgen.worker"])
        expected = worker_of[part_of(slide_id, PARTS)]
        assert (writer["cuda_visible_devices"], writer["pid"]) == (expected["cuda_visible_devices"], expected["pid"])
    assert len(seen) == len(set(seen)) == sum(len(ids) for ids in patch_ids.values())
