"""A real deployment run: the extract deployment on a process work pool, picked up by `prefect worker start`."""

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from .conftest import CMU

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.prefect


def test_extract_deployment_runs_on_a_process_worker(prefect_api, tmp_path):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.deployments import run_deployment
    from prefect.utilities.asyncutils import run_coro_as_sync

    pool = f"pathgen-cpu-{uuid.uuid4().hex[:6]}"
    template = json.loads((ROOT / "deploy" / "pools" / "cpu-process.json").read_text())

    async def create_pool():
        async with get_client() as client:
            await client.create_work_pool(WorkPoolCreate(name=pool, type="process", base_job_template=template))

    run_coro_as_sync(create_pool())
    store = tmp_path / "store"
    source = flow.from_source(source=str(ROOT), entrypoint="flows/extract.py:extract_flow")
    source.deploy(
        name="extract-test",
        work_pool_name=pool,
        parameters={"sources": [str(CMU)], "store": str(store), "overrides": {"patch.patch_px": 224}},
        print_next_steps=False,
    )
    scheduled = run_deployment("extract/extract-test", timeout=0)
    env = dict(os.environ, PREFECT_API_URL=prefect_api, PREFECT_SERVER_ANALYTICS_ENABLED="false")
    worker = subprocess.run(
        [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--run-once"],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert worker.returncode == 0, worker.stdout[-2000:] + worker.stderr[-2000:]

    async def read_run():
        async with get_client() as client:
            return await client.read_flow_run(scheduled.id)

    finished = run_coro_as_sync(read_run())
    assert finished.state.is_completed(), (finished.state, worker.stdout[-3000:])
    assert (store / "patches" / f"{CMU.stem}.parquet").exists()
    assert json.loads((store / "slides" / CMU.stem / "slide.json").read_text())["status"] == "ok"


# -- the whole-slide stages: the factory deployment with --stages features,train-mil --------------------------------


def _process_pool(template_file: str) -> str:
    """A new process work pool on the test API with one of deploy/pools/ as its base job template."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.utilities.asyncutils import run_coro_as_sync

    pool = f"pathgen-test-{uuid.uuid4().hex[:6]}"
    template = json.loads((ROOT / "deploy" / "pools" / template_file).read_text())

    async def create_pool():
        async with get_client() as client:
            await client.create_work_pool(WorkPoolCreate(name=pool, type="process", base_job_template=template))

    run_coro_as_sync(create_pool())
    return pool


def _work_once(prefect_api: str, pool: str, run_id) -> tuple:
    """`prefect worker start --run-once` on ``pool`` (this process's S3 environment passes through, as a stack
    worker's does); returns the flow run as the API has it when the worker exits, and the worker's output."""
    from prefect.client.orchestration import get_client
    from prefect.utilities.asyncutils import run_coro_as_sync

    env = dict(os.environ, PREFECT_API_URL=prefect_api, PREFECT_SERVER_ANALYTICS_ENABLED="false")
    worker = subprocess.run(
        [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--run-once"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert worker.returncode == 0, worker.stdout[-2000:] + worker.stderr[-2000:]

    async def read_run():
        async with get_client() as client:
            return await client.read_flow_run(run_id)

    return run_coro_as_sync(read_run()), worker.stdout[-3000:] + worker.stderr[-3000:]


def _factory_report(run_id) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
    from prefect.utilities.asyncutils import run_coro_as_sync

    async def read():
        async with get_client() as client:
            found = await client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]))
            )
            return next(a.data for a in found if a.key == "factory-report")

    return run_coro_as_sync(read())


@pytest.mark.timeout(420)
def test_factory_deployment_runs_features_then_train_mil_on_s3(prefect_api, bucket, tmp_path):
    """The factory deployment, picked up by a process worker of the GPU pool's template, with --stages
    features,train-mil on small slides in S3's store (SeaweedFS): every slide featured, one MIL run trained and
    evaluated, its eval JSON and test heatmaps written, and the report's whole-slide table. Tiny settings: it checks
    that the stages run and write their files, not what the model learns (tests/test_mil_learn*.py does)."""
    from prefect import flow
    from prefect.deployments import run_deployment

    from tasks.store.objects import Store

    from .mil_slides import build_slides, write_task

    slides = build_slides(tmp_path / "slides", {"train": 2, "val": 2, "test": 2})
    task = write_task(slides, tmp_path / "wsi-task.csv")
    tiny = {"features.target_mpp": 2.0, "features.batch_size": 64, "mil.task": str(task), "mil.epochs": 2,
            "mil.learning_rates": [1e-3], "mil.seeds": 1, "mil.heatmap_top_k": 2}  # fmt: skip
    pool = _process_pool("a100-process.json")
    flow.from_source(source=str(ROOT), entrypoint="flows/factory.py:factory_flow").deploy(
        name="whole-slide-test",
        work_pool_name=pool,
        parameters={"sources": [str(tmp_path / "slides")], "store": bucket, "stages": ["features", "train-mil"],
                    "overrides": tiny},
        print_next_steps=False,
    )  # fmt: skip
    scheduled = run_deployment("factory/whole-slide-test", timeout=0)
    finished, output = _work_once(prefect_api, pool, scheduled.id)
    assert finished.state.is_completed(), (finished.state, output)

    store = Store(bucket)
    manifests = store.list("features", "/features.json")
    assert len(manifests) == 1, manifests
    features_hash = manifests[0].split("/")[1]
    featured = {k.rsplit("/", 1)[1] for k in store.list(f"features/{features_hash}", ".parquet")}
    assert featured == {f"{s.slide_id}.parquet" for s in slides}
    runs = store.list("models/mil", "/run.json")
    assert len(runs) == 1 and runs[0].split("/")[2].startswith("wsi-task-abmil-"), runs
    run = runs[0].split("/")[2]
    assert store.list(f"models/mil/{run}", "metrics.jsonl")
    result = store.read_json(f"eval/mil/{run}/wsi-task.json")
    assert result["features"]["source"] == features_hash and result["random_weights"] is True
    assert set(result["mean"]) >= {"accuracy", "balanced_accuracy", "macro_f1", "auc"}
    heatmaps = {k.rsplit("/", 1)[1] for k in store.list(f"eval/mil/{run}/heatmaps", ".png")}
    assert heatmaps == {f"{s.slide_id}.png" for s in slides if s.split == "test"}

    report = _factory_report(scheduled.id)
    for expected in ("| features | Completed", "| train-mil | Completed", "RANDOM WEIGHTS used by: features, train-mil",
                     "## Whole-slide tasks", "### Task wsi-task", f"| {run} | 0.001 |", features_hash):  # fmt: skip
        assert expected in report, report
