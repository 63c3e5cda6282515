"""Writing a group of slides' conversations: one instruct batch over all their pairs' revised descriptions (so model
batches span slides), then a commit per slide: its failed table, then its instruct shard, the marker.

Only content failures are recorded. A backend or storage failure raises: nothing is committed for the slides it
touched, Prefect retries the task, and if that fails too the slides stay pending for the next run.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from prefect import get_run_logger, task

from agents.instruct import InstructAgent, InstructResult, Source
from agents.protocol import ChatBackend
from pathgen import __version__
from pathgen.errors import BackendError, InfrastructureError, redact_urls, retry_infrastructure
from pathgen.settings import Settings
from tasks.captions.records import pair_key
from tasks.instruct.commit import commit_slide, is_current, metadata, sync_failed_table
from tasks.instruct.records import PAIR_COLUMNS, conversation_id
from tasks.slides.shard import read_shard
from tasks.store.objects import Store
from tasks.work.commit import commit_each, failed_rows, outcome_columns, still_pending
from tasks.work.units import UnitOutcome, counts_text, worker_identity

log = logging.getLogger("pathgen.instruct")


@dataclass
class SlideWork:
    slide_id: str
    source_commit: str  # the pair shard's commit id
    rows: list[dict[str, Any]]  # its pairs: PAIR_COLUMNS (+ image)


def _gather(
    store: Store, units: list[str], agents_hash: str, instruct_hash: str, image: bool
) -> tuple[list[SlideWork], list[UnitOutcome]]:
    """The slides still to do, with their pairs; the others come back as skipped. A pair shard's rows are read only
    for slides still to do: its footer says which commit it is."""
    work, skipped = [], []
    columns = PAIR_COLUMNS + (["image"] if image else [])
    for slide_id in units:
        key = pair_key(agents_hash, slide_id)
        commit = metadata(store, key).get("pathgen.commit_id", "")
        if is_current(store, instruct_hash, slide_id, commit):
            sync_failed_table(store, instruct_hash, slide_id)
            skipped.append(UnitOutcome(slide_id, "skipped"))
            continue
        with store.open(key) as handle:
            work.append(SlideWork(slide_id, commit, read_shard(handle, columns=columns).to_pylist()))
    return work, skipped


def conversation_rows(
    work: SlideWork, result: InstructResult, agent: InstructAgent, agents_hash: str, now: str
) -> list[dict[str, Any]]:
    instruct_hash = agent.instruct_hash(agents_hash)
    sampling = json.dumps(agent.provenance(agents_hash)["sampling"])
    rows = []
    for pair in work.rows:
        for conversation in result.conversations.get(pair["patch_id"], []):
            rows.append(
                {
                    "conversation_id": conversation_id(pair["patch_id"], conversation.index),
                    "patch_id": pair["patch_id"],
                    "slide_id": work.slide_id,
                    "x": pair["x"],
                    "y": pair["y"],
                    "kind": conversation.kind,
                    "conversation": json.dumps(conversation.messages),
                    "turns": len(conversation.messages) // 2,
                    "support": conversation.support,
                    "source_agents_hash": agents_hash,
                    "instruct_model": agent.model_name,
                    "prompt_version": agent.prompt.version,
                    "sampling": sampling,
                    # Conversations written from a noise description are noise too, whatever wrote them.
                    "random_weights": agent.random_weights or bool(pair.get("random_weights")),
                    "instruct_hash": instruct_hash,
                    "factory_version": __version__,
                    "created_at": now,
                }
            )
    return rows


def _columns(rows: list, failed: list, worker: dict[str, str]) -> dict[str, Any]:
    kinds: dict[str, int] = {}
    for row in rows:
        kinds[row["kind"]] = kinds.get(row["kind"], 0) + 1
    return outcome_columns(failed, worker, kinds=counts_text(kinds))


def _check_agent(agent: InstructAgent, settings: Settings, instruct_hash: str, agents_hash: str) -> None:
    """The model on this worker must be the one the run was planned with, and trained where that is required."""
    if agent.instruct_hash(agents_hash) != instruct_hash:
        raise BackendError(
            f"the instruct model on this worker ({agent.identity}) is not the one the run was planned with "
            f"(instruct_hash {instruct_hash}, here {agent.instruct_hash(agents_hash)}); same model everywhere"
        )
    if agent.random_weights and not settings.models.allow_random_weights:
        raise BackendError(
            f"models.allow_random_weights is false and instruct.model {agent.backend.model_id} loaded with random "
            "weights on this worker (its weight files are missing or incomplete); the slides stay pending"
        )


def _commit_all(
    store: Store,
    work: list[SlideWork],
    skipped: list[UnitOutcome],
    result: InstructResult,
    agent: InstructAgent,
    agents_hash: str,
    seconds: float,
) -> list[UnitOutcome]:
    """``skipped`` and the outcome of committing each slide; PendingWork (carrying both) when a commit fails."""
    now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    instruct_hash = agent.instruct_hash(agents_hash)
    worker = worker_identity()
    extra = {
        "pathgen.instruct_hash": instruct_hash,
        "pathgen.source_agents_hash": agents_hash,
        "pathgen.provenance": json.dumps(agent.provenance(agents_hash)),
        "pathgen.worker": json.dumps(worker),
    }
    stamp = {"instruct_hash": instruct_hash, "created_at": now}  # the failed rows' last columns

    def commit(slide: SlideWork) -> UnitOutcome:
        rows = conversation_rows(slide, result, agent, agents_hash, now)
        # A reply's head is enough to judge it.
        failed = failed_rows(slide.slide_id, slide.rows, result.failures, stamp, ("conversation",), detail_chars=1000)
        status = commit_slide(store, instruct_hash, slide.slide_id, slide.source_commit, rows, failed, extra)
        return UnitOutcome(
            slide.slide_id,
            status,
            len(rows) if status == "ok" else 0,  # a slide another run committed meanwhile is not ours
            round(seconds * len(slide.rows), 3),
            random_weights=any(r["random_weights"] for r in rows) or agent.random_weights,
            columns=_columns(rows, failed, worker),
        )

    return commit_each(work, commit, skipped)


def instruct_slides(
    units: list[str],
    settings: Settings,
    instruct_hash: str,
    agents_hash: str,
    logger: logging.Logger | None = None,
    backend: ChatBackend | None = None,
) -> list[UnitOutcome]:
    """Write and commit a group of slides' conversations; raises PendingWork when infrastructure fails."""
    logger = logger or log
    start = time.perf_counter()
    store = Store(settings.store, settings.s3)
    agent = InstructAgent(settings, logger, backend)
    _check_agent(agent, settings, instruct_hash, agents_hash)
    work, skipped = _gather(store, units, agents_hash, instruct_hash, agent.prompt.has_image)
    sources = {r["patch_id"]: Source(r["revised_description"], r.get("image")) for w in work for r in w.rows}
    try:
        result = agent.run(sources, agents_hash)
    except InfrastructureError as exc:
        message = f"instruct failed, {len(work)} slides stay pending: {redact_urls(str(exc))}"
        raise still_pending(message, skipped, work, exc) from exc
    seconds = (time.perf_counter() - start) / max(1, len(sources))
    return _commit_all(store, work, skipped, result, agent, agents_hash, seconds)


@task(name="instruct-slides", retry_condition_fn=retry_infrastructure, tags=["instruct", "gpu"])
def instruct_slides_task(
    units: list[str], settings: Settings, instruct_hash: str, agents_hash: str
) -> list[UnitOutcome]:
    return instruct_slides(units, settings, instruct_hash, agents_hash, get_run_logger())
