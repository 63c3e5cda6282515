"""A slide stage's objects in the store, their metadata, and which slides a run of it still has to do.

Under one settings hash a stage writes, per slide, a shard ``<folder>/<hash>/<slide_id>.parquet`` whose existence marks
the slide done, and a failed table ``<failed folder>/<hash>/<slide_id>.parquet``: a folder of its own, so that the
shards' folder loads as one dataset.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from pathgen import __version__
from tasks.store.listing import list_mtimes
from tasks.store.objects import Store
from tasks.work.units import UnitPlan, in_part

SCHEMA_VERSION = "1"  # of every shard the factory writes: patches, pairs, instruct, failed tables, reviews


def shard_metadata(kind: str, extra: dict[str, str] | None = None) -> dict[bytes, bytes]:
    """A shard's Parquet key-value metadata: its kind, the schema and factory versions, then ``extra``."""
    meta = {"pathgen.schema_version": SCHEMA_VERSION, "pathgen.kind": kind, "pathgen.factory_version": __version__}
    meta.update(extra or {})
    return {k.encode(): str(v).encode() for k, v in meta.items()}


def slide_key(prefix: str, slide_id: str) -> str:
    """The key of a slide's object below ``prefix``."""
    return f"{prefix}/{slide_id}.parquet"


def slide_of(key: str) -> str:
    """The slide id of a key made by :func:`slide_key`."""
    return key.rsplit("/", 1)[-1][: -len(".parquet")]


@dataclass(frozen=True)
class SlideShards:
    """Where a stage's shards and failed tables live, and what they hold."""

    folder: str  # also the shards' pathgen.kind
    failed_folder: str  # also the failed tables' pathgen.kind
    schema: pa.Schema
    failed_schema: pa.Schema

    def prefix(self, settings_hash: str) -> str:
        """The folder of the shards written under one settings hash."""
        return f"{self.folder}/{settings_hash}"

    def failed_prefix(self, settings_hash: str) -> str:
        """The folder of the failed tables written under one settings hash."""
        return f"{self.failed_folder}/{settings_hash}"

    def key(self, settings_hash: str, slide_id: str) -> str:
        """A slide's shard: its existence marks the slide done."""
        return slide_key(self.prefix(settings_hash), slide_id)

    def failed_key(self, settings_hash: str, slide_id: str) -> str:
        """A slide's failed table."""
        return slide_key(self.failed_prefix(settings_hash), slide_id)


def plan_slides(store: Store, sources: str, outputs: str, part: int | None = None, parts: int = 1) -> UnitPlan:
    """The pending and done slide ids of this part, sorted, from two listings: a slide is done when its object below
    ``outputs`` is newer than its object below ``sources``."""
    source_mtimes = list_mtimes(store, sources, ".parquet")
    output_mtimes = list_mtimes(store, outputs, ".parquet")
    pending, done = [], []
    for key, source_mtime in sorted(source_mtimes.items()):
        slide_id = slide_of(key)
        output_mtime = output_mtimes.get(slide_key(outputs, slide_id))
        # An output as old as its source may come from an earlier source: planned, and the task decides.
        (done if output_mtime is not None and output_mtime > source_mtime else pending).append(slide_id)
    return UnitPlan(in_part(pending, part, parts), in_part(done, part, parts))
