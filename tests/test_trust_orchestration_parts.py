"""The parent of a ``parts=N`` run waits at most ``parts.timeout_seconds``: children that never started are cancelled
and reported with the reason Prefect's objects give (no worker online, pool paused, the deployment's concurrency
slots taken), and a parent that holds the only slot of its deployment runs the parts itself instead of waiting for
children that could never start. Against the real (ephemeral) Prefect API of the test session, without workers."""

from __future__ import annotations

import logging
import threading
import time
import uuid

import pytest

pytestmark = [pytest.mark.prefect, pytest.mark.filterwarnings("ignore:Artifact creation outside:FutureWarning")]
LOGGER = logging.getLogger("test-parts")


def _run(coro):
    from prefect.utilities.asyncutils import run_coro_as_sync

    return run_coro_as_sync(coro)


def _deployment(flow_name: str, concurrency_limit: int | None = None) -> tuple[str, str]:
    """(pool name, deployment id): a process pool with no worker and a deployment of ``flow_name`` in it."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    pool = f"parts-pool-{uuid.uuid4().hex[:8]}"

    async def create():
        async with get_client() as client:
            await client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
            flow_id = await client.create_flow_from_name(flow_name)
            deployment_id = await client.create_deployment(
                flow_id,
                f"{flow_name}-{uuid.uuid4().hex[:6]}",
                work_pool_name=pool,
                concurrency_limit=concurrency_limit,
                entrypoint="nowhere.py:nothing",
            )
        return pool, str(deployment_id)

    return _run(create())


def _children(deployment_id: str, count: int) -> list:
    from prefect.client.orchestration import get_client

    async def create():
        async with get_client() as client:
            return [await client.create_flow_run_from_deployment(deployment_id) for _ in range(count)]

    return _run(create())


def _states(runs: list) -> list:
    from prefect.client.orchestration import get_client

    async def read():
        async with get_client() as client:
            return [(await client.read_flow_run(r.id)).state for r in runs]

    return _run(read())


def test_children_no_worker_takes_are_cancelled_at_the_deadline_with_the_reason(prefect_api):
    from tasks.work.parts import wait_for_parts

    pool, deployment_id = _deployment("parts-no-worker")
    children = _children(deployment_id, 2)
    started = time.monotonic()
    reports = wait_for_parts(children, timeout_seconds=1.0, logger=LOGGER, poll_seconds=0.2)
    assert time.monotonic() - started < 30
    assert [r["part"] for r in reports] == [0, 1]
    for report in reports:
        assert report["state"].startswith("never started"), report
        assert f"no worker is online on work pool {pool}" in report["reason"], report
    assert [s.type.value for s in _states(children)] == ["CANCELLED", "CANCELLED"]  # nobody runs them later


def test_a_paused_pool_is_named(prefect_api):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolUpdate

    from tasks.work.parts import wait_for_parts

    pool, deployment_id = _deployment("parts-paused")

    async def pause():
        async with get_client() as client:
            await client.update_work_pool(pool, WorkPoolUpdate(is_paused=True))

    _run(pause())
    [report] = wait_for_parts(_children(deployment_id, 1), timeout_seconds=0.5, logger=LOGGER, poll_seconds=0.2)
    assert f"work pool {pool} is paused" in report["reason"], report


def test_taken_deployment_slots_are_named(prefect_api):
    from prefect.client.orchestration import get_client
    from prefect.states import Pending

    from tasks.work.parts import wait_for_parts

    _, deployment_id = _deployment("parts-slots", concurrency_limit=1)
    holder, child = _children(deployment_id, 2)

    async def propose_pending():  # what a worker does before it starts a run: the server hands out the slot
        async with get_client() as client:
            await client.set_flow_run_state(holder.id, Pending())
            await client.set_flow_run_state(child.id, Pending())

    _run(propose_pending())
    assert _states([child])[0].name == "AwaitingConcurrencySlot"
    [report] = wait_for_parts([child], timeout_seconds=0.5, logger=LOGGER, poll_seconds=0.2)
    assert "concurrency limit is reached: 1 of 1 slots held" in report["reason"], report


def test_a_parent_holding_the_only_slot_runs_the_parts_itself(prefect_api, monkeypatch):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    from tasks.work import parts as parts_module

    @flow(name="parts-one-slot")
    def stage_flow(parts: int = 1, part: int | None = None) -> dict:
        return {"slides": 1, "ok": 1}

    _, deployment_id = _deployment("parts-one-slot", concurrency_limit=1)
    monkeypatch.setattr(parts_module, "current_deployment_id", lambda: deployment_id)  # the parent is its run
    result = {}
    worker = threading.Thread(
        target=lambda: result.update(parts_module.run_parts("parts-one-slot", stage_flow, {}, 2, LOGGER)),
        daemon=True,
    )
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), "the parent waited for children that could not start"
    assert result["ok"] == 2 and result["lost_parts"] == []

    async def child_runs():
        async with get_client() as client:
            return await client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
            )

    assert _run(child_runs()) == []  # no child run was started that could never get the slot


def test_the_parent_gives_up_after_parts_timeout_seconds_and_reports_the_lost_parts(prefect_api, monkeypatch):
    from tasks.work import parts as parts_module

    pool, deployment_id = _deployment("parts-deadline")  # no concurrency limit, no worker
    monkeypatch.setattr(parts_module, "current_deployment_id", lambda: deployment_id)
    parameters = {"overrides": {"parts.timeout_seconds": 1}}
    started = time.monotonic()
    summary = parts_module.run_parts("parts-deadline", None, parameters, 2, LOGGER)
    assert time.monotonic() - started < 60
    assert summary["lost_parts"] == [0, 1]
    for part in summary["parts"]:
        assert part["state"].startswith("never started") and f"work pool {pool}" in part["reason"], part


def test_the_command_prints_why_a_part_never_started(capsys):
    from pathgen.cli import report_parts_and_pending

    reason = "no worker is online on work pool gpus (start one: prefect worker start --pool gpus)"
    part = {"part": 1, "state": "never started (Scheduled)", "flow_run": "caption-part-1-of-2", "reason": reason}
    summary = {"parts": [part], "random_weights": False, "pending": 0, "pending_slides": [], "lost_parts": [1]}
    assert report_parts_and_pending("caption", summary, "", "next step") is True
    out, err = capsys.readouterr()
    assert f"part 1: never started (Scheduled) caption-part-1-of-2: {reason}" in out
    assert f"part 1: {reason}" in err and "part(s) 1 did not finish" in err and "run again" in err
