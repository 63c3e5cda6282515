"""Exports of pair shards: PathGen-1.6M JSON (``wsi_id``, ``position`` [x, y] as strings, ``caption``,
``file_id``), so that our pairs and the released ones read with the same code."""

from __future__ import annotations

import json
from pathlib import Path

from tasks.captions.records import pairs_prefix
from tasks.slides.shard import read_shard
from tasks.store.objects import Store


def agents_hashes(store: Store) -> list[str]:
    return sorted({key.split("/")[1] for key in store.list("pairs", ".parquet")})


def export_pathgen_json(store: Store, out: str | Path, agents_hash: str | None = None) -> int:
    """Write every pair of one agents_hash as a PathGen-1.6M JSON list; returns how many records."""
    hashes = agents_hashes(store)
    if agents_hash is None:
        if len(hashes) != 1:
            found = ", ".join(hashes) if hashes else "none"
            raise ValueError(f"choose the pairs to export with --agents-hash (found: {found})")
        agents_hash = hashes[0]
    elif agents_hash not in hashes:
        raise ValueError(f"no pairs under agents_hash {agents_hash!r} (found: {', '.join(hashes) or 'none'})")
    records = []
    for key in store.list(pairs_prefix(agents_hash), ".parquet"):
        with store.open(key) as handle:
            table = read_shard(handle, columns=["slide_id", "x", "y", "caption", "file_id"])
        for row in table.to_pylist():
            record = {"wsi_id": row["slide_id"], "position": [str(row["x"]), str(row["y"])], "caption": row["caption"]}
            if row["file_id"]:
                record["file_id"] = row["file_id"]
            records.append(record)
    Path(out).write_text(json.dumps(records, indent=1) + "\n")
    return len(records)
