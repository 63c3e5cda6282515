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
from tasks.work.runner import Finish, Parts, Stage, open_store, run_stage
from tasks.work.units import UnitPlan


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
    parameters = {"store": store, "config": config, "overrides": overrides}
    stage = instruct_stage(settings, agents_hash, instruct_hash, Parts(parts, part, instruct_flow, parameters))

    def plan() -> UnitPlan:
        prefixes = [instruct_prefix(instruct_hash), instruct_failed_prefix(instruct_hash)]
        target = open_store(settings, prefixes, logger)
        return plan_instruct(target, agents_hash, instruct_hash, part, parts)

    return run_stage(stage, plan, settings, logger)


def instruct_stage(settings: Settings, agents_hash: str, instruct_hash: str, parts: Parts) -> Stage:
    """Slide groups of ``instruct.slides_per_task`` (one model batch per group), ``instruct.concurrency`` at once;
    its items are conversations."""
    where = f"{settings.store.rstrip('/')}/{instruct_prefix(instruct_hash)}"
    return Stage(
        "instruct",
        instruct_slides_task,
        unit_id=str,
        concurrency=settings.instruct.concurrency,
        tags=["gpu"],
        extra={"instruct_hash": instruct_hash, "agents_hash": agents_hash},
        table_description=f"Instruction conversations into {where}",
        group_size=settings.instruct.slides_per_task,
        run_name=f"instruct-{instruct_hash}",
        parts=parts,
        finish=Finish(
            items="conversations",
            where=where,
            random_warning="instruction data from RANDOM WEIGHTS (the instruct model or the captions): it is noise",
            fields={
                "store": settings.store,
                "agents_hash": agents_hash,
                "instruct_hash": instruct_hash,
                "instruct_prefix": where,
            },
            tallies=("failures", "kinds"),
        ),
    )
