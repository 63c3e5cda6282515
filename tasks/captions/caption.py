"""Captioning a group of slides: one pass of describe -> revise -> summarize over all their patches (so model
batches span slides), then a commit per slide: its failed table, then its pair shard, the marker.

Only content failures are recorded. A backend or storage failure raises: nothing is committed for the slides it
touched, Prefect retries the task, and if that fails too the slides stay pending for the next run.

Two runs that overlap commit whole objects onto the same keys, so no pair is ever duplicated. Both objects of a
slide carry the id of the commit they belong to, and the pair shard also carries its failed rows (metadata
``pathgen.failed_rows``): whoever finds the failed table of another commit than the pair shard's (an overlapping run
wrote it between two commits) rebuilds it from the pair shard, so the two always describe the same captioning.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from prefect import get_run_logger, task

from agents.pipeline import BatchResult, CaptionAgents
from pathgen import __version__
from pathgen.errors import BackendError, InfrastructureError, redact_urls, retry_infrastructure
from pathgen.settings import Settings
from tasks.captions.records import PAIRS, PATCH_FIELDS, pair_key, patches_key
from tasks.slides.shard import read_shard
from tasks.store.objects import Store
from tasks.work.commit import commit_each, commit_tables, failed_rows, outcome_columns, still_pending
from tasks.work.commit import metadata as _metadata
from tasks.work.commit import sync_failed_table as sync_shards_failed_table
from tasks.work.units import UnitOutcome, worker_identity

log = logging.getLogger("pathgen.captions")


@dataclass
class SlideWork:
    slide_id: str
    extraction_hash: str
    rows: list[dict[str, Any]]


def _current_pairs(store: Store, agents_hash: str, slide_id: str, extraction_hash: str) -> dict[str, str] | None:
    """The committed pair shard's metadata when it captioned this very extraction, else None."""
    key = pair_key(agents_hash, slide_id)
    if not store.exists(key):
        return None
    meta = _metadata(store, key)
    return meta if meta.get("pathgen.extraction_hash") == extraction_hash else None


def _load(store: Store, slide_id: str) -> list[dict[str, Any]]:
    with store.open(patches_key(slide_id)) as handle:
        return read_shard(handle, columns=[f.name for f in PATCH_FIELDS]).to_pylist()


def _pair_rows(work: SlideWork, result: BatchResult, agents: CaptionAgents, agents_hash: str, now: str) -> list:
    provenance = agents.provenance()
    roles = provenance["roles"]
    prompts = json.dumps({n: r["prompt"] for n, r in roles.items()} | {"shorten": provenance["shorten_prompt"]})
    sampling = json.dumps({n: r["sampling"] for n, r in roles.items()})
    pairs = []
    for row in work.rows:
        caption = result.captions.get(row["patch_id"])
        if caption is None:
            continue
        pairs.append(
            {
                **row,
                "description": caption.description,
                "revised_description": caption.revised_description,
                "revise_changed": caption.revise_changed,
                "revise_change": caption.revise_change,
                "caption": caption.caption,
                "caption_tokens": caption.caption_tokens,
                "caption_trimmed": caption.caption_trimmed,
                "describe_model": roles["describe"]["model"],
                "revise_model": roles["revise"]["model"],
                "summarize_model": roles["summarize"]["model"],
                "prompt_versions": prompts,
                "sampling": sampling,
                "agents_hash": agents_hash,
                "extraction_hash": work.extraction_hash,
                "random_weights": provenance["random_weights"],
                "factory_version": __version__,
                "created_at": now,
            }
        )
    return pairs


def commit_slide(store: Store, work: SlideWork, pairs: list, failed: list, agents_hash: str, extra: dict) -> str:
    """Failed table first, pair shard last (the marker); returns "ok", or "skipped" when another run committed
    this slide's captions of the same extraction meanwhile."""
    if _current_pairs(store, agents_hash, work.slide_id, work.extraction_hash):
        return "skipped"
    meta = {**extra, "pathgen.slide_id": work.slide_id, "pathgen.extraction_hash": work.extraction_hash}
    commit_tables(store, PAIRS, agents_hash, work.slide_id, pairs, failed, meta)
    return "ok"


def sync_failed_table(store: Store, agents_hash: str, slide_id: str, rounds: int = 3) -> bool:
    """Make the failed table belong to the committed pair shard's commit (see tasks.work.commit)."""
    return sync_shards_failed_table(store, PAIRS, agents_hash, slide_id, rounds)


