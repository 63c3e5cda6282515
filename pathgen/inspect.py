"""``pathgen inspect``: what a store or one shard holds, and a contact sheet of sample patches.

A contact sheet of patches picked with random-weight embeddings (their slide.json says ``random_weights``), or of
pairs captioned by random-weight models (their ``random_weights`` column), gets a red RANDOM WEIGHTS band on top.

A shard that is not Parquet (a truncated write, say) is told in one line naming it (exit 1); a file that is neither a
store folder nor a ``.parquet`` shard is a usage error (exit 2)."""

from __future__ import annotations

import contextlib
import io
import math
import os
import posixpath
import sys
import textwrap
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from pathgen.errors import cut
from tasks.slides.shard import read_shard
from tasks.store.objects import Store, StoreError, is_remote, local_path

TILE_PX = 336  # half a 672 px patch: nuclei and cells are still visible
CAPTION_LINES = 4  # of a pair's caption under its tile (about 50 characters each)
BANNER_PX = 22
BANNER_RGB = (210, 0, 0)
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


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
def _reading(store: Store, key: str):
    """``store.open(key)``, with pyarrow failing to read it as Parquet turned into ``UnreadableShard``."""
    try:
        with store.open(key) as handle:
            yield handle
    except pa.ArrowException as exc:
        raise UnreadableShard(store.uri(key), str(exc)) from exc


SHARD_FOLDERS = ("patches",)  # <store>/patches/<slide>.parquet
HASHED_SHARD_FOLDERS = ("pairs", "failed", "instruct", "failed-instruct")  # <store>/<folder>/<hash>/<slide>.parquet
CONTACT_SHEET = "reports/contact-sheet.png"


def _open_shard(url: str) -> tuple[Store, str]:
    """The store a shard URL lies in (what holds its ``patches/`` or ``pairs/<hash>/``) and its key there; a shard
    outside any store: its folder."""
    parent, name = posixpath.split(url.rstrip("/"))
    head, folder = posixpath.split(parent)
    if folder in SHARD_FOLDERS:
        return Store(head), f"{folder}/{name}"
    root, kind = posixpath.split(head)
    if kind in HASHED_SHARD_FOLDERS:
        return Store(root), f"{kind}/{folder}/{name}"
    return Store(parent), name


def inspect_url(url: str, out: str | None = None, samples: int = 24, rows: int = 5) -> int:
    """Print what ``url`` (a store or one shard) holds and write a contact sheet: to ``out``, else to the store's
    ``reports/contact-sheet.png``."""
    if not is_remote(url) and not url.rstrip("/").endswith(".parquet") and os.path.isfile(local_path(url)):
        print(
            f"pathgen inspect: {url} is a file, not a store folder or a .parquet shard; give the store root "
            "(the folder holding patches/ and slides/) or one .parquet shard",
            file=sys.stderr,
        )
        return EXIT_USAGE
    try:
        return _inspect(url, out, samples, rows)
    except UnreadableShard as exc:
        print(f"pathgen inspect: {exc}", file=sys.stderr)
        return EXIT_FAILED


