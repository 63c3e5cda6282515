"""Which slides a caption run has to do, from two object listings: patch shards and this agents_hash's pairs.

A slide is done when its pair shard exists and is newer than its patch shard. A pair shard older than (or as old
as) the patch shard may have captioned an earlier extraction: the slide is planned, and the task compares the
extraction hash the pair shard records with the patch shard's before doing any work.
"""

from __future__ import annotations

from dataclasses import dataclass

from tasks.captions.records import pair_key, pairs_prefix, slide_of
from tasks.store.listing import list_mtimes
from tasks.store.objects import Store
from tasks.work.units import in_part


@dataclass(frozen=True)
class CaptionPlan:
    pending: list[str]  # slide ids, sorted
    done: list[str]


def plan_captions(store: Store, agents_hash: str, part: int | None = None, parts: int = 1) -> CaptionPlan:
    patches = list_mtimes(store, "patches", ".parquet")
    pairs = list_mtimes(store, pairs_prefix(agents_hash), ".parquet")
    pending, done = [], []
    for key, patch_mtime in sorted(patches.items()):
        slide_id = slide_of(key)
        pair_mtime = pairs.get(pair_key(agents_hash, slide_id))
        (done if pair_mtime is not None and pair_mtime > patch_mtime else pending).append(slide_id)
    return CaptionPlan(in_part(pending, part, parts), in_part(done, part, parts))
