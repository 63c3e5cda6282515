"""Many workers, one job: a flow run with ``parts=N`` that runs as a deployment starts each part as a child flow
run of the same deployment, so that every worker of the pool can take one; outside a deployment the parts run
one after another in this process. Each run records which worker ran it (host, pid, CUDA_VISIBLE_DEVICES) as
its ``worker`` artifact, and the parent reports every part from its children's states and artifacts.

The parent waits at most ``parts.timeout_seconds``. A child that has not started by then is cancelled and reported
with the reason Prefect's objects give (the deployment's concurrency slots taken, the work pool or queue paused or
full, no worker online, every worker busy); while it waits, the parent logs such reasons as they change. The parent
never waits on a slot only it holds: when a concurrency limit of 1 that it holds itself (its deployment's, or its work
pool's or work queue's when the children go there too) leaves its children none, it runs the parts itself."""

from __future__ import annotations

import json
import logging
import re
import time
from typing import Any

from prefect.artifacts import create_table_artifact
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound
from prefect.utilities.asyncutils import run_coro_as_sync

from pathgen.errors import short_error
from tasks.work.units import worker_identity

FINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
NOT_STARTED = ("SCHEDULED", "PENDING")  # state types of a child run that no worker has started yet
REASON_EVERY_S = 30.0  # how often a waiting parent looks up, and logs when it changed, why a child has not started


def current_deployment_id() -> str | None:
    from prefect.runtime import deployment

    return deployment.id


def root_flow_run_id() -> str | None:
    """The flow run a worker started, whose slots of its work pool and queue this run (maybe a subflow) holds."""
    from prefect.runtime import flow_run

    return flow_run.root_flow_run_id if flow_run.id else None


def record_worker(stage: str, part: int | None, parts: int) -> dict[str, str]:
    """This run's worker, as an artifact the parent (and a person in the UI) can read."""
    worker = {"stage": stage, "part": "-" if part is None else str(part), "parts": str(parts), **worker_identity()}
    create_table_artifact([worker], key="worker", description="the worker that ran this flow run")
    return worker


async def _stage_deployment(deployment_id: str, stage: str) -> str:
    async with get_client() as client:
        deployment = await client.read_deployment(deployment_id)
        if (await client.read_flow(deployment.flow_id)).name == stage:
            return deployment_id
        try:  # the stage runs inside another deployment's flow (the factory): its parts go to the stage's own
            return str((await client.read_deployment_by_name(f"{stage}/{stage}")).id)
        except ObjectNotFound:
            raise RuntimeError(
                f"{stage} with parts > 1 inside the {deployment.name} deployment runs its parts on the {stage}/{stage} "
                "deployment, which does not exist: register it (prefect --no-prompt deploy --all) or use parts=1"
            ) from None


def start_parts(
    stage: str, deployment_id: str, parameters: dict[str, Any], parts: int, logger: logging.Logger
) -> list[Any]:
    """One child flow run per part of the stage's deployment; returns them at once (they run on the pool's workers)."""
    children = []
    for part in range(parts):
        child = run_deployment(
            deployment_id,
            parameters={**parameters, "parts": parts, "part": part},
            flow_run_name=f"{stage}-part-{part}-of-{parts}",
            timeout=0,
            as_subflow=True,
        )
        logger.info("part %d of %d: flow run %s", part, parts, child.name)
        children.append(child)
    return children


async def _slot_shortage(deployment_id: str, root_run_id: str | None) -> str | None:
    """Why no child of the stage's deployment could ever start while this parent waits, or None.

    The parent holds, until it ends, one slot of each concurrency limit that binds a flow run: of its deployment's
    (the children's too, unless the stage runs inside another deployment's flow, the factory), of its work pool's
    and of its work queue's (those of ``root_run_id``, the run a worker started). A limit of 1 on one the children
    share leaves them none. Tag limits (``gpu``) are not
    held: they bind task runs, which take a flow run's tags only from their own decorator, and the parent waits
    outside any task.
    """
    async with get_client() as client:
        deployment = await client.read_deployment(deployment_id)
        own = str(current_deployment_id()) == str(deployment_id)
        held = _deployment_slot_held(deployment) if own else None
        return held or await _pool_slot_held(client, deployment, root_run_id)


def _deployment_slot_held(deployment: Any) -> str | None:
    limit = deployment.global_concurrency_limit
    if limit is None or not limit.active or limit.limit > 1:
        return None
    return (
        f"the {deployment.name} deployment's concurrency limit is {limit.limit} and this parent run holds that slot "
        "until it ends, so no child run of it could start"
    )


