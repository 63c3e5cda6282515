"""``pathgen inspect``: what a store or one shard holds, and a contact sheet of sample patches."""

from __future__ import annotations

import io
import math
import posixpath
from collections import Counter

import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from tasks.slides.shard import read_shard
from tasks.store.objects import Store

TILE_PX = 160


def _open_shard(url: str) -> tuple[Store, str]:
    parent, name = posixpath.split(url.rstrip("/"))
    head, folder = posixpath.split(parent)
    # A shard URL is <store>/patches/<slide>.parquet (or deeper); the store is what holds "patches/".
    if folder == "patches":
        return Store(head), f"{folder}/{name}"
    return Store(parent), name


def inspect_url(url: str, out: str = "contact-sheet.png", samples: int = 24, rows: int = 5) -> int:
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
        with store.open(key) as handle:
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
    with store.open(shards[0]) as handle:
        table = read_shard(handle)
    print(f"\nschema of {shards[0]}:")
    for field in table.schema:
        print(f"  {field.name}: {field.type}")
    print(f"\nsample rows of {shards[0]}:")
    shown = table.drop_columns([c for c in ("image", "embedding") if c in table.column_names])
    for row in shown.slice(0, rows).to_pylist():
        print("  " + ", ".join(f"{k}={_short(v)}" for k, v in row.items() if k not in ("source_uri",)))
    per_shard = max(1, math.ceil(samples / len(shards)))
    for key in shards:
        if len(images) >= samples:
            break
        with store.open(key) as handle:
            part = read_shard(handle, columns=["slide_id", "x", "y", "image"])
        step = max(1, part.num_rows // per_shard)
        for i in range(0, part.num_rows, step)[:per_shard]:
            images.append(part["image"][i].as_py())
            labels.append(f"{part['slide_id'][i].as_py()[:18]} {part['x'][i].as_py()},{part['y'][i].as_py()}")
    _contact_sheet(images[:samples], labels[:samples], out)
    print(f"\ncontact sheet of {len(images[:samples])} patches: {out}")
    return 0


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
                with store.open(key) as handle:
                    total += pq.ParquetFile(handle, pre_buffer=False).metadata.num_rows
            counts.append(total)
        print(f"pairs/{agents_hash}: {len(pairs)} slide shard(s), {counts[0]} pairs, {counts[1]} failed items")
        if pairs:
            print(f"  look at them: pathgen inspect {store.uri(pairs[0])}")


def _contact_sheet(images: list[bytes], labels: list[str], out: str) -> None:
    cols = max(1, min(6, len(images)))
    grid_rows = max(1, math.ceil(len(images) / cols))
    sheet = Image.new("RGB", (cols * TILE_PX, grid_rows * (TILE_PX + 14)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (data, label) in enumerate(zip(images, labels, strict=True)):
        tile = Image.open(io.BytesIO(data)).convert("RGB").resize((TILE_PX, TILE_PX))
        x, y = (i % cols) * TILE_PX, (i // cols) * (TILE_PX + 14)
        sheet.paste(tile, (x, y))
        draw.text((x + 2, y + TILE_PX), label, fill=(0, 0, 0))
    sheet.save(out)
