"""``pathgen export FORMAT --out PATH``: pairs, instruction data or slide features in an interchange format.

pathgen-json: the PathGen-1.6M JSON format (a file); webdataset: tars for open_clip; llava: stage1.json, stage2.json
and images/ for PathGen-LLaVA; features: CLAM/TRIDENT <slide_id>.h5 files (each a folder). Exit codes: 0 when
something was written, 1 when nothing was, 2 for bad usage (an ``--out`` that cannot be written, an ambiguous or
unknown hash, an unreadable review file)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from pathgen.cli.args import EXIT_FAILED, EXIT_OK, EXIT_USAGE, Commands, overrides_of, settings_args, store_arg
from pathgen.settings import Settings, load_settings

COMMAND = "export"
FOLDER_FORMATS = ("webdataset", "llava", "features")


def register(commands: Commands) -> None:
    parser = commands.add(COMMAND, export, help="write pairs in an interchange format")
    parser.add_argument(
        "format",
        choices=["pathgen-json", *FOLDER_FORMATS],
        help="pathgen-json: the PathGen-1.6M JSON format (--out FILE); webdataset: tars for open_clip (--out DIR); "
        "llava: stage1.json, stage2.json and images/ for PathGen-LLaVA (--out DIR); features: slide features as "
        "CLAM/TRIDENT <slide_id>.h5 files (--format h5 --out DIR)",
    )
    parser.add_argument("--out", metavar="PATH", required=True)
    store_arg(parser)
    parser.add_argument("--agents-hash", metavar="HASH", help="which pairs (needed when the store holds several)")
    parser.add_argument("--instruct-hash", metavar="HASH", help="llava: which instruction data (when several)")
    parser.add_argument("--format", dest="file_format", choices=["h5"], default="h5", help="features: file format")
    parser.add_argument("--features-hash", metavar="HASH", help="features: which features (when several)")
    settings_args(parser)


def export(args: argparse.Namespace) -> int:
    problem = out_problem(args.format, args.out)
    if problem:  # before reading the store: a wrong --out is told at once
        print(f"pathgen export: {problem}", file=sys.stderr)
        return EXIT_USAGE
    settings = load_settings(args.config, overrides_of(args))
    return EXPORTERS[args.format](args, settings)


def out_problem(fmt: str, out: str) -> str | None:
    """Why ``--out`` cannot be written: pathgen-json writes a file into a folder that must exist; the others write a
    folder, created when missing, so only an existing file in its place is wrong."""
    path = Path(out).expanduser()
    if fmt in FOLDER_FORMATS:
        if path.exists() and not path.is_dir():
            return f"--out {out} is a file; {fmt} writes a folder: choose a folder"
        return None
    if path.is_dir():
        return f"--out {out} is a folder; pathgen-json writes one file: choose a file name, e.g. {path / 'pairs.json'}"
    parent = path.absolute().parent
    if not parent.exists():
        return f"folder {parent} does not exist; create it or choose another --out"
    if not parent.is_dir():
        return f"{parent} is not a folder; choose another --out"
    return None


def export_pathgen_json(args: argparse.Namespace, settings: Settings) -> int:
    """``pathgen export pathgen-json --out FILE``: the records, and the provenance file beside them."""
    from tasks.captions.export import export_pathgen_json as write_records
    from tasks.captions.export import provenance_path
    from tasks.reviews.report import review_line
    from tasks.store.objects import Store

    try:
        store = Store(settings.store, settings.s3)
        count = write_records(store, args.out, args.agents_hash, settings.export.reviews)
    except ValueError as exc:
        print(f"pathgen export: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(f"wrote {count} records to {args.out}")
    side = json.loads(provenance_path(args.out).read_text())
    print(f"provenance: {provenance_path(args.out)}")
    print(review_line(side["reviews"]))
    if side["random_weights"]:
        print(f"RANDOM WEIGHTS: {side['random_weight_records']} of {count} records were captioned by random-weight "
              "models; their captions are noise")  # fmt: skip
    return EXIT_OK if count else EXIT_FAILED


def export_webdataset(args: argparse.Namespace, settings: Settings) -> int:
    """``pathgen export webdataset --out DIR``: training tars and the held-out ones for open_clip."""
    from tasks.captions.export import agents_hashes
    from tasks.clip.webdataset import export_pairs as write_tars
    from tasks.reviews.report import review_line
    from tasks.store.objects import Store

    store = Store(settings.store, settings.s3)
    hashes = agents_hashes(store)
    chosen = args.agents_hash or (hashes[0] if len(hashes) == 1 else None)
    if chosen not in hashes:
        print(
            f"pathgen export: choose the pairs with --agents-hash (found: {', '.join(hashes) or 'none'})",
            file=sys.stderr,
        )
        return EXIT_USAGE
    try:
        summary = write_tars(
            store, chosen, Path(args.out), settings.clip.holdout_fraction, None, settings.export.reviews
        )
    except ValueError as exc:  # an unreadable review file: named, with the way around it
        print(f"pathgen export: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(
        f"wrote {summary.pairs} training pairs in {summary.tars} tars to {summary.out} "
        f"({summary.holdout_pairs} held out in {summary.out}/holdout; {summary.written} tars rewritten; "
        f"{summary.pairs_per_s:.0f} pairs/s)"
    )
    print(review_line(summary.reviews))
    if summary.random_weights:
        print("RANDOM WEIGHTS: these captions come from tiny random-weight models and are noise")
    return EXIT_OK if summary.pairs else EXIT_FAILED


def export_llava(args: argparse.Namespace, settings: Settings) -> int:
    """``pathgen export llava --out DIR``: stage1.json, stage2.json, images/, provenance.json."""
    from tasks.instruct.export import export_llava as write_llava
    from tasks.store.objects import Store

    try:
        store = Store(settings.store, settings.s3)
        result = write_llava(store, args.out, args.agents_hash, args.instruct_hash, reviews=settings.export.reviews)
    except ValueError as exc:
        print(f"pathgen export: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print_llava_export(result)
    return EXIT_OK if result.stage1 else EXIT_FAILED  # stage 1 alone trains; stage 2 says why it is empty


def print_llava_export(result) -> None:
    from tasks.instruct.export import empty_because
    from tasks.reviews.report import review_line

    kinds = ", ".join(f"{k} {v}" for k, v in sorted(result.kinds.items())) or "none"
    print(f"llava export {result.out}:")
    print(f"  stage1.json  {result.stage1} caption pairs (agents_hash {result.agents_hash})")
    print(f"  stage2.json  {result.stage2} conversations ({kinds}; instruct_hash {result.instruct_hash})")
    print(f"  images/      {result.images} JPEGs ({result.written} written now, the rest up to date); provenance.json")
    if not result.stage2:
        print(f"  stage2.json is empty: {empty_because(result)}")
    if result.missing_images:
        print(f"  {result.missing_images} conversations left out: no pair shard holds their patch's image")
    print(f"  {review_line(result.reviews)}; {result.reviews['conversations_left_out']} conversations left out")
    if result.random_weights:
        records = result.random_weight_records
        print(
            f"RANDOM WEIGHTS: {records['stage1']} of {result.stage1} stage-1 and {records['stage2']} of "
            f"{result.stage2} stage-2 records come from random-weight models; they are noise"
        )


def export_features(args: argparse.Namespace, settings: Settings) -> int:
    """``pathgen export features --format h5 --out DIR [--features-hash HASH]``."""
    from tasks.features.export import FeaturesNotFound, choose_features_hash, export_h5
    from tasks.features.store import manifest_key
    from tasks.store.objects import Store

    store = Store(settings.store, settings.s3)
    try:
        chosen = choose_features_hash(store, args.features_hash)
        written = export_h5(store, chosen, args.out)
    except FeaturesNotFound as exc:
        print(f"pathgen export: {exc}", file=sys.stderr)
        return EXIT_USAGE
    manifest = store.read_json(manifest_key(chosen))
    print(f"wrote {len(written)} slides to {args.out} as <slide_id>.h5 (features N x D, coords N x 2 level-0)")
    print(f"features_hash: {chosen}  (encoder {manifest['encoder']['spec']}, {manifest['encoder']['dim']} dimensions)")
    if manifest.get("random_weights"):
        print("RANDOM WEIGHTS: these features come from an encoder without pretrained weights; they are noise")
    return EXIT_OK if written else EXIT_FAILED


EXPORTERS: dict[str, Callable[[argparse.Namespace, Settings], int]] = {
    "pathgen-json": export_pathgen_json,
    "webdataset": export_webdataset,
    "llava": export_llava,
    "features": export_features,
}