async def _pool_slot_held(client: Any, deployment: Any, root_run_id: str | None) -> str | None:
    """The parent's work pool, or its work queue, when the children go there too and its concurrency limit is 1."""
    if not root_run_id or not deployment.work_pool_name:
        return None
    parent = await client.read_flow_run(root_run_id)
    if parent.work_pool_name != deployment.work_pool_name:
        return None
    held = "and this parent run holds that slot until it ends, so no child run on it could start"
    pool = await client.read_work_pool(parent.work_pool_name)
    if pool.concurrency_limit is not None and pool.concurrency_limit <= 1:
        return f"work pool {pool.name}'s concurrency limit is {pool.concurrency_limit} {held}"
    if not parent.work_queue_name or parent.work_queue_name != deployment.work_queue_name:
        return None
    queue = await client.read_work_queue_by_name(parent.work_queue_name, work_pool_name=pool.name)
    if queue.concurrency_limit is not None and queue.concurrency_limit <= 1:
        return (
            f"work queue {queue.name} of pool {pool.name} has a concurrency limit of {queue.concurrency_limit} {held}"
        )
    return None


async def _read(run_ids: list[Any]) -> list[Any]:
    async with get_client() as client:
        return [await client.read_flow_run(run_id) for run_id in run_ids]


async def _artifact_row(run_id: Any, key: str) -> dict[str, Any]:
    query = ArtifactFilter(key=ArtifactFilterKey(any_=[key]), flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]))
    async with get_client() as client:
        found = await client.read_artifacts(artifact_filter=query)
    if not found:
        return {}
    data = found[0].data
    rows = json.loads(data) if isinstance(data, str) else data
    return rows[0] if rows else {}


def _final(run: Any) -> bool:
    return bool(run.state) and run.state.type.value in FINAL


def _not_started(run: Any) -> bool:
    return not run.state or run.state.type.value in NOT_STARTED


def wait_for_parts(
    children: list[Any], timeout_seconds: float, logger: logging.Logger, poll_seconds: float = 2.0
) -> list[dict[str, Any]]:
    """Wait until every child run is final, or ``timeout_seconds`` (``parts.timeout_seconds``) have passed; one
    report row per part. At the deadline a child that never started is cancelled and its row gives Prefect's reason
    (:func:`why_waiting`); one still running is left to finish. While waiting, why a child has not started yet is
    logged every ``REASON_EVERY_S`` seconds, once per new reason."""
    deadline = time.monotonic() + timeout_seconds
    next_look, told = time.monotonic() + REASON_EVERY_S, {}
    runs = run_coro_as_sync(_read([c.id for c in children]))
    while not all(_final(r) for r in runs) and time.monotonic() < deadline:
        if time.monotonic() >= next_look:
            _tell_waiting(runs, told, logger)
            next_look = time.monotonic() + REASON_EVERY_S
        time.sleep(max(0.0, min(poll_seconds, deadline - time.monotonic())))
        runs = run_coro_as_sync(_read([c.id for c in children]))
    unfinished = {}
    if not all(_final(r) for r in runs):
        unfinished = run_coro_as_sync(_give_up([c.id for c in children], timeout_seconds))
        runs = run_coro_as_sync(_read([c.id for c in children]))  # as they ended, for the parts that did finish
    reports = [_part_report(part, run, unfinished.get(part)) for part, run in enumerate(runs)]
    create_table_artifact(reports, key="parts", description="the child flow run of each part, and its worker")
    return reports


def _tell_waiting(runs: list[Any], told: dict[int, str], logger: logging.Logger) -> None:
    for part, run in enumerate(runs):
        if _not_started(run):
            reason = run_coro_as_sync(_why(run))
            if told.get(part) != reason:
                logger.warning("part %d (flow run %s) has not started: %s", part, run.name, reason)
                told[part] = reason


async def _give_up(run_ids: list[Any], timeout_seconds: float) -> dict[int, tuple[str, str]]:
    """At the deadline: part -> (state, reason) of each child that is not final; cancels those that never started.

    Each run is read again just before it is cancelled, not taken from the last poll: a child that a worker started
    in between goes on and is reported unfinished, never cancelled as "never started". Once Cancelled, Prefect
    refuses a worker's Pending proposal for it, so a worker that takes it later does not start it."""
    unfinished = {}
    async with get_client() as client:
        for part, run_id in enumerate(run_ids):
            run = await client.read_flow_run(run_id)
            if _final(run):
                continue
            if _not_started(run):
                run, stopped = await _cancel_unstarted(client, run, timeout_seconds)
                if stopped:
                    unfinished[part] = stopped
                    continue
            if not _final(run):
                reason = f"still running when parts.timeout_seconds ({timeout_seconds:g} s) ran out; it goes on"
                unfinished[part] = (f"{run.state.name} (unfinished)", reason)
    return unfinished


