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
