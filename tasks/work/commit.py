"""The one commit protocol of the slide stages (extract, features, caption, instruct), and its shared steps.

1. The flow plans from the store (tasks.work.runner.run_stage): a slide whose marker holds its current inputs is
   done (skipped, or failed where the stage records content failures); the others are to do.
2. A task reads a slide's marker again before its work: another run may have committed it since the plan (skipped).
3. A slide's content objects are written first and its marker last, each whole (a staged file, a single PUT); the
   marker records the inputs it was made from, so that a stopped run's leftovers are never taken for done.
4. A content failure is recorded and final until the slide's inputs change; an infrastructure failure (storage
   through its retries, a model server, the GPU) commits nothing: the task raises PendingWork carrying the outcomes
   of the slides that did finish, Prefect retries it, and what still fails stays pending for the next run.

The markers: extract's ``slides/<id>/slide.json`` (ok, its extraction hash in the shard's footer) after the patch
shard and pictures; features' ``features/<hash>/<id>.parquet`` (its ``slide_inputs``) or its failure record; caption's
and instruct's shard after their failed table, below.

Caption and instruct commit slide by slide: the failed table first, then the shard, the marker. Only content failures
are recorded. Two runs that overlap commit whole objects onto the same keys. Both objects of a slide carry the id of
the commit they belong to, and the shard also carries its failed rows (metadata ``pathgen.failed_rows``): whoever
finds the failed table of another commit than the shard's (an overlapping run wrote it between two commits) rebuilds
it from the shard, so the two always describe the same run.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pathgen.errors import redact_urls, short_error
from tasks.store.objects import Store
from tasks.work.shards import SlideShards, shard_metadata
from tasks.work.units import PendingWork, UnitOutcome, counts_text


def metadata(store: Store, key: str) -> dict[str, str]:
    """A Parquet object's key-value metadata, from its footer alone."""
    with store.open(key) as handle:
        raw = pq.ParquetFile(handle, pre_buffer=False).schema_arrow.metadata or {}
    return {k.decode(): v.decode() for k, v in raw.items()}


def write_table(store: Store, key: str, rows: list, schema: pa.Schema, kind: str, meta: dict[str, str]) -> None:
    """Rows as one Parquet object through the store's staged file: committed whole, never held as bytes."""
    table = pa.Table.from_pylist(rows, schema.with_metadata(shard_metadata(kind, meta)))
    # JPEG bytes do not compress further: an image column is stored as it is, every other one with zstd.
    compression = {n: ("NONE" if n == "image" else "ZSTD") for n in schema.names}
    with store.staged_file(key) as local:
        pq.write_table(table, local, compression=compression)


def commit_tables(
    store: Store, shards: SlideShards, settings_hash: str, slide_id: str, rows: list, failed: list, meta: dict
) -> None:
    """Write a slide's failed table, then its shard (the marker), each stamped with ``meta`` and a new commit id."""
    meta = {**meta, "pathgen.commit_id": uuid.uuid4().hex, "pathgen.failed_items": str(len(failed))}
    failed_key, key = shards.failed_key(settings_hash, slide_id), shards.key(settings_hash, slide_id)
    write_table(store, failed_key, failed, shards.failed_schema, shards.failed_folder, meta)
    shard_meta = {**meta, "pathgen.failed_rows": json.dumps(failed)}
    write_table(store, key, rows, shards.schema, shards.folder, shard_meta)
    sync_failed_table(store, shards, settings_hash, slide_id)


