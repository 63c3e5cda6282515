"""Slides to patch shards: resolve sources, take this run's part, extract slide groups with bounded concurrency.

A run in which some slides fail ends Completed and lists them; it fails only when no slide succeeded or the
settings are wrong. Slides whose storage failed stay pending (nothing written) and are listed as such.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from pathgen.settings import run_settings
from tasks.models import require_real_models
from tasks.slides.extract import extract_slides_task
from tasks.slides.sources import resolve_sources
from tasks.work.parts import name_flow_run, publish_summary, record_worker, run_parts, source_label
from tasks.work.runner import Stage, open_store, run_units
from tasks.work.units import NoSlideSucceeded, finish_slides, groups_of, in_part, summarize


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
    if parts > 1 and part is None:
        parameters = {
            "sources": sources,
            "store": store,
            "config": config,
            "overrides": overrides,
            "processes": processes,
        }
        summary = run_parts("extract", extract_flow, parameters, parts, logger, settings.parts.timeout_seconds)
        return _finish(summary, settings.store, logger)
    record_worker("extract", part, parts)
    target = open_store(settings, ["patches", "slides"], logger)
    refs = in_part(resolve_sources(list(sources) or settings.sources, settings), part, parts, key=lambda r: r.slide_id)
    if not refs and part is None:
        raise NoSlideSucceeded(f"no slides found in {list(sources) or settings.sources}; check the source paths")
    groups = groups_of(refs, settings.extract.group_size)
    # Representative selection embeds patches: tagged gpu, so a tag concurrency limit can match the GPUs.
    gpu = ["gpu"] if settings.selection.method == "representative" else []
    stage = Stage(
        "extract",
        extract_slides_task,
        unit_id=lambda ref: ref.slide_id,
        concurrency=settings.extract.concurrency,
        processes=processes,
        tags=gpu,
        table_description=f"Extraction into {target.url}",
    )
    name_flow_run(f"extract-{source_label(list(sources) or settings.sources)}-{len(refs)}-slides", part, parts)
    logger.info("%d slides in %d groups into %s", len(refs), len(groups), target.url)
    summary = summarize("extract", run_units(stage, groups, settings, logger))
    summary["selection"] = settings.selection.method
    publish_summary(summary)
    return _finish(summary, target.url, logger, required=part is None)


def _finish(summary: dict[str, Any], store_url: str, logger, required: bool = True) -> dict[str, Any]:
    summary["store"] = store_url
    warning = "selection used random-weight embeddings (tiny-random): the picks are noise, not a selection"
    return finish_slides(summary, store_url, logger, warning, required)