def _inspect(url: str, out: str | None, samples: int, rows: int) -> int:
    if url.rstrip("/").endswith(".parquet"):
        store, key = _open_shard(url)
        shards = [key] if store.exists(key) else []
        if not shards:
            print(f"pathgen inspect: no shard at {url}")
            return 1
    else:
        store = Store(url)
        if not store.exists(""):
            print(f"pathgen inspect: no store at {store.url}")
            return 1
        shards = store.list("patches", ".parquet")
        _print_slides(store)
        _print_pairs(store)
    if not shards:
        print("no patch shards yet: run `pathgen extract SOURCE... --store " + store.url + "`")
        return 0
    total, images, labels = 0, [], []
    print(f"\n{len(shards)} shard(s):")
    for key in shards:
        with _reading(store, key) as handle:
            shard = pq.ParquetFile(handle, pre_buffer=False)
            count = shard.metadata.num_rows
            total += count
            meta = {k.decode(): v.decode() for k, v in (shard.schema_arrow.metadata or {}).items()}
            kind = meta.get("pathgen.kind", "patches")
            detail = (
                f"agents {meta.get('pathgen.agents_hash', '?')}"
                if kind in ("pairs", "failed")
                else f"selection {meta.get('pathgen.selection', '?')}"
            )
            print(f"  {key}: {count} {kind}, schema {meta.get('pathgen.schema_version', '?')}, {detail}")
    print(f"{total} rows in all")
    with _reading(store, shards[0]) as handle:
        table = read_shard(handle)
    print(f"\nschema of {shards[0]}:")
    for field in table.schema:
        print(f"  {field.name}: {field.type}")
    print(f"\nsample rows of {shards[0]}:")
    shown = table.drop_columns([c for c in ("image", "embedding") if c in table.column_names])
    for row in shown.slice(0, rows).to_pylist():
        print("  " + ", ".join(f"{k}={_short(v)}" for k, v in row.items() if k not in ("source_uri",)))
    per_shard = max(1, math.ceil(samples / len(shards)))
    random_selection, random_captions, records = set(), False, {}
    for key in shards:
        if len(images) >= samples:
            break
        with _reading(store, key) as handle:
            names = pq.ParquetFile(handle, pre_buffer=False).schema_arrow.names
            wanted = ("slide_id", "x", "y", "image", "random_weights", "caption")
            part = read_shard(handle, columns=[c for c in wanted if c in names])
        step = max(1, part.num_rows // per_shard)
        for i in range(0, part.num_rows, step)[:per_shard]:
            if len(images) >= samples:
                break
            images.append(part["image"][i].as_py())
            label = f"{part['slide_id'][i].as_py()[:30]} {part['x'][i].as_py()},{part['y'][i].as_py()}"
            if "caption" in names:  # a pair shard: show what the caption says about this very patch
                label += "\n" + "\n".join(textwrap.wrap(part["caption"][i].as_py(), 52)[:CAPTION_LINES])
            labels.append(label)
            random_captions |= "random_weights" in names and bool(part["random_weights"][i].as_py())
            if _selected_with_random_weights(store, part["slide_id"][i].as_py(), records):
                random_selection.add(part["slide_id"][i].as_py())
    reasons = (["patches picked with random-weight embeddings"] if random_selection else []) + (
        ["captions from random-weight models"] if random_captions else []
    )
    banner = "RANDOM WEIGHTS: " + " and ".join(reasons) + " (noise)" if reasons else None
    try:
        written = _write_contact_sheet(store, images, labels, out, banner)
    except (OSError, StoreError) as exc:  # a read-only store (or a full disk): everything above still stands
        where = out or store.uri(CONTACT_SHEET)
        print(f"pathgen inspect: the contact sheet cannot be written to {where} ({cut(str(exc))}); pass --out FILE "
              "to write it somewhere writable", file=sys.stderr)  # fmt: skip
        return EXIT_FAILED
    print(f"\ncontact sheet of {len(images)} patches: {written}" + (f" ({banner})" if banner else ""))
    return 0


def _write_contact_sheet(store: Store, images: list[bytes], labels: list[str], out: str | None, banner) -> str:
    """To ``out`` when given, else into the store (committed whole); returns where it went."""
    if out:
        _contact_sheet(images, labels, out, banner)
        return out
    with store.staged_file(CONTACT_SHEET) as local:
        _contact_sheet(images, labels, local, banner)
    return store.uri(CONTACT_SHEET)


def _selected_with_random_weights(store: Store, slide_id: str, seen: dict[str, bool]) -> bool:
    """Whether the slide's record says its patches were picked with random-weight embeddings."""
    if slide_id not in seen:
        key = f"slides/{slide_id}/slide.json"
        try:
            seen[slide_id] = bool(store.exists(key) and store.read_json(key).get("random_weights"))
        except (OSError, ValueError):
            seen[slide_id] = False
    return seen[slide_id]


def _short(value):
    return f"{value:.4g}" if isinstance(value, float) else value


def _print_slides(store: Store) -> None:
    keys = store.list("slides", "slide.json")
    records = [store.read_json(k) for k in keys]
    statuses = Counter(r.get("status") for r in records)
    print(f"store {store.url}: {len(records)} slide(s): " + ", ".join(f"{n} {s}" for s, n in sorted(statuses.items())))
    for record in records:
        line = f"  {record['slide_id']}: {record['status']}, {record.get('counts', {}).get('kept', 0)} patches"
        if record.get("random_weights"):
            line += " (selected with RANDOM-WEIGHT embeddings: picks are noise)"
        if record.get("error"):
            line += f" ({record['error']})"
        print(line)


def _print_pairs(store: Store) -> None:
    keys = store.list("pairs", ".parquet")
    failed_keys = store.list("failed", ".parquet")
    for agents_hash in sorted({k.split("/")[1] for k in keys}):
        pairs = [k for k in keys if k.split("/")[1] == agents_hash]
        failed = [k for k in failed_keys if k.split("/")[1] == agents_hash]
        counts = []
        for group in (pairs, failed):
            total = 0
            for key in group:
                with _reading(store, key) as handle:
                    total += pq.ParquetFile(handle, pre_buffer=False).metadata.num_rows
            counts.append(total)
        line = f"pairs/{agents_hash}: {len(pairs)} slide shard(s), {counts[0]} pairs, {counts[1]} failed items"
        if any(_random_pairs(store, key) for key in pairs):
            line += " (captioned with RANDOM-WEIGHT models: captions are noise)"
        print(line)
        if pairs:
            print(f"  look at them: pathgen inspect {store.uri(pairs[0])}")


def _random_pairs(store: Store, key: str) -> bool:
    with _reading(store, key) as handle:
        shard = pq.ParquetFile(handle, pre_buffer=False)
        if "random_weights" not in shard.schema_arrow.names:
            return False
        # No thread pool: its workers touch the Python file object and can outlive the command (see read_shard).
        return any(shard.read(columns=["random_weights"], use_threads=False)["random_weights"].to_pylist())


def _contact_sheet(images: list[bytes], labels: list[str], out: str, banner: str | None = None) -> None:
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
