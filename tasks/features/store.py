"""Slide features in the store: ``features/<features_hash>/<slide_id>.parquet``, one row per tissue patch.

Columns: ``x, y, w0, h0`` (the patch's level-0 box), ``tissue_fraction`` and ``feature`` (a fixed-size list of
float32, the encoder's output for the patch). The file's metadata holds what the vectors mean: the features hash,
the encoder identity (its spec and the content digest of its checkpoint), the microns per pixel and side of the
encoded patches, the dimension, and the slide's source identity (a slide whose file changed is featured again).
Each file is written through a staged local file and committed whole: its existence marks the slide done.

A slide whose content failed (unreadable, no tissue) is recorded in ``features/<features_hash>/failed/<slide_id>.json``
with its reason; infrastructure failures record nothing (the slide stays pending).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.store.objects import Store

PREFIX = "features"
FORMAT = "pathgen-features/1"
META = "pathgen."  # every metadata key starts with it
BOX_COLUMNS = ("x", "y", "w0", "h0")


def features_prefix(features_hash: str) -> str:
    return f"{PREFIX}/{features_hash}"


def features_key(features_hash: str, slide_id: str) -> str:
    return f"{features_prefix(features_hash)}/{slide_id}.parquet"


def failed_key(features_hash: str, slide_id: str) -> str:
    return f"{features_prefix(features_hash)}/failed/{slide_id}.json"


def manifest_key(features_hash: str) -> str:
    """``features.json``: the encoder identity and settings of this features hash, written by every run."""
    return f"{features_prefix(features_hash)}/features.json"


@dataclass
class FeatureTable:
    """One slide's features: ``features`` N x D float32, ``boxes`` N x 4 level-0 (x, y, w0, h0), ``tissue`` N.

    ``meta`` holds the file metadata without the ``pathgen.`` prefix, each value JSON-decoded (every value is
    written as JSON)."""

    slide_id: str
    features: np.ndarray
    boxes: np.ndarray
    tissue: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.features = np.asarray(self.features, dtype=np.float32)
        self.boxes = np.asarray(self.boxes, dtype=np.int64).reshape(-1, 4)
        self.tissue = np.asarray(self.tissue, dtype=np.float32).reshape(-1)
        n = len(self.boxes)
        if self.features.ndim != 2 or len(self.features) != n or len(self.tissue) != n:
            raise ValueError(
                f"{self.slide_id}: features {self.features.shape}, boxes {self.boxes.shape} and tissue "
                f"{self.tissue.shape} must describe the same N patches (features N x D)"
            )

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    @property
    def coords(self) -> np.ndarray:
        """N x 2 level-0 (x, y) of each patch's top-left corner, as CLAM and TRIDENT store them."""
        return self.boxes[:, :2]


def table_of(features: FeatureTable, meta: dict[str, Any]) -> pa.Table:
    """The Parquet table of a slide's features with ``meta`` (and the format, slide id and dimension) as metadata."""
    dim = features.dim
    flat = pa.array(features.features.reshape(-1), type=pa.float32())
    columns = {name: pa.array(features.boxes[:, i], type=pa.int64()) for i, name in enumerate(BOX_COLUMNS)}
    columns["tissue_fraction"] = pa.array(features.tissue, type=pa.float32())
    columns["feature"] = pa.FixedSizeListArray.from_arrays(flat, dim)
    full = {"format": FORMAT, "slide_id": features.slide_id, "dim": dim, **meta}
    encoded = {f"{META}{k}".encode(): _encode(v).encode() for k, v in full.items()}
    return pa.table(columns).replace_schema_metadata(encoded)


def write_features(store: Store, features_hash: str, features: FeatureTable, meta: dict[str, Any]) -> str:
    """Commit one slide's features whole (staged file, then one upload or rename); returns the key."""
    key = features_key(features_hash, features.slide_id)
    table = table_of(features, {"features_hash": features_hash, **meta})
    with store.staged_file(key) as local:
        pq.write_table(table, local, compression={n: "ZSTD" for n in table.column_names})
    return key


def read_meta(store: Store, key: str) -> dict[str, Any]:
    """A features file's metadata from its footer alone, prefix removed and values decoded."""
    with store.open(key) as handle:
        raw = pq.ParquetFile(handle, pre_buffer=False).schema_arrow.metadata or {}
    return _decoded(raw)


def read_features(store: Store, features_hash: str, slide_id: str) -> FeatureTable:
    """One slide's committed features; a FileNotFoundError names the key when the slide was not featured."""
    key = features_key(features_hash, slide_id)
    with store.open(key) as handle:
        table = pq.read_table(handle)
    return from_table(slide_id, table)


def from_table(slide_id: str, table: pa.Table) -> FeatureTable:
    meta = _decoded(table.schema.metadata or {})
    feature = table.column("feature").combine_chunks()
    dim = int(meta.get("dim") or feature.type.list_size)
    values = feature.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
    boxes = np.stack([table.column(n).to_numpy() for n in BOX_COLUMNS], axis=1) if len(table) else np.zeros((0, 4))
    tissue = table.column("tissue_fraction").to_numpy(zero_copy_only=False)
    return FeatureTable(slide_id, values, boxes, tissue, meta)


def featured_slides(store: Store, features_hash: str) -> list[str]:
    """The slide ids with committed features under ``features_hash``, sorted."""
    prefix = features_prefix(features_hash) + "/"
    keys = store.list(features_prefix(features_hash), ".parquet")
    return sorted(k[len(prefix) : -len(".parquet")] for k in keys if "/" not in k[len(prefix) :])


def features_hashes(store: Store) -> list[str]:
    """Every features hash in the store (the folders under ``features/`` holding a ``features.json``)."""
    return sorted({k.split("/")[1] for k in store.list(PREFIX, "/features.json") if k.count("/") == 2})


def _encode(value: Any) -> str:
    return json.dumps(value, sort_keys=True)  # strings too: a slide id "0012" must come back a string


def _decoded(raw: dict[bytes, bytes]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for key, value in raw.items():
        name = key.decode()
        if not name.startswith(META):
            continue
        text = value.decode()
        try:
            found[name[len(META) :]] = json.loads(text)
        except ValueError:
            found[name[len(META) :]] = text
    return found
