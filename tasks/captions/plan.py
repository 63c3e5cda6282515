"""Which slides a caption run has to do, from two object listings: patch shards and this agents_hash's pairs.

A slide is done when its pair shard exists and is newer than its patch shard. A pair shard older than (or as old
as) the patch shard may have captioned an earlier extraction: the slide is planned, and the task compares the
extraction hash the pair shard records with the patch shard's before doing any work.
"""

from __future__ import annotations

from tasks.captions.records import pairs_prefix
from tasks.store.objects import Store
from tasks.work.shards import plan_slides
from tasks.work.units import UnitPlan


def plan_captions(store: Store, agents_hash: str, part: int | None = None, parts: int = 1) -> UnitPlan:
    return plan_slides(store, "patches", pairs_prefix(agents_hash), part, parts)
