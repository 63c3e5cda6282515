"""Exports of pair shards: PathGen-1.6M JSON (``wsi_id``, ``position`` [x, y] as strings, ``caption``,
``file_id``), so that our pairs and the released ones read with the same code.

The export stays a plain list of records, readable by PathGen-1.6M code; a record captioned by models with random
weights also carries ``"random_weights": true`` (absent otherwise, as in the released data). Beside it,
``<out>.provenance.json`` says what made the pairs: the agents_hash, each role's model and identity, and
``random_weights``, and what the reviews did (``reviews``: the mode, ``export.reviews``, and how many pairs were
reviewed, accepted, rejected and left out, corrected; see ``tasks.reviews.store``)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pyarrow.parquet as pq

from tasks.captions.records import pairs_prefix, slide_of
from tasks.reviews.store import ExportReviews
from tasks.slides.shard import read_shard
from tasks.store.objects import Store

ROLES = ("describe", "revise", "summarize")
COLUMNS = ["patch_id", "slide_id", "x", "y", "caption", "file_id", "random_weights"]
COLUMNS += [f"{role}_model" for role in ROLES]


def agents_hashes(store: Store) -> list[str]:
    return sorted({key.split("/")[1] for key in store.list("pairs", ".parquet")})


def provenance_path(out: str | Path) -> Path:
    """Where the export of ``out`` keeps its provenance: ``<out>.provenance.json``."""
    return Path(f"{out}.provenance.json")


@dataclass
class _Collected:
    """What the export gathers while it reads the pair shards."""

    records: list[dict[str, Any]] = field(default_factory=list)
    random_records: int = 0
    models: dict[str, set[str]] = field(default_factory=lambda: {role: set() for role in ROLES})
    provenance: dict[str, Any] | None = None  # the first shard's pathgen.provenance

    def add(self, row: dict[str, Any]) -> None:
        """One pair as a PathGen-1.6M record."""
        record = {"wsi_id": row["slide_id"], "position": [str(row["x"]), str(row["y"])], "caption": row["caption"]}
        if row.get("file_id"):
            record["file_id"] = row["file_id"]
        if row.get("random_weights"):
            record["random_weights"] = True
            self.random_records += 1
        for role in ROLES:
            if row.get(f"{role}_model"):
                self.models[role].add(row[f"{role}_model"])
        self.records.append(record)


def export_pathgen_json(
    store: Store, out: str | Path, agents_hash: str | None = None, reviews: Literal["apply", "ignore"] = "apply"
) -> int:
    """Write every pair of one agents_hash as a PathGen-1.6M JSON list, and its provenance beside it (see
    ``provenance_path``); ``reviews`` (``export.reviews``): apply them (rejected pairs left out, corrected captions
    used) or ignore them. Returns how many records."""
    agents_hash = _chosen_agents_hash(store, agents_hash)
    collected = _Collected()
    reviewed = ExportReviews.of(store, agents_hash, reviews)
    for key in store.list(pairs_prefix(agents_hash), ".parquet"):
        meta, rows = _read_pairs(store, key)
        if collected.provenance is None and "pathgen.provenance" in meta:
            collected.provenance = json.loads(meta["pathgen.provenance"])
        for row in reviewed.apply(slide_of(key), rows):
            collected.add(row)
    Path(out).write_text(json.dumps(collected.records, indent=1) + "\n")
    sidecar = _sidecar(out, agents_hash, collected, reviewed.provenance())
    provenance_path(out).write_text(json.dumps(sidecar, indent=1) + "\n")
    return len(collected.records)


def _chosen_agents_hash(store: Store, agents_hash: str | None) -> str:
    """The agents_hash asked for, or the store's only one; a ValueError naming those found otherwise."""
    hashes = agents_hashes(store)
    if agents_hash is None:
        if len(hashes) != 1:
            found = ", ".join(hashes) if hashes else "none"
            raise ValueError(f"choose the pairs to export with --agents-hash (found: {found})")
        return hashes[0]
    if agents_hash not in hashes:
        raise ValueError(f"no pairs under agents_hash {agents_hash!r} (found: {', '.join(hashes) or 'none'})")
    return agents_hash


def _read_pairs(store: Store, key: str) -> tuple[dict[str, str], list[dict[str, Any]]]:
    """(the shard's file metadata, its rows in the exported columns it has)."""
    with store.open(key) as handle:
        shard = pq.ParquetFile(handle, pre_buffer=False)
        meta = {k.decode(): v.decode() for k, v in (shard.schema_arrow.metadata or {}).items()}
        table = read_shard(handle, columns=[c for c in COLUMNS if c in shard.schema_arrow.names])
    return meta, table.to_pylist()


def _sidecar(out: str | Path, agents_hash: str, collected: _Collected, reviews: dict[str, Any]) -> dict[str, Any]:
    provenance = collected.provenance or {}
    roles = provenance.get("roles", {})
    models = {role: ", ".join(sorted(collected.models[role])) or roles.get(role, {}).get("model") for role in ROLES}
    return {
        "export": str(out),
        "format": "pathgen-1.6m-json",
        "agents_hash": agents_hash,
        "records": len(collected.records),
        "random_weights": collected.random_records > 0 or bool(provenance.get("random_weights")),
        "random_weight_records": collected.random_records,
        "models": models,
        "identities": {role: roles[role].get("identity") for role in ROLES if role in roles},
        "provenance": collected.provenance,
        "reviews": reviews,
    }
