"""Committing one slide's conversations: its failed table first, then its instruct shard, the marker.

As for captions, two overlapping runs can only write whole objects onto the same keys. Both objects carry the id of
the commit they belong to, and the instruct shard also carries its failed rows (``pathgen.failed_rows``): whoever
finds a failed table of another commit than the standing instruct shard's rebuilds it from that shard, so the two
always describe the same run. The instruct shard records the commit id of the pair shard it was written from
(``pathgen.source_commit_id``): a slide captioned again is pending again.
"""

from __future__ import annotations

from typing import Any

from tasks.instruct.records import INSTRUCT, instruct_key
from tasks.store.objects import Store
from tasks.work.commit import commit_tables, metadata
from tasks.work.commit import sync_failed_table as sync_shards_failed_table

SOURCE_COMMIT = "pathgen.source_commit_id"


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
    meta = {**extra, "pathgen.slide_id": slide_id, SOURCE_COMMIT: source_commit}
    commit_tables(store, INSTRUCT, instruct_hash, slide_id, rows, failed, meta)
    return "ok"


def sync_failed_table(store: Store, instruct_hash: str, slide_id: str, rounds: int = 3) -> bool:
    """Make the failed table belong to the standing instruct shard's commit (see tasks.work.commit)."""
    return sync_shards_failed_table(store, INSTRUCT, instruct_hash, slide_id, rounds)
