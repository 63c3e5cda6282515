"""Committing one slide's conversations: its failed table first, then its instruct shard, the marker.

As for captions, two overlapping runs can only write whole objects onto the same keys. Both objects carry the id of
the commit they belong to, and the instruct shard also carries its failed rows (``pathgen.failed_rows``): whoever
finds a failed table of another commit than the standing instruct shard's rebuilds it from that shard, so the two
always describe the same run. The instruct shard records the commit id of the pair shard it was written from
(``pathgen.source_commit_id``): a slide captioned again is pending again.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from tasks.instruct.records import (
    INSTRUCT_FAILED_SCHEMA,
    INSTRUCT_SCHEMA,
    instruct_failed_key,
    instruct_key,
)
from tasks.slides.shard import shard_metadata
from tasks.store.objects import Store

SOURCE_COMMIT = "pathgen.source_commit_id"


def metadata(store: Store, key: str) -> dict[str, str]:
    """A Parquet object's key-value metadata, from its footer alone."""
    with store.open(key) as handle:
        raw = pq.ParquetFile(handle, pre_buffer=False).schema_arrow.metadata or {}
    return {k.decode(): v.decode() for k, v in raw.items()}


def write_table(store: Store, key: str, rows: list, schema: pa.Schema, kind: str, meta: dict[str, str]) -> None:
    """Rows as one Parquet object, through the store's staged file: committed whole or not at all."""
    table = pa.Table.from_pylist(rows, schema.with_metadata(shard_metadata(kind, meta)))
    with store.staged_file(key) as local:
        pq.write_table(table, local, compression="zstd")


def is_current(store: Store, instruct_hash: str, slide_id: str, source_commit: str) -> bool:
    """Whether the committed instruct shard was written from this very pair shard."""
    key = instruct_key(instruct_hash, slide_id)
    return store.exists(key) and metadata(store, key).get(SOURCE_COMMIT) == source_commit


def commit_slide(
    store: Store,
    instruct_hash: str,
    slide_id: str,
    source_commit: str,
    rows: list[dict[str, Any]],
    failed: list[dict[str, Any]],
    extra: dict[str, str],
) -> str:
    """Failed table first, instruct shard last; "ok", or "skipped" when another run committed this slide from the
    same pair shard meanwhile."""
    if is_current(store, instruct_hash, slide_id, source_commit):
        return "skipped"
    meta = {
        **extra,
        "pathgen.slide_id": slide_id,
        SOURCE_COMMIT: source_commit,
        "pathgen.commit_id": uuid.uuid4().hex,
        "pathgen.failed_items": str(len(failed)),
    }
    key = instruct_failed_key(instruct_hash, slide_id)
    write_table(store, key, failed, INSTRUCT_FAILED_SCHEMA, "failed-instruct", meta)
    shard_meta = {**meta, "pathgen.failed_rows": json.dumps(failed)}
    write_table(store, instruct_key(instruct_hash, slide_id), rows, INSTRUCT_SCHEMA, "instruct", shard_meta)
    sync_failed_table(store, instruct_hash, slide_id)
    return "ok"


def sync_failed_table(store: Store, instruct_hash: str, slide_id: str, rounds: int = 3) -> bool:
    """Make the failed table belong to the standing instruct shard's commit, rebuilding it from the shard's metadata
    when an overlapping run replaced it; returns whether it had to."""
    repaired = False
    for _ in range(rounds):
        shard_meta = metadata(store, instruct_key(instruct_hash, slide_id))
        key = instruct_failed_key(instruct_hash, slide_id)
        failed_commit = metadata(store, key).get("pathgen.commit_id") if store.exists(key) else None
        if failed_commit == shard_meta.get("pathgen.commit_id") or "pathgen.failed_rows" not in shard_meta:
            return repaired
        rows = json.loads(shard_meta["pathgen.failed_rows"])
        skip = ("pathgen.failed_rows", "pathgen.kind", "pathgen.schema_version")
        meta = {k: v for k, v in shard_meta.items() if k.startswith("pathgen.") and k not in skip}
        write_table(store, key, rows, INSTRUCT_FAILED_SCHEMA, "failed-instruct", meta)
        repaired = True
    return repaired
