"""Caption shards: which selected patches go together, and captioning one shard into its pair and failed tables.

Pending patches (selected, and not yet in a committed pair shard or failed table of this ``agents_hash``) are
ordered by (slide_id, patch_id) and cut into shards of ``agents.shard_size``; a shard's id hashes its agents_hash
and patch ids, so the same inputs always make the same shards. A shard commits its failed table, then its pair
shard (the marker): a re-run finds the pair shard and skips those patches; a different model or prompt is a
different agents_hash, written beside the earlier pairs, never over them.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import posixpath
import time
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from prefect import get_run_logger, task

from agents.pipeline import CaptionAgents
from pathgen import __version__
from pathgen.settings import Settings
from tasks.errors import retry_only_transient
from tasks.slides.shard import PATCH_SCHEMA, read_shard, shard_metadata
from tasks.store.objects import Store

PATCH_FIELDS = [f for f in PATCH_SCHEMA if f.name != "embedding"]
PAIR_SCHEMA = pa.schema(
    [
        *PATCH_FIELDS,
        pa.field("description", pa.string(), nullable=False),
        pa.field("revised_description", pa.string(), nullable=False),
        pa.field("revise_changed", pa.bool_(), nullable=False),
        pa.field("revise_change", pa.float32(), nullable=False),
        pa.field("caption", pa.string(), nullable=False),
        pa.field("caption_tokens", pa.int16(), nullable=False),
        pa.field("caption_trimmed", pa.bool_(), nullable=False),
        pa.field("describe_model", pa.string(), nullable=False),
        pa.field("revise_model", pa.string(), nullable=False),
        pa.field("summarize_model", pa.string(), nullable=False),
        pa.field("prompt_versions", pa.string(), nullable=False),  # JSON
        pa.field("sampling", pa.string(), nullable=False),  # JSON
        pa.field("agents_hash", pa.string(), nullable=False),
        pa.field("random_weights", pa.bool_(), nullable=False),
        pa.field("factory_version", pa.string(), nullable=False),
        pa.field("created_at", pa.string(), nullable=False),
    ]
)
FAILED_SCHEMA = pa.schema(
    [
        pa.field("patch_id", pa.string(), nullable=False),
        pa.field("slide_id", pa.string(), nullable=False),
        pa.field("x", pa.int64()),
        pa.field("y", pa.int64()),
        pa.field("stage", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("detail", pa.string()),
        pa.field("agents_hash", pa.string(), nullable=False),
        pa.field("created_at", pa.string(), nullable=False),
    ]
)


def pairs_prefix(agents_hash: str) -> str:
    return f"pairs/{agents_hash}"


def pair_key(agents_hash: str, shard_id: str) -> str:
    return f"{pairs_prefix(agents_hash)}/{shard_id}.parquet"


def failed_key(agents_hash: str, shard_id: str) -> str:
    return f"{pairs_prefix(agents_hash)}/{shard_id}.failed.parquet"


@dataclass(frozen=True)
class CaptionShard:
    shard_id: str
    items: tuple[tuple[str, str], ...]  # (slide_id, patch_id)


@dataclass
class ShardOutcome:
    shard_id: str
    status: str  # ok | skipped | failed
    pairs: int
    failures: dict[str, int] = field(default_factory=dict)
    tokens_mean: float = 0.0
    tokens_max: int = 0
    changed_share: float = 0.0
    trimmed: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    error: str | None = None


def _column(store: Store, key: str, name: str) -> list:
    with store.open(key) as handle:
        return read_shard(handle, columns=[name])[name].to_pylist()


def done_patch_ids(store: Store, agents_hash: str) -> set[str]:
    """Patches already paired or recorded as failed under this agents_hash (committed shards only)."""
    done: set[str] = set()
    for key in store.list(pairs_prefix(agents_hash), ".parquet"):
        if key.endswith(".failed.parquet"):
            continue
        done.update(_column(store, key, "patch_id"))
        shard_failed = key[: -len(".parquet")] + ".failed.parquet"
        if store.exists(shard_failed):
            done.update(_column(store, shard_failed, "patch_id"))
    return done


def plan_caption_shards(store: Store, agents_hash: str, shard_size: int) -> tuple[list[CaptionShard], int]:
    """(shards of pending patches, how many patches were already done)."""
    done = done_patch_ids(store, agents_hash)
    pending: list[tuple[str, str]] = []
    for key in store.list("patches", ".parquet"):
        slide_id = posixpath.basename(key)[: -len(".parquet")]
        pending.extend((slide_id, pid) for pid in sorted(_column(store, key, "patch_id")) if pid not in done)
    pending.sort()
    shards = []
    for start in range(0, len(pending), shard_size):
        items = tuple(pending[start : start + shard_size])
        digest = hashlib.sha256((agents_hash + "\n" + "\n".join(p for _, p in items)).encode()).hexdigest()[:16]
        shards.append(CaptionShard(f"shard-{digest}", items))
    return shards, len(done)


def _load_patches(store: Store, items: tuple[tuple[str, str], ...]) -> list[dict[str, Any]]:
    wanted: dict[str, set[str]] = {}
    for slide_id, patch_id in items:
        wanted.setdefault(slide_id, set()).add(patch_id)
    rows: list[dict[str, Any]] = []
    for slide_id, ids in sorted(wanted.items()):
        with store.open(f"patches/{slide_id}.parquet") as handle:
            table = read_shard(handle, columns=[f.name for f in PATCH_FIELDS])
        rows.extend(table.filter(pc.is_in(table["patch_id"], pa.array(sorted(ids)))).to_pylist())
    order = {pid: i for i, (_, pid) in enumerate(items)}
    return sorted(rows, key=lambda r: order[r["patch_id"]])


def caption_shard(shard: CaptionShard, settings: Settings, logger: logging.Logger | None = None) -> ShardOutcome:
    """Caption one shard and commit its failed table and pair shard (pure of Prefect; the task wraps it)."""
    store = Store(settings.store, settings.s3)
    agents = CaptionAgents(settings.agents, logger)
    agents_hash = agents.agents_hash()
    if store.exists(pair_key(agents_hash, shard.shard_id)):
        return ShardOutcome(
            shard.shard_id, "skipped", len(_column(store, pair_key(agents_hash, shard.shard_id), "patch_id"))
        )
    rows = _load_patches(store, shard.items)
    result = agents.run({r["patch_id"]: r["image"] for r in rows})
    now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    provenance = agents.provenance()
    roles = provenance["roles"]
    prompts = json.dumps(
        {name: role["prompt"] for name, role in roles.items()} | {"shorten": provenance["shorten_prompt"]}
    )
    sampling = json.dumps({name: role["sampling"] for name, role in roles.items()})
    pairs = []
    for row in rows:
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
                "random_weights": provenance["random_weights"],
                "factory_version": __version__,
                "created_at": now,
            }
        )
    by_id = {r["patch_id"]: r for r in rows}
    failed = [
        {
            "patch_id": f.key,
            "slide_id": by_id[f.key]["slide_id"],
            "x": by_id[f.key]["x"],
            "y": by_id[f.key]["y"],
            "stage": f.stage,
            "reason": f.reason,
            "detail": f.detail,
            "agents_hash": agents_hash,
            "created_at": now,
        }
        for f in result.failures
    ]
    meta = {
        "pathgen.agents_hash": agents_hash,
        "pathgen.shard_id": shard.shard_id,
        "pathgen.provenance": json.dumps(provenance),
    }
    # Failed table first, pair shard last: the pair shard's presence is what marks the shard as committed.
    _commit_table(store, failed_key(agents_hash, shard.shard_id), failed, FAILED_SCHEMA, "failed", meta)
    _commit_table(store, pair_key(agents_hash, shard.shard_id), pairs, PAIR_SCHEMA, "pairs", meta)
    tokens = [p["caption_tokens"] for p in pairs]
    reasons: dict[str, int] = {}
    for f in result.failures:
        reasons[f"{f.stage}:{f.reason}"] = reasons.get(f"{f.stage}:{f.reason}", 0) + 1
    return ShardOutcome(
        shard.shard_id,
        "ok",
        len(pairs),
        reasons,
        round(sum(tokens) / len(tokens), 2) if tokens else 0.0,
        max(tokens, default=0),
        round(sum(p["revise_changed"] for p in pairs) / len(pairs), 4) if pairs else 0.0,
        sum(p["caption_trimmed"] for p in pairs),
        {k: round(v, 3) for k, v in result.seconds.items()},
    )


def _commit_table(
    store: Store, key: str, rows: list[dict[str, Any]], schema: pa.Schema, kind: str, meta: dict[str, str]
) -> None:
    """Write rows as one Parquet file through the store's staged file: committed whole, never held as bytes."""
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(rows, schema.with_metadata(shard_metadata(kind, meta)))
    with store.staged_file(key) as local:
        pq.write_table(table, local, compression={n: ("NONE" if n == "image" else "ZSTD") for n in schema.names})


@task(
    name="caption-shard",
    retries=2,
    retry_delay_seconds=[30, 120],
    retry_condition_fn=retry_only_transient,
    tags=["caption", "gpu"],
)
def caption_shard_task(shard: CaptionShard, settings: Settings) -> ShardOutcome:
    start = time.perf_counter()
    outcome = caption_shard(shard, settings, get_run_logger())
    outcome.seconds["total"] = round(time.perf_counter() - start, 3)
    return outcome
