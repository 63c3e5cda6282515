"""``pathgen inspect URL``: what a store or one shard holds, and a contact sheet of sample patches
(tasks/contact_sheet.py), by default the store's ``reports/contact-sheet.png``.

A shard that is not Parquet (a truncated write, say) is told in one line naming it (exit 1); a file that is neither a
store folder nor a ``.parquet`` shard is a usage error (exit 2)."""

from __future__ import annotations

import argparse
import os
import posixpath
import sys
from collections import Counter
from typing import TYPE_CHECKING

from pathgen.cli.args import EXIT_FAILED, EXIT_OK, EXIT_USAGE, Commands
from pathgen.errors import cut

if TYPE_CHECKING:
    from tasks.store.objects import Store

# pyarrow, PIL and the store are imported where used: every command builds this parser, few of them inspect.

COMMAND = "inspect"
SHARD_FOLDERS = ("patches",)  # <store>/patches/<slide>.parquet
HASHED_SHARD_FOLDERS = ("pairs", "failed", "instruct", "failed-instruct")  # <store>/<folder>/<hash>/<slide>.parquet


def register(commands: Commands) -> None:
    inspect = commands.add(
        COMMAND, inspect_command, help="show what a store or a shard holds and write a contact sheet"
    )
    inspect.add_argument("url", metavar="URL", help="store root or a .parquet shard")
    inspect.add_argument(
        "--out", metavar="PNG", help="contact sheet path (default: the store's reports/contact-sheet.png)"
    )
    inspect.add_argument("--samples", type=int, default=24, help="patches on the contact sheet")
    inspect.add_argument("--rows", type=int, default=5, help="sample rows printed")


def inspect_command(args: argparse.Namespace) -> int:
    return inspect_url(args.url, out=args.out, samples=args.samples, rows=args.rows)


def inspect_url(url: str, out: str | None = None, samples: int = 24, rows: int = 5) -> int:
    """Print what ``url`` (a store or one shard) holds and write a contact sheet: to ``out``, else to the store's
    ``reports/contact-sheet.png``."""
    from tasks.contact_sheet import UnreadableShard
    from tasks.store.objects import is_remote, local_path

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
    found = _store_and_shards(url)
    if found is None:
        return EXIT_FAILED
    store, shards = found
    if not shards:
        print("no patch shards yet: run `pathgen extract SOURCE... --store " + store.url + "`")
        return EXIT_OK
    _print_shards(store, shards)
    _print_sample_rows(store, shards[0], rows)
    return _contact_sheet(store, shards, samples, out)


def _store_and_shards(url: str) -> tuple[Store, list[str]] | None:
    """The store and the shards to show: the one shard named, or a store's patch shards (after listing its slides
    and pairs); None, told, when there is no such shard or store."""
    from tasks.store.objects import Store

    if url.rstrip("/").endswith(".parquet"):
        store, key = open_shard(url)
        if not store.exists(key):
            print(f"pathgen inspect: no shard at {url}")
            return None
        return store, [key]
    store = Store(url)
    if not store.exists(""):
        print(f"pathgen inspect: no store at {store.url}")
        return None
    shards = store.list("patches", ".parquet")
    _print_slides(store)
    _print_pairs(store)
    return store, shards


def open_shard(url: str) -> tuple[Store, str]:
    """The store a shard URL lies in (what holds its ``patches/`` or ``pairs/<hash>/``) and its key there; a shard
    outside any store: its folder."""
    from tasks.store.objects import Store

    parent, name = posixpath.split(url.rstrip("/"))
    head, folder = posixpath.split(parent)
    if folder in SHARD_FOLDERS:
        return Store(head), f"{folder}/{name}"
    root, kind = posixpath.split(head)
    if kind in HASHED_SHARD_FOLDERS:
        return Store(root), f"{kind}/{folder}/{name}"
    return Store(parent), name


def _print_shards(store: Store, shards: list[str]) -> None:
    import pyarrow.parquet as pq

    from tasks.contact_sheet import reading

    total = 0
    print(f"\n{len(shards)} shard(s):")
    for key in shards:
        with reading(store, key) as handle:
            shard = pq.ParquetFile(handle, pre_buffer=False)
            count = shard.metadata.num_rows
            meta = {k.decode(): v.decode() for k, v in (shard.schema_arrow.metadata or {}).items()}
        total += count
        kind = meta.get("pathgen.kind", "patches")
        detail = (
            f"agents {meta.get('pathgen.agents_hash', '?')}"
            if kind in ("pairs", "failed")
            else f"selection {meta.get('pathgen.selection', '?')}"
        )
        print(f"  {key}: {count} {kind}, schema {meta.get('pathgen.schema_version', '?')}, {detail}")
    print(f"{total} rows in all")


def _print_sample_rows(store: Store, key: str, rows: int) -> None:
    from tasks.contact_sheet import reading
    from tasks.slides.shard import read_shard

    with reading(store, key) as handle:
        table = read_shard(handle)
    print(f"\nschema of {key}:")
    for field in table.schema:
        print(f"  {field.name}: {field.type}")
    print(f"\nsample rows of {key}:")
    shown = table.drop_columns([c for c in ("image", "embedding") if c in table.column_names])
    for row in shown.slice(0, rows).to_pylist():
        print("  " + ", ".join(f"{k}={_short(v)}" for k, v in row.items() if k not in ("source_uri",)))


def _contact_sheet(store: Store, shards: list[str], samples: int, out: str | None) -> int:
    from tasks.contact_sheet import CONTACT_SHEET, sample_patches, write_contact_sheet
    from tasks.store.objects import StoreError

    found = sample_patches(store, shards, samples)
    try:
        written = write_contact_sheet(store, found, out)
    except (OSError, StoreError) as exc:  # a read-only store (or a full disk): everything above still stands
        where = out or store.uri(CONTACT_SHEET)
        print(f"pathgen inspect: the contact sheet cannot be written to {where} ({cut(str(exc))}); pass --out FILE "
              "to write it somewhere writable", file=sys.stderr)  # fmt: skip
        return EXIT_FAILED
    banner = found.banner
    print(f"\ncontact sheet of {len(found.images)} patches: {written}" + (f" ({banner})" if banner else ""))
    return EXIT_OK


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
    from tasks.contact_sheet import random_pairs

    keys = store.list("pairs", ".parquet")
    failed_keys = store.list("failed", ".parquet")
    for agents_hash in sorted({k.split("/")[1] for k in keys}):
        pairs = [k for k in keys if k.split("/")[1] == agents_hash]
        failed = [k for k in failed_keys if k.split("/")[1] == agents_hash]
        line = (
            f"pairs/{agents_hash}: {len(pairs)} slide shard(s), {_rows(store, pairs)} pairs, "
            f"{_rows(store, failed)} failed items"
        )
        if any(random_pairs(store, key) for key in pairs):
            line += " (captioned with RANDOM-WEIGHT models: captions are noise)"
        print(line)
        if pairs:
            print(f"  look at them: pathgen inspect {store.uri(pairs[0])}")


def _rows(store: Store, keys: list[str]) -> int:
    import pyarrow.parquet as pq

    from tasks.contact_sheet import reading

    total = 0
    for key in keys:
        with reading(store, key) as handle:
            total += pq.ParquetFile(handle, pre_buffer=False).metadata.num_rows
    return total
