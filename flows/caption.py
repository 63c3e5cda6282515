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
from tasks.work.runner import Finish, Parts, Stage, open_store, run_stage
from tasks.work.units import UnitPlan


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
    parameters = {"store": store, "config": config, "overrides": overrides}
    stage = caption_stage(settings, agents_hash, Parts(parts, part, caption_flow, parameters))

    def plan() -> UnitPlan:
        target = open_store(settings, [pairs_prefix(agents_hash), failed_prefix(agents_hash)], logger)
        return plan_captions(target, agents_hash, part, parts)

    return run_stage(stage, plan, settings, logger)


def caption_stage(settings: Settings, agents_hash: str, parts: Parts) -> Stage:
    """Slide groups of ``agents.slides_per_task`` (one model batch spans a group), ``agents.concurrency`` at once;
    its items are pairs, and its failed items patches no caption could be written for."""
    where = f"{settings.store.rstrip('/')}/{pairs_prefix(agents_hash)}"
    return Stage(
        "caption",
        caption_slides_task,
        unit_id=str,
        concurrency=settings.agents.concurrency,
        tags=["gpu"],
        extra={"agents_hash": agents_hash},
        table_description=f"Captioning into {where}",
        group_size=settings.agents.slides_per_task,
        run_name=f"caption-{agents_hash}",
        parts=parts,
        finish=Finish(
            items="pairs",
            where=where,
            random_warning="captions come from tiny RANDOM-WEIGHT models: they are noise, not descriptions",
            fields={"store": settings.store, "agents_hash": agents_hash, "pairs_prefix": where},
            tallies=("failures",),
            maxima=("max_tokens",),
        ),
    )
