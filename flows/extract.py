"""Slides to patch shards: resolve sources, take this run's part, plan from the store which slides still lack their
current extraction, and extract the others in slide groups with bounded concurrency.

A run in which some slides fail ends Completed and lists them; it fails only when no slide succeeded or the
settings are wrong. Slides whose storage failed stay pending (nothing written) and are listed as such.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from pathgen.settings import Settings, run_settings
from tasks.models import require_real_models
from tasks.slides.extract import extract_slides_task, part_refs, plan_extraction
from tasks.store.objects import Store
from tasks.work.parts import source_label
from tasks.work.runner import Finish, Parts, Stage, open_store, run_stage
from tasks.work.units import UnitPlan

RANDOM_SELECTION = "selection used random-weight embeddings (tiny-random): the picks are noise, not a selection"


@flow(name="extract", description="Whole-slide images to patch shards (slides/, patches/ in the store).")
def extract_flow(
    sources: list[str],
    store: str | None = None,
    config: str | None = None,
    overrides: dict[str, Any] | None = None,
    processes: bool = True,
    parts: int = 1,
    part: int | None = None,
) -> dict[str, Any]:
    logger = get_run_logger()
    settings = run_settings(store, config, overrides)
    require_real_models(settings, ["extract"])  # before any work: production refuses random-weight embeddings
    chosen = list(sources) or settings.sources
    parameters = {"sources": sources, "store": store, "config": config, "overrides": overrides, "processes": processes}
    stage = extract_stage(settings, processes, Parts(parts, part, extract_flow, parameters), source_label(chosen))

    def plan() -> UnitPlan:
        target = open_store(settings, ["patches", "slides"], logger)
        return plan_extraction(part_refs(chosen, settings, part, parts), settings, target)

    return run_stage(stage, plan, settings, logger)


def extract_stage(settings: Settings, processes: bool, parts: Parts, label: str) -> Stage:
    """Slide groups of ``extract.group_size``, ``extract.concurrency`` at once, in worker processes or threads."""
    url = Store(settings.store, settings.s3).url
    return Stage(
        "extract",
        extract_slides_task,
        unit_id=lambda ref: ref.slide_id,
        concurrency=settings.extract.concurrency,
        processes=processes,
        # Representative selection embeds patches: tagged gpu, so a tag concurrency limit can match the GPUs.
        tags=["gpu"] if settings.selection.method == "representative" else [],
        table_description=f"Extraction into {url}",
        group_size=settings.extract.group_size,
        run_name=f"extract-{label}",
        parts=parts,
        finish=Finish(
            items="patches",
            where=url,
            random_warning=RANDOM_SELECTION,
            required=True,
            fields={"store": url, "selection": settings.selection.method},
        ),
    )
