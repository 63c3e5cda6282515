"""Slides to patch features: resolve the encoder and its features hash, take this run's part, feature slide groups.

Every tissue patch of each slide goes through the encoder (tasks/features/extract.py) into
``features/<features_hash>/<slide_id>.parquet``; ``features.json`` beside them records the encoder identity and the
settings of the hash. A run in which some slides fail ends Completed and lists them; it fails only when no slide
succeeded or the settings are wrong. Slides whose storage, encoder or GPU failed stay pending.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from prefect import flow, get_run_logger

from pathgen.errors import redact_urls
from pathgen.settings import Settings, run_settings
from tasks.features.encoder import RANDOM_WEIGHTS_WARNING, encoder_identity, resolve_encoder_spec
from tasks.features.extract import feature_slides_task
from tasks.features.hashing import features_hash, hash_inputs
from tasks.features.store import features_prefix, manifest_key
from tasks.models import RandomWeightsRefused
from tasks.slides.sources import resolve_sources
from tasks.store.objects import Store
from tasks.work.parts import name_flow_run, publish_summary, record_worker, run_parts, source_label
from tasks.work.runner import Stage, open_store, run_units
from tasks.work.units import NoSlideSucceeded, finish_slides, groups_of, in_part, summarize


@flow(name="features", description="Every tissue patch of each slide through an encoder (features/ in the store).")
def features_flow(
    sources: list[str],
    encoder: str | None = None,
    store: str | None = None,
    config: str | None = None,
    overrides: dict[str, Any] | None = None,
    processes: bool = True,
    parts: int = 1,
    part: int | None = None,
) -> dict[str, Any]:
    logger = get_run_logger()
    settings = run_settings(store, config, overrides)
    target = open_store(settings, ["features"], logger)
    spec = resolve_encoder_spec(encoder or settings.features.encoder, target)
    identity = encoder_identity(spec)  # ModelUnavailable here: nothing starts, every slide stays pending
    _refuse_random(settings, identity)
    fhash = features_hash(settings, identity)
    if parts > 1 and part is None:
        # Prefect records flow parameters: a spec holding credentials (NAME:s3://user:secret@...) is resolved again
        # by each part from its settings (the environment) instead of travelling as a parameter.
        parameters = {
            "sources": sources,
            "encoder": spec if redact_urls(spec) == spec else None,
            "store": store,
            "config": config,
            "overrides": overrides,
            "processes": processes,
        }
        summary = run_parts("features", features_flow, parameters, parts, logger, settings.parts.timeout_seconds)
        return _finish(summary, target, identity, fhash, logger)
    record_worker("features", part, parts)
    refs = in_part(resolve_sources(list(sources) or settings.sources, settings), part, parts, key=lambda r: r.slide_id)
    if not refs and part is None:
        raise NoSlideSucceeded(f"no slides found in {list(sources) or settings.sources}; check the source paths")
    write_manifest(target, settings, identity, fhash)
    stage = Stage(
        "features",
        feature_slides_task,
        unit_id=lambda ref: ref.slide_id,
        concurrency=settings.features.concurrency,
        processes=processes,
        tags=["gpu"],  # the encoder runs on the worker's GPU: a tag concurrency limit can match the GPUs
        extra={"encoder": spec, "identity": identity, "features_hash": fhash},
        table_description=f"Features {fhash} ({identity['spec']}) into {target.url}",
    )
    name_flow_run(f"features-{source_label(list(sources) or settings.sources)}-{len(refs)}-slides", part, parts)
    groups = groups_of(refs, settings.features.group_size)
    logger.info(
        "%d slides in %d groups through %s (features %s) into %s",
        *(len(refs), len(groups), identity["spec"], fhash, target.url),
    )
    summary = summarize("features", run_units(stage, groups, settings, logger))
    summary["random_weights"] = summary["random_weights"] or bool(identity["random_weights"])
    publish_summary(summary)
    return _finish(summary, target, identity, fhash, logger, required=part is None)


def _refuse_random(settings: Settings, identity: dict[str, Any]) -> None:
    if identity["random_weights"] and not settings.models.allow_random_weights:
        raise RandomWeightsRefused(
            f"models.allow_random_weights is false and the encoder {identity['spec']} has random weights; pass "
            "--encoder NAME:PRETRAINED or a PathGen-CLIP checkpoint (features.encoder), or set "
            "models.allow_random_weights=true for a test run"
        )


def write_manifest(store: Store, settings: Settings, identity: dict[str, Any], fhash: str) -> str:
    """``features/<hash>/features.json``: the encoder identity and the settings that made the hash (once per run)."""
    key = manifest_key(fhash)
    store.write_json(
        key,
        {
            "features_hash": fhash,
            "encoder": identity,
            "settings": hash_inputs(settings, identity),
            "random_weights": bool(identity["random_weights"]),
            "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        },
    )
    return key


def _finish(
    summary: dict[str, Any], store: Store, identity: dict[str, Any], fhash: str, logger, required: bool = True
) -> dict[str, Any]:
    summary.update(store=store.url, features_hash=fhash, encoder=identity["spec"], dim=identity["dim"])
    summary["features"] = store.uri(features_prefix(fhash))
    summary["random_weights"] = bool(summary.get("random_weights")) or bool(identity["random_weights"])
    warning = RANDOM_WEIGHTS_WARNING.format(model=identity["spec"])
    return finish_slides(summary, summary["features"], logger, warning, required)
