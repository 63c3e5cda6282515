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
from tasks.features.extract import feature_slides_task, plan_featuring
from tasks.features.hashing import features_hash, hash_inputs
from tasks.features.store import features_prefix, manifest_key
from tasks.models import RandomWeightsRefused
from tasks.slides.extract import part_refs
from tasks.store.objects import Store
from tasks.work.parts import source_label
from tasks.work.runner import Finish, Parts, Stage, open_store, run_stage
from tasks.work.units import UnitPlan


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
    chosen = list(sources) or settings.sources
    # Prefect records flow parameters: a spec holding credentials (NAME:s3://user:secret@...) is resolved again by
    # each part from its settings (the environment) instead of travelling as a parameter.
    parameters = {
        "sources": sources,
        "encoder": spec if redact_urls(spec) == spec else None,
        "store": store,
        "config": config,
        "overrides": overrides,
        "processes": processes,
    }
    parts_of_run = Parts(parts, part, features_flow, parameters)
    stage = features_stage(settings, target, spec, identity, fhash, processes, parts_of_run, source_label(chosen))

    def plan() -> UnitPlan:
        refs = part_refs(chosen, settings, part, parts)
        write_manifest(target, settings, identity, fhash)
        return plan_featuring(refs, settings, target, identity, fhash)

    return run_stage(stage, plan, settings, logger)


def features_stage(
    settings: Settings,
    store: Store,
    spec: str,
    identity: dict[str, Any],
    fhash: str,
    processes: bool,
    parts: Parts,
    label: str,
) -> Stage:
    """Slide groups of ``features.group_size``, ``features.concurrency`` at once, through the encoder ``spec``."""
    where = store.uri(features_prefix(fhash))
    return Stage(
        "features",
        feature_slides_task,
        unit_id=lambda ref: ref.slide_id,
        concurrency=settings.features.concurrency,
        processes=processes,
        tags=["gpu"],  # the encoder runs on the worker's GPU: a tag concurrency limit can match the GPUs
        extra={"encoder": spec, "identity": identity, "features_hash": fhash},
        table_description=f"Features {fhash} ({identity['spec']}) into {store.url}",
        group_size=settings.features.group_size,
        run_name=f"features-{label}",
        parts=parts,
        finish=Finish(
            items="patches",
            where=where,
            random_warning=RANDOM_WEIGHTS_WARNING.format(model=identity["spec"]),
            random_weights=bool(identity["random_weights"]),
            required=True,
            fields={
                "store": store.url,
                "features_hash": fhash,
                "encoder": identity["spec"],
                "dim": identity["dim"],
                "features": where,
            },
        ),
    )


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
