"""``pathgen extract SOURCE...``: tissue patches from slides into the store.

Exit codes: 0 when at least one slide succeeded, 1 when none did, 2 for bad usage or settings (a missing local
SOURCE)."""

from __future__ import annotations

import argparse

from pathgen.cli.args import Commands, parts_arg, settings_args, store_arg
from pathgen.cli.runs import run_slide_flow

COMMAND = "extract"


def register(commands: Commands) -> None:
    extract = commands.add(COMMAND, extract_slides, help="extract tissue patches from slides into the store")
    extract.add_argument(
        "sources",
        nargs="*",
        metavar="SOURCE",
        help="slide file, folder, glob, s3:// prefix, GDC manifest or PathGen JSON",
    )
    store_arg(extract)
    extract.add_argument("--threads", action="store_true", help="run slide groups in threads, not processes")
    parts_arg(extract)
    settings_args(extract)


def extract_slides(args: argparse.Namespace) -> int:
    return run_slide_flow(COMMAND, args, _extract_flow, print_summary)


def _extract_flow():
    from flows.extract import extract_flow  # Prefect with it: only once the command line has been checked

    return extract_flow


def print_summary(summary: dict) -> None:
    store = summary["store"]
    print(
        f"\nextracted {summary['slides']} slides: {summary['ok']} ok, {summary['skipped']} already done, "
        f"{summary['failed']} failed, {summary['pending']} pending; {summary['patches']} patches"
    )
    print(f"store: {store}")
    print(f"  patch shards:  {store}/patches/<slide_id>.parquet")
    print(f"  per slide:     {store}/slides/<slide_id>/slide.json and thumbnail.png")
    if summary.get("selection") == "representative":
        print(f"  selection:     {store}/slides/<slide_id>/selection.png")
    if summary.get("random_weights"):
        print("  RANDOM WEIGHTS: the selection model has no pretrained weights (or was trained from random), so")
        print("  its picks are noise; set embedding.model and embedding.pretrained for a real selection")
    for failed in summary["failed_slides"]:
        print(f"failed: {failed['slide_id']}: {failed['error']}")
    for pending in summary["pending_slides"]:
        print(f"pending (storage failed; run again): {pending['slide_id']}: {pending['error']}")
    print(f"look at them:  pathgen inspect {store}")