async def _cancel_unstarted(client: Any, run: Any, timeout_seconds: float) -> tuple[Any, tuple[str, str] | None]:
    """Cancel ``run``, which has not started: (the run, (state, reason) for its report); the report is None, and the
    run read again, when Prefect rejected the cancellation because the run moved on in the meantime."""
    from prefect.client.schemas.responses import SetStateStatus
    from prefect.states import Cancelled, Cancelling

    reason = await why_waiting(client, run)
    message = f"never started within parts.timeout_seconds ({timeout_seconds:g} s): {reason}"
    stop = Cancelling if run.state and run.state.type.value == "PENDING" else Cancelled
    result = await client.set_flow_run_state(run.id, stop(message=message))  # not forced: orchestration rules hold
    if result.status != SetStateStatus.ACCEPT:
        return await client.read_flow_run(run.id), None
    return run, (f"never started ({run.state.name if run.state else 'no state'})", reason)


async def _why(run: Any) -> str:
    async with get_client() as client:
        return await why_waiting(client, run)


async def why_waiting(client: Any, run: Any) -> str:
    """Why Prefect has not started ``run`` (Scheduled or Pending): the deployment's concurrency slots taken, its
    work pool or queue paused or at its concurrency limit, no worker online, or every online worker busy."""
    try:
        reasons = await _deployment_reasons(client, run) + await _pool_reasons(client, run)
    except Exception as exc:  # noqa: BLE001 - a reason that cannot be read must not sink the parent's report
        reasons = [f"could not read why ({short_error(exc)})"]
    if run.state and run.state.type.value == "PENDING":
        reasons.append("a worker took it (Pending) but its flow run process did not start; see the worker's log")
    if not reasons:
        message = run.state.message if run.state and run.state.message else "no reason given"
        reasons.append(f"{run.state.name if run.state else 'no state'}: {message}")
    return "; ".join(reasons)


async def _deployment_reasons(client: Any, run: Any) -> list[str]:
    if not (run.state and run.state.name == "AwaitingConcurrencySlot" and run.deployment_id):
        return []
    deployment = await client.read_deployment(run.deployment_id)
    limit = deployment.global_concurrency_limit
    held = f"{limit.active_slots} of {limit.limit} slots held" if limit else "slots held"
    parent = " (this parent holds one of them)" if str(current_deployment_id()) == str(run.deployment_id) else ""
    return [f"the {deployment.name} deployment's concurrency limit is reached: {held}{parent}"]


async def _pool_reasons(client: Any, run: Any) -> list[str]:
    if not run.work_pool_name:
        return []
    name = run.work_pool_name
    pool = await client.read_work_pool(name)
    reasons = [f"work pool {name} is paused (prefect work-pool resume {name})"] if pool.is_paused else []
    if pool.concurrency_limit is not None and (pool.active_slots or 0) >= pool.concurrency_limit:
        reasons.append(f"work pool {name}'s concurrency limit ({pool.concurrency_limit}) is taken")
    if run.work_queue_name:
        queue = await client.read_work_queue_by_name(run.work_queue_name, work_pool_name=name)
        if queue.is_paused:
            reasons.append(f"work queue {queue.name} of pool {name} is paused")
        if queue.concurrency_limit is not None and (queue.active_slots or 0) >= queue.concurrency_limit:
            reasons.append(f"work queue {queue.name}'s concurrency limit ({queue.concurrency_limit}) is taken")
    online = [w for w in await client.read_workers_for_work_pool(name) if w.status.value == "ONLINE"]
    if not online:
        reasons.append(f"no worker is online on work pool {name} (start one: prefect worker start --pool {name})")
    elif not reasons and run.state and run.state.type.value == "SCHEDULED":
        reasons.append(
            f"{len(online)} worker(s) online on work pool {name}, none free: each runs its --limit of flow runs "
            "(this parent holds one while it waits); start more workers or use fewer parts"
        )
    return reasons


def _part_report(part: int, run: Any, unfinished: tuple[str, str] | None) -> dict[str, Any]:
    worker = run_coro_as_sync(_artifact_row(run.id, "worker"))
    counts = run_coro_as_sync(_artifact_row(run.id, "summary"))
    state, reason = unfinished or (run.state.name, "")
    return {
        "part": part,
        "flow_run": run.name,
        "state": state,
        "reason": reason,
        "host": worker.get("host", ""),
        "pid": worker.get("pid", ""),
        "cuda_visible_devices": worker.get("cuda_visible_devices", ""),
        **counts,
    }


