"""The parent of a ``parts=N`` run waits at most ``parts.timeout_seconds``: children that never started are cancelled
and reported with the reason Prefect's objects give (no worker online, pool paused, the deployment's concurrency
slots taken), and a parent that holds the only slot of its deployment runs the parts itself instead of waiting for
children that could never start. Against the real (ephemeral) Prefect API of the test session, without workers."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from types import SimpleNamespace

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
        target=lambda: result.update(parts_module.run_parts("parts-one-slot", stage_flow, {}, 2, LOGGER, 3600)),
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
    started = time.monotonic()
    summary = parts_module.run_parts("parts-deadline", None, {}, 2, LOGGER, timeout_seconds=1)
    assert time.monotonic() - started < 60
    assert summary["lost_parts"] == [0, 1]
    for part in summary["parts"]:
        assert part["state"].startswith("never started") and f"work pool {pool}" in part["reason"], part


def test_the_command_prints_why_a_part_never_started(capsys):
    from pathgen.cli.runs import report_parts_and_pending

    reason = "no worker is online on work pool gpus (start one: prefect worker start --pool gpus)"
    part = {"part": 1, "state": "never started (Scheduled)", "flow_run": "caption-part-1-of-2", "reason": reason}
    summary = {"parts": [part], "random_weights": False, "pending": 0, "pending_slides": [], "lost_parts": [1]}
    assert report_parts_and_pending("caption", summary, "", "next step") is True
    out, err = capsys.readouterr()
    assert f"part 1: never started (Scheduled) caption-part-1-of-2: {reason}" in out
    assert f"part 1: {reason}" in err and "part(s) 1 did not finish" in err and "run again" in err


def test_a_child_a_worker_started_after_the_last_poll_is_not_cancelled(prefect_api, monkeypatch):
    from prefect.client.orchestration import get_client
    from prefect.states import Pending, Running

    from tasks.work import parts as parts_module

    _, deployment_id = _deployment("parts-late-start")
    late, idle = _children(deployment_id, 2)
    polled = parts_module._read

    async def poll_then_a_worker_starts_one(run_ids):
        runs = await polled(run_ids)
        if parts_module._read is poll_then_a_worker_starts_one:  # only after the last poll before the deadline
            monkeypatch.setattr(parts_module, "_read", polled)
            async with get_client() as client:
                await client.set_flow_run_state(late.id, Pending())
                await client.set_flow_run_state(late.id, Running())
        return runs

    monkeypatch.setattr(parts_module, "_read", poll_then_a_worker_starts_one)
    reports = parts_module.wait_for_parts([late, idle], timeout_seconds=0, logger=LOGGER, poll_seconds=0.2)
    assert [s.type.value for s in _states([late, idle])] == ["RUNNING", "CANCELLED"]
    assert reports[0]["state"] == "Running (unfinished)" and "it goes on" in reports[0]["reason"], reports[0]
    assert reports[1]["state"].startswith("never started"), reports[1]


class _RefusingClient:
    """A Prefect client whose server rejects the cancellation: the run moved on (a worker started it) meanwhile."""

    def __init__(self):
        self.reads = 0

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        return False

    async def read_flow_run(self, run_id):
        self.reads += 1
        kind = "SCHEDULED" if self.reads == 1 else "RUNNING"
        state = SimpleNamespace(type=SimpleNamespace(value=kind), name=kind.title(), message=None)
        return SimpleNamespace(id=run_id, name="late", state=state, deployment_id=None, work_pool_name=None)

    async def set_flow_run_state(self, run_id, state, force=False):
        from prefect.client.schemas.responses import SetStateStatus

        assert not force  # orchestration rules decide
        return SimpleNamespace(status=SetStateStatus.REJECT, state=None, details=SimpleNamespace(reason="running"))


def test_a_rejected_cancellation_reports_the_run_as_it_is(monkeypatch):
    from tasks.work import parts as parts_module

    monkeypatch.setattr(parts_module, "get_client", _RefusingClient)
    unfinished = parts_module.run_coro_as_sync(parts_module._give_up(["run-1"], 5))
    assert unfinished == {
        0: ("Running (unfinished)", "still running when parts.timeout_seconds (5 s) ran out; it goes on")
    }


def test_a_reason_that_cannot_be_read_hides_the_api_credentials():
    from tasks.work.parts import why_waiting

    class Failing:
        async def read_work_pool(self, name):
            raise RuntimeError("cannot reach https://admin:s3cret@prefect.example:4200/api/work_pools/gpus")

    state = SimpleNamespace(type=SimpleNamespace(value="SCHEDULED"), name="Scheduled", message=None)
    run = SimpleNamespace(state=state, deployment_id=None, work_pool_name="gpus", work_queue_name=None)
    reason = _run(why_waiting(Failing(), run))
    assert "could not read why (RuntimeError" in reason and "prefect.example" in reason, reason
    assert "s3cret" not in reason and "admin" not in reason, reason


@pytest.mark.parametrize("held", ["pool", "queue"])
def test_a_parent_holding_the_only_slot_of_its_work_pool_or_queue_runs_the_parts_itself(prefect_api, monkeypatch, held):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolUpdate
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    from tasks.work import parts as parts_module

    @flow(name="parts-one-pool-slot")
    def stage_flow(parts: int = 1, part: int | None = None) -> dict:
        return {"slides": 1, "ok": 1}

    pool, deployment_id = _deployment("parts-one-pool-slot")  # no deployment limit: the pool's or queue's binds

    async def limit_and_start_the_parent():
        async with get_client() as client:
            if held == "pool":
                await client.update_work_pool(pool, WorkPoolUpdate(concurrency_limit=1))
            else:
                queue = (await client.read_work_pool(pool)).default_queue_id
                await client.update_work_queue(queue, concurrency_limit=1)
            return await client.create_flow_run_from_deployment(deployment_id)

    parent = _run(limit_and_start_the_parent())
    monkeypatch.setattr(parts_module, "current_deployment_id", lambda: deployment_id)
    monkeypatch.setattr(parts_module, "root_flow_run_id", lambda: parent.id)
    result = {}
    worker = threading.Thread(
        target=lambda: result.update(parts_module.run_parts("parts-one-pool-slot", stage_flow, {}, 2, LOGGER, 3600)),
        daemon=True,
    )
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), "the parent waited for children that could not start"
    assert result["ok"] == 2 and result["lost_parts"] == []

    async def runs_of_the_deployment():
        async with get_client() as client:
            return await client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
            )

    assert [r.id for r in _run(runs_of_the_deployment())] == [parent.id]  # no child run that could never start
