"""Which slides an instruct run has to do, from two object listings: this agents_hash's pair shards and this
instruct_hash's conversation shards; and which pairs it reads.

A slide is done when its instruct shard exists and is newer than its pair shard. One older than (or as old as) the
pair shard may have been written from an earlier captioning of the slide: the slide is planned, and the task compares
the pair shard's commit id recorded in the instruct shard with the pair shard's own before doing any work.
"""

from __future__ import annotations

from pathgen.settings import SettingsError
from tasks.captions.export import agents_hashes
from tasks.captions.records import pairs_prefix
from tasks.instruct.records import instruct_prefix
from tasks.store.objects import Store
from tasks.work.shards import plan_slides
from tasks.work.units import UnitPlan


class NoPairsError(ValueError):
    """The store holds no pair shards: nothing to write conversations from until ``pathgen caption`` has run."""


def source_agents_hash(store: Store, wanted: str | None) -> str:
    """The pairs to read: ``wanted`` (instruct.agents_hash) or the only agents_hash in the store."""
    hashes = agents_hashes(store)
    if not hashes:
        raise NoPairsError(
            f"no pair shards in the store {store.url} (nothing under {store.uri('pairs')}/), so no descriptions to "
            f"write conversations from; make them first: pathgen caption --store {store.url}"
        )
    if wanted is not None and wanted not in hashes:
        raise SettingsError(f"instruct.agents_hash {wanted!r} has no pairs in the store; found: {', '.join(hashes)}")
    if wanted is None and len(hashes) > 1:
        raise SettingsError(
            f"the store holds pairs of several agents_hashes ({', '.join(hashes)}): set instruct.agents_hash"
        )
    return wanted or hashes[0]


def plan_instruct(
    store: Store, agents_hash: str, instruct_hash: str, part: int | None = None, parts: int = 1
) -> UnitPlan:
    return plan_slides(store, pairs_prefix(agents_hash), instruct_prefix(instruct_hash), part, parts)
