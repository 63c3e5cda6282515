"""Which slides a caption run has to do, from two object listings: patch shards and this agents_hash's pairs.

A slide is done when its pair shard exists and is newer than its patch shard. A pair shard older than (or as old
as) the patch shard may have captioned an earlier extraction: the slide is planned, and the task compares the
extraction hash the pair shard records with the patch shard's before doing any work.
"""

from __future__ import annotations

from tasks.captions.records import pairs_prefix
from tasks.store.objects import Store
from tasks.work.shards import SlidePlan, plan_slides


class CaptionPlan(SlidePlan):
    """The slides a caption run has to do, and those already done."""


def plan_captions(store: Store, agents_hash: str, part: int | None = None, parts: int = 1) -> CaptionPlan:
    return CaptionPlan(*plan_slides(store, "patches", pairs_prefix(agents_hash), part, parts))
