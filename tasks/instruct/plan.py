"""Which slides an instruct run has to do, from two object listings: this agents_hash's pair shards and this
instruct_hash's conversation shards; and which pairs it reads.

A slide is done when its instruct shard exists and is newer than its pair shard. One older than (or as old as) the
pair shard may have been written from an earlier captioning of the slide: the slide is planned, and the task compares
the pair shard's commit id recorded in the instruct shard with the pair shard's own before doing any work.
"""

from __future__ import annotations

from dataclasses import dataclass

from pathgen.settings import SettingsError
from tasks.captions.export import agents_hashes
from tasks.captions.records import pairs_prefix, slide_of
from tasks.instruct.records import instruct_key, instruct_prefix
from tasks.store.listing import list_mtimes
from tasks.store.objects import Store
from tasks.work.units import in_part


class NoPairsError(ValueError):
    """The store holds no pair shards: nothing to write conversations from until ``pathgen caption`` has run."""


@dataclass(frozen=True)
class InstructPlan:
    pending: list[str]  # slide ids, sorted
    done: list[str]


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
) -> InstructPlan:
    pairs = list_mtimes(store, pairs_prefix(agents_hash), ".parquet")
    made = list_mtimes(store, instruct_prefix(instruct_hash), ".parquet")
    pending, done = [], []
    for key, pair_mtime in sorted(pairs.items()):
        slide_id = slide_of(key)
        made_mtime = made.get(instruct_key(instruct_hash, slide_id))
        (done if made_mtime is not None and made_mtime > pair_mtime else pending).append(slide_id)
    return InstructPlan(in_part(pending, part, parts), in_part(done, part, parts))