def sync_failed_table(store: Store, shards: SlideShards, settings_hash: str, slide_id: str, rounds: int = 3) -> bool:
    """Make a slide's failed table belong to the standing shard's commit, rebuilding it from the shard's metadata if
    an overlapping run replaced it; returns whether it had to."""
    repaired = False
    # Repeated a few times: another run may commit in between, and every run repairs towards whatever shard stands.
    for _ in range(rounds):
        shard_meta = metadata(store, shards.key(settings_hash, slide_id))
        key = shards.failed_key(settings_hash, slide_id)
        failed_commit = metadata(store, key).get("pathgen.commit_id") if store.exists(key) else None
        if failed_commit == shard_meta.get("pathgen.commit_id") or "pathgen.failed_rows" not in shard_meta:
            return repaired
        rows = json.loads(shard_meta["pathgen.failed_rows"])
        skip = ("pathgen.failed_rows", "pathgen.kind", "pathgen.schema_version")
        meta = {k: v for k, v in shard_meta.items() if k.startswith("pathgen.") and k not in skip}
        meta["pathgen.failed_items"] = str(len(rows))
        write_table(store, key, rows, shards.failed_schema, shards.failed_folder, meta)
        repaired = True
    return repaired


def failed_rows(
    slide_id: str,
    rows: list[dict[str, Any]],
    failures: list[Any],
    stamp: dict[str, str],
    columns: Sequence[str] = (),
    detail_chars: int | None = None,
) -> list[dict[str, Any]]:
    """A failed table's rows: per failure of one of the slide's patches (``rows``) the patch and where it is, the
    failure's own ``columns``, its stage, reason and detail, then ``stamp`` (the settings hash, the time)."""
    by_id = {r["patch_id"]: r for r in rows}
    return [
        {
            "patch_id": f.key,
            "slide_id": slide_id,
            "x": by_id[f.key]["x"],
            "y": by_id[f.key]["y"],
            **{name: getattr(f, name) for name in columns},
            "stage": f.stage,
            "reason": f.reason,
            # No URL credentials; a reply's head (detail_chars) may be enough to judge it.
            "detail": redact_urls(f.detail)[:detail_chars] if isinstance(f.detail, str) else f.detail,
            **stamp,
        }
        for f in failures
        if f.key in by_id
    ]


def outcome_columns(failed: list[dict[str, Any]], worker: dict[str, str], **columns: Any) -> dict[str, Any]:
    """A slide's columns in the run's table: its failed items by stage and reason, the stage's ``columns``, and the
    worker that committed it."""
    reasons: dict[str, int] = {}
    for f in failed:
        reasons[f"{f['stage']}:{f['reason']}"] = reasons.get(f"{f['stage']}:{f['reason']}", 0) + 1
    return {
        "failed": len(failed),
        "failures": counts_text(reasons),
        **columns,
        "worker": f"{worker['host']} pid {worker['pid']} cuda={worker['cuda_visible_devices'] or '-'}",
    }


def still_pending(message: str, done: list[UnitOutcome], slides: Sequence[Any], exc: BaseException) -> PendingWork:
    """PendingWork carrying the outcomes ``done`` and the ``slides`` (pending, with exc's short reason)."""
    pending = [UnitOutcome(s.slide_id, "pending", error=short_error(exc)) for s in slides]
    return PendingWork(message, done + pending)


def commit_each(
    work: Sequence[Any], commit: Callable[[Any], UnitOutcome], done: list[UnitOutcome]
) -> list[UnitOutcome]:
    """``done`` and the outcome of committing each slide of ``work`` in turn (``commit``); raises PendingWork when
    one fails."""
    outcomes = list(done)
    for index, slide in enumerate(work):
        try:
            outcomes.append(commit(slide))
        except Exception as exc:  # storage failed: this slide and the ones after it stay pending
            message = f"committing {slide.slide_id} failed: {short_error(exc)}"
            raise still_pending(message, outcomes, work[index:], exc) from exc
    return outcomes


def pending_raises(outcomes: list[UnitOutcome]) -> list[UnitOutcome]:
    """``outcomes``, or PendingWork carrying them when some slides stayed pending (step 4): Prefect retries the task,
    and the retry skips the slides committed meanwhile."""
    pending = [o for o in outcomes if o.status == "pending"]
    if pending:
        raise PendingWork(f"{len(pending)} slides stay pending: {pending[0].unit}: {pending[0].error}", outcomes)
    return outcomes
