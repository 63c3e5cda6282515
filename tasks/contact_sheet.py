"""A contact sheet of sample patches from patch or pair shards (``pathgen inspect``, the factory's report).

A sheet of patches picked with random-weight embeddings (their slide.json says ``random_weights``), or of pairs
captioned by random-weight models (their ``random_weights`` column), gets a red RANDOM WEIGHTS band on top. A shard
that pyarrow cannot read as Parquet raises ``UnreadableShard``, naming it and the stage to re-run."""

from __future__ import annotations

import contextlib
import io
import math
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from pathgen.errors import cut
from tasks.slides.shard import read_shard
from tasks.store.objects import Store

TILE_PX = 336  # half a 672 px patch: nuclei and cells are still visible
CAPTION_LINES = 4  # of a pair's caption under its tile (about 50 characters each)
BANNER_PX = 22
BANNER_RGB = (210, 0, 0)
CONTACT_SHEET = "reports/contact-sheet.png"
SAMPLES = 24  # patches on a sheet, unless told
SAMPLE_COLUMNS = ("slide_id", "x", "y", "image", "random_weights", "caption")


class UnreadableShard(Exception):
    """A shard that pyarrow cannot read as Parquet."""

    def __init__(self, uri: str, detail: str) -> None:
        folders = uri.split("/")[:-1]
        rerun = "pathgen extract" if "patches" in folders else None
        if "pairs" in folders or "failed" in folders:
            rerun = "pathgen caption"
        super().__init__(
            f"{uri} is not a Parquet file ({cut(' '.join(detail.split()), 200)}); it may be truncated: "
            f"re-run the stage that wrote it{f' ({rerun})' if rerun else ''}"
        )


@contextlib.contextmanager
def reading(store: Store, key: str) -> Iterator[IO[bytes]]:
    """``store.open(key)``, with pyarrow failing to read it as Parquet turned into ``UnreadableShard``."""
    try:
        with store.open(key) as handle:
            yield handle
    except pa.ArrowException as exc:
        raise UnreadableShard(store.uri(key), str(exc)) from exc


@dataclass
class Samples:
    """Tiles for a sheet, their labels, and why (if at all) they come from random weights."""

    images: list[bytes] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    random_selection: set[str] = field(default_factory=set)
    random_captions: bool = False

    @property
    def banner(self) -> str | None:
        reasons = (["patches picked with random-weight embeddings"] if self.random_selection else []) + (
            ["captions from random-weight models"] if self.random_captions else []
        )
        return "RANDOM WEIGHTS: " + " and ".join(reasons) + " (noise)" if reasons else None


def sample_patches(store: Store, shards: list[str], samples: int = SAMPLES) -> Samples:
    """Up to ``samples`` patches spread evenly over ``shards``, each labelled with its slide and position (and, for
    a pair shard, the start of its caption)."""
    found, records = Samples(), {}
    per_shard = max(1, math.ceil(samples / len(shards)))
    for key in shards:
        if len(found.images) >= samples:
            break
        with reading(store, key) as handle:
            names = pq.ParquetFile(handle, pre_buffer=False).schema_arrow.names
            part = read_shard(handle, columns=[c for c in SAMPLE_COLUMNS if c in names])
        step = max(1, part.num_rows // per_shard)
        for i in range(0, part.num_rows, step)[: min(per_shard, samples - len(found.images))]:
            _add_sample(found, part, i, store, records)
    return found


def _add_sample(found: Samples, part: pa.Table, i: int, store: Store, records: dict[str, bool]) -> None:
    slide_id = part["slide_id"][i].as_py()
    found.images.append(part["image"][i].as_py())
    label = f"{slide_id[:30]} {part['x'][i].as_py()},{part['y'][i].as_py()}"
    if "caption" in part.column_names:  # a pair shard: show what the caption says about this very patch
        label += "\n" + "\n".join(textwrap.wrap(part["caption"][i].as_py(), 52)[:CAPTION_LINES])
    found.labels.append(label)
    found.random_captions |= "random_weights" in part.column_names and bool(part["random_weights"][i].as_py())
    if selected_with_random_weights(store, slide_id, records):
        found.random_selection.add(slide_id)


def write_contact_sheet(store: Store, found: Samples, out: str | None = None) -> str:
    """To ``out`` when given, else into the store's ``reports/contact-sheet.png`` (committed whole); returns where
    it went."""
    if out:
        draw_contact_sheet(found.images, found.labels, out, found.banner)
        return out
    with store.staged_file(CONTACT_SHEET) as local:
        draw_contact_sheet(found.images, found.labels, local, found.banner)
    return store.uri(CONTACT_SHEET)


def selected_with_random_weights(store: Store, slide_id: str, seen: dict[str, bool]) -> bool:
    """Whether the slide's record says its patches were picked with random-weight embeddings."""
    if slide_id not in seen:
        key = f"slides/{slide_id}/slide.json"
        try:
            seen[slide_id] = bool(store.exists(key) and store.read_json(key).get("random_weights"))
        except (OSError, ValueError):
            seen[slide_id] = False
    return seen[slide_id]


def random_pairs(store: Store, key: str) -> bool:
    """Whether any pair of the shard was captioned by random-weight models."""
    with reading(store, key) as handle:
        shard = pq.ParquetFile(handle, pre_buffer=False)
        if "random_weights" not in shard.schema_arrow.names:
            return False
        # No thread pool: its workers touch the Python file object and can outlive the command (see read_shard).
        return any(shard.read(columns=["random_weights"], use_threads=False)["random_weights"].to_pylist())


def draw_contact_sheet(images: list[bytes], labels: list[str], out: str, banner: str | None = None) -> None:
    """Tiles with their labels; with ``banner`` (why the content is random weights) a red band on top reading it."""
    cols = max(1, min(4, len(images)))
    grid_rows = max(1, math.ceil(len(images) / cols))
    top = BANNER_PX if banner else 0
    label_h = 14 * (1 + max((label.count("\n") for label in labels), default=0))
    sheet = Image.new("RGB", (cols * TILE_PX, top + grid_rows * (TILE_PX + label_h)), "white")
    draw = ImageDraw.Draw(sheet)
    if banner:
        draw.rectangle((0, 0, sheet.width - 1, BANNER_PX - 1), fill=BANNER_RGB)
        draw.text((4, 5), banner, fill=(255, 255, 255))
    for i, (data, label) in enumerate(zip(images, labels, strict=True)):
        tile = Image.open(io.BytesIO(data)).convert("RGB").resize((TILE_PX, TILE_PX))
        x, y = (i % cols) * TILE_PX, top + (i // cols) * (TILE_PX + label_h)
        sheet.paste(tile, (x, y))
        draw.multiline_text((x + 2, y + TILE_PX), label, fill=(0, 0, 0), spacing=2)
    sheet.save(out, format="PNG")  # a store's staged file has no .png suffix to go by
