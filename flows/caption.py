"""Selected patches to image-text pairs: plan from object listings which slides this agents_hash still lacks,
take this run's part, and caption slide groups (describe -> revise -> summarize), committing slide by slide.

The agents_hash is resolved before any work: it covers the models' identities as loaded (for an OpenAI-compatible
server, what it reports), so an unreachable server fails the run at once, naming the endpoint, with every slide
still pending. A new model or prompt is a new agents_hash, written beside the earlier pairs, never over them.
A store without patch shards (caption before extract) fails the run at once, naming the store and
`pathgen extract`, and a local store folder is not created for it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from agents.identity import agents_hash as agents_hash_of
from agents.identity import identities
from pathgen.settings import Settings, run_settings
from tasks.captions.caption import caption_slides_task
from tasks.captions.plan import plan_captions
from tasks.captions.records import failed_prefix, pairs_prefix
from tasks.models import require_real_models
from tasks.store.listing import list_mtimes
from tasks.store.objects import Store
from tasks.work.parts import name_flow_run, publish_summary, record_worker, run_parts
from tasks.work.runner import Stage, open_store, run_plan
from tasks.work.units import log_pending, tally


class NoPatchShardsError(ValueError):
    """The store holds no patch shards: nothing to caption until ``pathgen extract`` has filled it."""


def require_patch_shards(settings: Settings) -> None:
    """Raise NoPatchShardsError, naming the store and the command that fills it, when it holds no patch shards.

    A local store folder that does not exist is not created. A remote store is checked first (StoreError when it
    cannot be reached), so that an endpoint that does not answer is not reported as an empty store.
    """
    store = Store(settings.store, settings.s3)
    if store.remote:
        store.check()
    missing = not store.remote and not Path(store.root).is_dir()
    if missing or not list_mtimes(store, "patches", ".parquet"):
        raise NoPatchShardsError(
            f"no patch shards in the store {store.url} (nothing under {store.uri('patches')}/), so nothing to "
            f"caption; make them first: pathgen extract SOURCE --store {store.url}"
        )


@flow(name="caption", description="Selected patches to pair shards (pairs/<agents_hash>/ in the store).")
def caption_flow(
    store: str | None = None,
    config: str | None = None,
    overrides: dict[str, Any] | None = None,
    parts: int = 1,
    part: int | None = None,
) -> dict[str, Any]:
    logger = get_run_logger()
    settings = run_settings(store, config, overrides)
    require_real_models(settings, ["caption"])  # before any work: production refuses random-weight agents
    require_patch_shards(settings)  # caption before extract: a clear error, before models load or the store is made
    # Resolved before any work: an unreachable model server fails the run here, with every slide still pending.
    agents_hash = agents_hash_of(settings.agents, identities(settings.agents, settings.retries))
    if parts > 1 and part is None:
        parameters = {"store": store, "config": config, "overrides": overrides}
        summary = run_parts("caption", caption_flow, parameters, parts, logger, settings.parts.timeout_seconds)
        return _finish(summary, settings, logger, agents_hash)
    record_worker("caption", part, parts)
    target = open_store(settings, [pairs_prefix(agents_hash), failed_prefix(agents_hash)], logger)
    plan = plan_captions(target, agents_hash, part, parts)
    name_flow_run(f"caption-{agents_hash}-{len(plan.pending)}-slides", part, parts)
    logger.info("agents %s: %d slides done, %d pending", agents_hash, len(plan.done), len(plan.pending))
    stage = Stage(
        "caption",
        caption_slides_task,
        unit_id=str,
        concurrency=settings.agents.concurrency,
        tags=["gpu"],
        extra={"agents_hash": agents_hash},
        table_description=f"Captioning into {target.uri(pairs_prefix(agents_hash))}",
    )
    # Its failed count is of patches, not slides.
    summary, outcomes = run_plan(stage, plan, settings.agents.slides_per_task, settings, logger)
    summary["agents_hash"] = agents_hash
    summary = _finish(summary, settings, logger, agents_hash, outcomes)
    publish_summary(summary)
    return summary


def _finish(summary: dict, settings, logger, agents_hash: str, outcomes=None) -> dict[str, Any]:
    failures = tally(outcomes or [], "failures")
    summary.update(
        store=settings.store,
        agents_hash=agents_hash,
        pairs=summary["items"],
        pairs_prefix=f"{settings.store.rstrip('/')}/{pairs_prefix(agents_hash)}",
        failures=failures,
        max_tokens=max([int(o.columns.get("max_tokens", 0)) for o in outcomes or []] + [summary.get("max_tokens", 0)]),
    )
    log_pending(summary, logger, "captions come from tiny RANDOM-WEIGHT models: they are noise, not descriptions")
    logger.info(
        "%d pairs, %d failed items (%s), %d slides pending, in %s",
        summary["pairs"],
        summary["failed"],
        failures,
        summary["pending"],
        summary["pairs_prefix"],
    )
    return summary
