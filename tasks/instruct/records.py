"""The instruction-conversation and failed-item records, and where a slide's conversations live in the store.

Under one instruct_hash a slide's conversations are one object, ``instruct/<instruct_hash>/<slide_id>.parquet``,
whose existence marks the slide done; its content failures are ``failed-instruct/<instruct_hash>/<slide_id>.parquet``,
committed first. A folder of their own, rather than ``failed/``: ``failed/<hash>/`` holds caption failures keyed by
agents_hash, which ``pathgen status`` reads as such, and ``instruct/<instruct_hash>/`` must load as one dataset.
"""

from __future__ import annotations

import pyarrow as pa

from tasks.work.shards import SlideShards

INSTRUCT_SCHEMA = pa.schema(
    [
        pa.field("conversation_id", pa.string(), nullable=False),  # <patch_id>-<index in the reply>
        pa.field("patch_id", pa.string(), nullable=False),
        pa.field("slide_id", pa.string(), nullable=False),
        pa.field("x", pa.int64(), nullable=False),
        pa.field("y", pa.int64(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),  # open | yes-no | multiple-choice
        pa.field("conversation", pa.string(), nullable=False),  # JSON: [{"from": "human"|"gpt", "value": ...}]
        pa.field("turns", pa.int16(), nullable=False),
        pa.field("support", pa.float32(), nullable=False),  # the weakest grounding score of its turns
        pa.field("source_agents_hash", pa.string(), nullable=False),
        pa.field("instruct_model", pa.string(), nullable=False),
        pa.field("prompt_version", pa.string(), nullable=False),
        pa.field("sampling", pa.string(), nullable=False),  # JSON
        pa.field("random_weights", pa.bool_(), nullable=False),  # the instruct model's, or the source pair's
        pa.field("instruct_hash", pa.string(), nullable=False),
        pa.field("factory_version", pa.string(), nullable=False),
        pa.field("created_at", pa.string(), nullable=False),
    ]
)
INSTRUCT_FAILED_SCHEMA = pa.schema(
    [
        pa.field("patch_id", pa.string(), nullable=False),
        pa.field("slide_id", pa.string(), nullable=False),
        pa.field("x", pa.int64()),
        pa.field("y", pa.int64()),
        pa.field("conversation", pa.int16()),  # its place in the reply; null when the whole reply failed
        pa.field("stage", pa.string(), nullable=False),  # reply | parse | validate
        pa.field("reason", pa.string(), nullable=False),
        pa.field("detail", pa.string()),
        pa.field("instruct_hash", pa.string(), nullable=False),
        pa.field("created_at", pa.string(), nullable=False),
    ]
)
# What the task reads of a pair shard (the image only when the prompt places one).
PAIR_COLUMNS = ["patch_id", "slide_id", "x", "y", "revised_description", "random_weights"]


# The layout the docstring describes; the names below are the ones the tasks and the export import.
INSTRUCT = SlideShards("instruct", "failed-instruct", INSTRUCT_SCHEMA, INSTRUCT_FAILED_SCHEMA)
instruct_prefix = INSTRUCT.prefix
instruct_failed_prefix = INSTRUCT.failed_prefix
instruct_key = INSTRUCT.key


def conversation_id(patch_id: str, index: int) -> str:
    return f"{patch_id}-{index}"