COUNTS = ("ok", "skipped", "failed", "pending", "items", "failed_items")


def publish_summary(summary: dict[str, Any], units: str = "slides") -> None:
    """This run's counts as the ``summary`` artifact, which a parent run adds up over its parts."""
    row = {key: summary.get(key, 0) for key in (units, *COUNTS)}
    row["random_weights"] = bool(summary.get("random_weights"))
    if "max_tokens" in summary:
        row["max_tokens"] = summary["max_tokens"]
    create_table_artifact([row], key="summary", description=f"what this run did, counted in {units}")


def merge_summaries(summaries: list[dict[str, Any]], units: str = "slides") -> dict[str, Any]:
    merged: dict[str, Any] = {key: sum(int(s.get(key, 0) or 0) for s in summaries) for key in (units, *COUNTS)}
    merged[f"failed_{units}"] = [f for s in summaries for f in s.get(f"failed_{units}", [])]
    merged[f"pending_{units}"] = [p for s in summaries for p in s.get(f"pending_{units}", [])]
    merged["max_tokens"] = max((int(s.get("max_tokens", 0) or 0) for s in summaries), default=0)
    merged["random_weights"] = any(str(s.get("random_weights")).lower() == "true" for s in summaries)
    return merged


def run_parts(
    stage: str,
    flow_fn: Any,
    parameters: dict[str, Any],
    parts: int,
    logger: logging.Logger,
    timeout_seconds: float,
    units: str = "slides",
) -> dict:
    """The parent of a ``parts=N`` run: child runs on the pool's workers when this run is a deployment's (waiting at
    most ``timeout_seconds``, the run's ``parts.timeout_seconds``), else the parts one after another here (as
    subflows), as also when the children could never get a slot; returns the merged summary with a ``parts``
    report."""
    reports = _parts_on_workers(stage, parameters, parts, logger, timeout_seconds) if current_deployment_id() else None
    if reports is None:
        reports = _parts_here(flow_fn, parameters, parts)
    summary = merge_summaries(reports, units)
    lost = [r for r in reports if r["state"] != "Completed"]
    summary["parts"] = [{k: v for k, v in r.items() if not isinstance(v, list | dict)} for r in reports]
    summary["lost_parts"] = [r["part"] for r in lost]
    for report in lost:
        why = f" ({report['reason']})" if report.get("reason") else ""
        logger.error(
            "part %s ended %s%s: its %s stay pending for the next run", report["part"], report["state"], why, units
        )
    return summary


def _parts_on_workers(
    stage: str, parameters: dict[str, Any], parts: int, logger: logging.Logger, timeout_seconds: float
) -> list[dict[str, Any]] | None:
    """The parts as child runs of the stage's deployment; None when they could never get a slot (run them here)."""
    deployment_id = run_coro_as_sync(_stage_deployment(current_deployment_id(), stage))
    shortage = run_coro_as_sync(_slot_shortage(deployment_id, root_flow_run_id()))
    if shortage:
        logger.warning("%s: the %d parts run here, one after another (raise the limit to run them at once)",
                       shortage, parts)  # fmt: skip
        return None
    return wait_for_parts(start_parts(stage, deployment_id, parameters, parts, logger), timeout_seconds, logger)


def _parts_here(flow_fn: Any, parameters: dict[str, Any], parts: int) -> list[dict[str, Any]]:
    reports = []
    for part in range(parts):
        state = flow_fn(**parameters, parts=parts, part=part, return_state=True)
        result = state.result(raise_on_failure=False) if state.is_completed() else {}
        reports.append({"part": part, "state": state.name, **(result or {})})
    return reports


def source_label(sources: list[str]) -> str:
    """A short name for a source set, for flow run names: the last path part of the first source (+N more)."""
    if not sources:
        return "no-sources"
    first = sources[0].rstrip("/").rsplit("/", 1)[-1] or sources[0]
    first = re.sub(r"[^A-Za-z0-9_.-]+", "-", first.rsplit(".", 1)[0] if "." in first else first)[:40]
    return first + (f"+{len(sources) - 1}" if len(sources) > 1 else "")


def name_flow_run(name: str, part: int | None = None, parts: int = 1) -> None:
    """Name this flow run after what it processes (``extract-<source>-<n>-slides``), so the UI's list says it."""
    from prefect.runtime import flow_run

    if not flow_run.id:
        return
    if part is not None:
        name += f"-part-{part}-of-{parts}"

    async def rename() -> None:
        async with get_client() as client:
            await client.update_flow_run(flow_run.id, name=name)

    run_coro_as_sync(rename())
