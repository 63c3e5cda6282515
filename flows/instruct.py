"""Pairs to instruction conversations (PathGen-Instruct): plan from object listings which slides of the source pairs
still lack an instruct shard under this instruct_hash, take this run's part, and write conversations for slide
groups (one model batch per group), committing slide by slide.

The instruct_hash is resolved before any work: it covers the instruct model's identity as loaded (for an
OpenAI-compatible server, what it reports), so an unreachable server fails the run at once, naming the endpoint,
with every slide still pending. Another model, prompt, sampling, rule or source agents_hash is another instruct_hash,
written beside the earlier conversations, never over them.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from agents.instruct import instruct_hash as instruct_hash_of
from agents.instruct import instruct_identity
from pathgen.settings import Settings, run_settings
from tasks.instruct.generate import instruct_slides_task
from tasks.instruct.plan import plan_instruct, source_agents_hash
from tasks.instruct.records import instruct_failed_prefix, instruct_prefix
from tasks.models import require_real_models
from tasks.store.objects import Store
from tasks.work.parts import name_flow_run, publish_summary, record_worker, run_parts
from tasks.work.runner import Stage, open_store, run_plan
from tasks.work.units import log_pending, tally


def resolve_hashes(settings: Settings) -> tuple[str, str]:
    """(source agents_hash, instruct_hash), before any work: NoPairsError for a store without pairs, SettingsError
    when it is unclear which pairs to read, BackendError when the model server cannot be reached."""
    store = Store(settings.store, settings.s3)
    if store.remote:
        store.check()  # an endpoint that does not answer is not an empty store
    agents_hash = source_agents_hash(store, settings.instruct.agents_hash)
    return agents_hash, instruct_hash_of(settings, instruct_identity(settings), agents_hash)


@flow(name="instruct", description="Pairs to instruction conversations (instruct/<instruct_hash>/ in the store).")
def instruct_flow(
    store: str | None = None,
    config: str | None = None,
    overrides: dict[str, Any] | None = None,
    parts: int = 1,
    part: int | None = None,
) -> dict[str, Any]:
    logger = get_run_logger()
    settings = run_settings(store, config, overrides)
    require_real_models(settings, ["instruct"])  # before any work: production refuses a random-weight model
    agents_hash, instruct_hash = resolve_hashes(settings)
    if parts > 1 and part is None:
        parameters = {"store": store, "config": config, "overrides": overrides}
        summary = run_parts("instruct", instruct_flow, parameters, parts, logger, settings.parts.timeout_seconds)
        return _finish(summary, settings, logger, agents_hash, instruct_hash)
    record_worker("instruct", part, parts)
    prefixes = [instruct_prefix(instruct_hash), instruct_failed_prefix(instruct_hash)]
    target = open_store(settings, prefixes, logger)
    plan = plan_instruct(target, agents_hash, instruct_hash, part, parts)
    name_flow_run(f"instruct-{instruct_hash}-{len(plan.pending)}-slides", part, parts)
    logger.info(
        "instruct %s from pairs %s: %d slides done, %d pending",
        instruct_hash,
        agents_hash,
        len(plan.done),
        len(plan.pending),
    )
    stage = Stage(
        "instruct",
        instruct_slides_task,
        unit_id=str,
        concurrency=settings.instruct.concurrency,
        tags=["gpu"],
        extra={"instruct_hash": instruct_hash, "agents_hash": agents_hash},
        table_description=f"Instruction conversations into {target.uri(instruct_prefix(instruct_hash))}",
    )
    summary, outcomes = run_plan(stage, plan, settings.instruct.slides_per_task, settings, logger)
    summary = _finish(summary, settings, logger, agents_hash, instruct_hash, outcomes)
    publish_summary(summary)
    return summary


def _finish(
    summary: dict, settings: Settings, logger, agents_hash: str, instruct_hash: str, outcomes=None
) -> dict[str, Any]:
    outcomes = outcomes or []
    summary.update(
        store=settings.store,
        agents_hash=agents_hash,
        instruct_hash=instruct_hash,
        conversations=summary["items"],
        instruct_prefix=f"{settings.store.rstrip('/')}/{instruct_prefix(instruct_hash)}",
        failures=tally(outcomes, "failures") or summary.get("failures", {}),
        kinds=tally(outcomes, "kinds") or summary.get("kinds", {}),
    )
    log_pending(
        summary, logger, "instruction data from RANDOM WEIGHTS (the instruct model or the captions): it is noise"
    )
    logger.info(
        "%d conversations %s, %d failed items (%s), %d slides pending, in %s",
        summary["conversations"],
        summary["kinds"],
        summary["failed"],
        summary["failures"],
        summary["pending"],
        summary["instruct_prefix"],
    )
    return summary
