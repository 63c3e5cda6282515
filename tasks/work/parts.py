"""Many workers, one job: a flow run with ``parts=N`` that runs as a deployment starts each part as a child flow
run of the same deployment, so that every worker of the pool can take one; outside a deployment the parts run
one after another in this process. Each run records which worker ran it (host, pid, CUDA_VISIBLE_DEVICES) as
its ``worker`` artifact, and the parent reports every part from its children's states and artifacts."""

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

from tasks.work.units import worker_identity

FINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")


def current_deployment_id() -> str | None:
    from prefect.runtime import deployment

    return deployment.id


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


def start_parts(stage: str, parameters: dict[str, Any], parts: int, logger: logging.Logger) -> list[Any]:
    """One child flow run per part of the stage's deployment (this run's own, unless the stage runs inside another
    deployment's flow); returns them at once (they run on the pool's workers)."""
    deployment_id = run_coro_as_sync(_stage_deployment(current_deployment_id(), stage))
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


def wait_for_parts(children: list[Any], poll_seconds: float = 2.0) -> list[dict[str, Any]]:
    """Wait until every child run is final; one report row per part, with the counts its run reported."""
    while True:
        runs = run_coro_as_sync(_read([c.id for c in children]))
        if all(r.state and r.state.type.value in FINAL for r in runs):
            break
        time.sleep(poll_seconds)
    reports = []
    for part, run in enumerate(runs):
        worker = run_coro_as_sync(_artifact_row(run.id, "worker"))
        counts = run_coro_as_sync(_artifact_row(run.id, "summary"))
        reports.append(
            {
                "part": part,
                "flow_run": run.name,
                "state": run.state.name,
                "host": worker.get("host", ""),
                "pid": worker.get("pid", ""),
                "cuda_visible_devices": worker.get("cuda_visible_devices", ""),
                **counts,
            }
        )
    create_table_artifact(reports, key="parts", description="the child flow run of each part, and its worker")
    return reports


COUNTS = ("slides", "ok", "skipped", "failed", "pending", "items")


def publish_summary(summary: dict[str, Any]) -> None:
    """This run's counts as the ``summary`` artifact, which a parent run adds up over its parts."""
    row = {key: summary.get(key, 0) for key in COUNTS} | {"random_weights": bool(summary.get("random_weights"))}
    if "max_tokens" in summary:
        row["max_tokens"] = summary["max_tokens"]
    create_table_artifact([row], key="summary", description="what this run did, slide by slide counts")


def merge_summaries(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    merged: dict[str, Any] = {key: sum(int(s.get(key, 0) or 0) for s in summaries) for key in COUNTS}
    merged["failed_slides"] = [f for s in summaries for f in s.get("failed_slides", [])]
    merged["pending_slides"] = [p for s in summaries for p in s.get("pending_slides", [])]
    merged["max_tokens"] = max((int(s.get("max_tokens", 0) or 0) for s in summaries), default=0)
    merged["random_weights"] = any(str(s.get("random_weights")).lower() == "true" for s in summaries)
    return merged


def run_parts(stage: str, flow_fn: Any, parameters: dict[str, Any], parts: int, logger: logging.Logger) -> dict:
    """The parent of a ``parts=N`` run: child runs on the pool's workers when this run is a deployment's, else
    the parts one after another here (as subflows); returns the merged summary with a ``parts`` report."""
    if current_deployment_id():
        reports = wait_for_parts(start_parts(stage, parameters, parts, logger))
    else:
        reports = []
        for part in range(parts):
            state = flow_fn(**parameters, parts=parts, part=part, return_state=True)
            result = state.result(raise_on_failure=False) if state.is_completed() else {}
            reports.append({"part": part, "state": state.name, **(result or {})})
    summary = merge_summaries(reports)
    lost = [r for r in reports if r["state"] != "Completed"]
    summary["parts"] = [{k: v for k, v in r.items() if not isinstance(v, list | dict)} for r in reports]
    summary["lost_parts"] = [r["part"] for r in lost]
    for report in lost:
        logger.error("part %s ended %s: its slides stay pending for the next run", report["part"], report["state"])
    return summary


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
