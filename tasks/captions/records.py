"""The pair and failed-item records, and where a slide's captions live in the store.

Under one agents_hash a slide's pairs are one object, ``pairs/<agents_hash>/<slide_id>.parquet``, whose existence
marks the slide done; its content failures are ``failed/<agents_hash>/<slide_id>.parquet``, committed first, in a
folder of their own so that ``pairs/<agents_hash>/`` loads as one dataset.
"""

from __future__ import annotations

import pyarrow as pa

from tasks.slides.shard import PATCH_SCHEMA
from tasks.work.shards import SlideShards, slide_key
from tasks.work.shards import slide_of as slide_of  # re-exported: tasks.clip.webdataset reads it from here

PATCH_FIELDS = [f for f in PATCH_SCHEMA if f.name != "embedding"]
PAIR_SCHEMA = pa.schema(
    [
        *PATCH_FIELDS,
        pa.field("description", pa.string(), nullable=False),
        pa.field("revised_description", pa.string(), nullable=False),
        pa.field("revise_changed", pa.bool_(), nullable=False),
        pa.field("revise_change", pa.float32(), nullable=False),
        pa.field("caption", pa.string(), nullable=False),
        pa.field("caption_tokens", pa.int16(), nullable=False),
        pa.field("caption_trimmed", pa.bool_(), nullable=False),
        pa.field("describe_model", pa.string(), nullable=False),
        pa.field("revise_model", pa.string(), nullable=False),
        pa.field("summarize_model", pa.string(), nullable=False),
        pa.field("prompt_versions", pa.string(), nullable=False),  # JSON
        pa.field("sampling", pa.string(), nullable=False),  # JSON
        pa.field("agents_hash", pa.string(), nullable=False),
        pa.field("extraction_hash", pa.string(), nullable=False),  # of the patch shard these pairs captioned
        pa.field("random_weights", pa.bool_(), nullable=False),
        pa.field("factory_version", pa.string(), nullable=False),
        pa.field("created_at", pa.string(), nullable=False),
    ]
)
FAILED_SCHEMA = pa.schema(
    [
        pa.field("patch_id", pa.string(), nullable=False),
        pa.field("slide_id", pa.string(), nullable=False),
        pa.field("x", pa.int64()),
        pa.field("y", pa.int64()),
        pa.field("stage", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("detail", pa.string()),
        pa.field("agents_hash", pa.string(), nullable=False),
        pa.field("created_at", pa.string(), nullable=False),
    ]
)


# The layout the docstring describes; the names below are the ones the tasks, the export and the tools import.
PAIRS = SlideShards("pairs", "failed", PAIR_SCHEMA, FAILED_SCHEMA)
pairs_prefix = PAIRS.prefix
failed_prefix = PAIRS.failed_prefix
pair_key = PAIRS.key
failed_key = PAIRS.failed_key


def patches_key(slide_id: str) -> str:
    return slide_key("patches", slide_id)