def _columns(pairs: list, failed: list, worker: dict[str, str]) -> dict[str, Any]:
    tokens = [p["caption_tokens"] for p in pairs]
    return outcome_columns(
        failed,
        worker,
        mean_tokens=round(sum(tokens) / len(tokens), 2) if tokens else 0.0,
        max_tokens=max(tokens, default=0),
        changed_by_revise=round(sum(p["revise_changed"] for p in pairs) / len(pairs), 4) if pairs else 0.0,
        trimmed=sum(p["caption_trimmed"] for p in pairs),
    )


def _gather(store: Store, units: list[str], agents_hash: str) -> tuple[list[SlideWork], list[UnitOutcome]]:
    """The slides still to do, with their patches; the others come back as skipped. A patch shard's images are
    read only for slides still to do: its footer says which extraction it holds."""
    work, skipped = [], []
    for slide_id in units:
        extraction_hash = _metadata(store, patches_key(slide_id)).get("pathgen.extraction_hash", "")
        if _current_pairs(store, agents_hash, slide_id, extraction_hash):
            sync_failed_table(store, agents_hash, slide_id)
            skipped.append(UnitOutcome(slide_id, "skipped"))
        else:
            work.append(SlideWork(slide_id, extraction_hash, _load(store, slide_id)))
    return work, skipped


def _refuse_random_weights(agents: CaptionAgents, settings: Settings) -> None:
    """A hub model whose weights did not load is random too: where they are not allowed, nothing is captioned."""
    if settings.models.allow_random_weights or not agents.random_weights:
        return
    unloaded = [f"agents.{name}.model {role.backend.model_id}" for name, role in agents.roles.items()]
    unloaded = [text for text, role in zip(unloaded, agents.roles.values(), strict=True) if role.backend.random_weights]
    raise BackendError(
        f"models.allow_random_weights is false and {', '.join(unloaded)} loaded with random weights on this worker "
        "(its weight files are missing or incomplete); the slides stay pending"
    )


def caption_slides(
    units: list[str], settings: Settings, agents_hash: str, logger: logging.Logger | None = None
) -> list[UnitOutcome]:
    """Caption a group of slides and commit each; raises PendingWork when infrastructure fails."""
    logger = logger or log
    start = time.perf_counter()
    store = Store(settings.store, settings.s3)
    agents = CaptionAgents(settings.agents, settings.retries, logger)
    if agents.agents_hash() != agents_hash:
        raise BackendError(
            f"the models on this worker ({agents.identity}) are not those the run was planned with (agents_hash "
            f"{agents_hash}, here {agents.agents_hash()}); give every worker the same model files"
        )
    _refuse_random_weights(agents, settings)
    work, skipped = _gather(store, units, agents_hash)
    try:
        result = agents.run({r["patch_id"]: r["image"] for w in work for r in w.rows})
    except InfrastructureError as exc:
        message = f"captioning failed, {len(work)} slides stay pending: {redact_urls(str(exc))}"
        raise still_pending(message, skipped, work, exc) from exc
    now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    worker = worker_identity()
    extra = {"pathgen.agents_hash": agents_hash, "pathgen.provenance": json.dumps(agents.provenance())}
    extra["pathgen.worker"] = json.dumps(worker)
    seconds = (time.perf_counter() - start) / max(1, sum(len(w.rows) for w in work))
    stamp = {"agents_hash": agents_hash, "created_at": now}  # the failed rows' last columns

    def commit(slide: SlideWork) -> UnitOutcome:
        pairs = _pair_rows(slide, result, agents, agents_hash, now)
        failed = failed_rows(slide.slide_id, slide.rows, result.failures, stamp)
        status = commit_slide(store, slide, pairs, failed, agents_hash, extra)
        return UnitOutcome(
            slide.slide_id,
            status,
            len(pairs) if status == "ok" else 0,  # a slide another run committed meanwhile is not ours
            round(seconds * len(slide.rows), 3),
            random_weights=agents.random_weights,
            columns=_columns(pairs, failed, worker),
        )

    return commit_each(work, commit, skipped)


@task(name="caption-slides", retry_condition_fn=retry_infrastructure, tags=["caption", "gpu"])
def caption_slides_task(units: list[str], settings: Settings, agents_hash: str) -> list[UnitOutcome]:
    return caption_slides(units, settings, agents_hash, get_run_logger())
