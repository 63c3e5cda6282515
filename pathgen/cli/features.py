"""``pathgen features SOURCE... [--encoder SPEC]``: every tissue patch of each slide through an encoder, into
``features/<features_hash>/`` in the store (``pathgen export features --format h5`` writes them as h5 files).

Exit codes as ``pathgen extract``: 0 when at least one slide succeeded, 1 when none did (or the encoder cannot be
had: the slides stay pending), 2 for bad usage or settings (a missing local SOURCE).
"""

from __future__ import annotations

import argparse
import os

from pathgen.cli.args import Commands, parts_arg, settings_args, store_arg
from pathgen.cli.runs import run_slide_flow
from pathgen.errors import redact_urls

COMMAND = "features"
RANDOM_FEATURES = (
    "  RANDOM WEIGHTS: the encoder has no pretrained weights (or was trained from random initialisation), so these\n"
    "  features are noise; pass --encoder NAME:PRETRAINED or a PathGen-CLIP checkpoint for real features"
)


def register(commands: Commands) -> None:
    features = commands.add(
        COMMAND, encode_slides, help="encode every tissue patch of each slide (slide features for MIL)"
    )
    features.add_argument(
        "sources",
        nargs="*",
        metavar="SOURCE",
        help="slide file, folder, glob, s3:// prefix, GDC manifest or PathGen JSON",
    )
    features.add_argument(
        "--encoder",
        metavar="SPEC",
        help="open_clip NAME:PRETRAINED, a PathGen-CLIP run or checkpoint in the store; default features.encoder, "
        "else the newest PathGen-CLIP in the store, else tiny-random (RANDOM WEIGHTS)",
    )
    store_arg(features)
    features.add_argument("--threads", action="store_true", help="run slide groups in threads, not processes")
    parts_arg(features)
    settings_args(features)


def encode_slides(args: argparse.Namespace) -> int:
    return run_slide_flow(COMMAND, args, _features_flow, print_summary, encoder=_encoder_argument(args.encoder))


def print_summary(summary: dict) -> None:
    store, where = summary["store"], summary["features"]
    print(
        f"\nfeatured {summary['slides']} slides: {summary['ok']} ok, {summary['skipped']} already done, "
        f"{summary['failed']} failed, {summary['pending']} pending; {summary['patches']} patches"
    )
    print(f"features_hash: {summary['features_hash']}  (encoder {summary['encoder']}, {summary['dim']} dimensions)")
    print(f"store: {store}")
    print(f"  features:  {where}/<slide_id>.parquet")
    print(f"  manifest:  {where}/features.json")
    print(f"  failed:    {where}/failed/<slide_id>.json")
    if summary.get("random_weights"):
        print(RANDOM_FEATURES)
    for part in summary.get("parts", []):
        print(f"part {part['part']}: {part.get('state')} {part.get('flow_run', '')}".rstrip())
    for failed in summary["failed_slides"]:
        print(f"failed: {failed['slide_id']}: {failed['error']}")
    for pending in summary["pending_slides"]:
        print(f"pending (run again): {pending['slide_id']}: {pending['error']}")
    print(
        f"export them:  pathgen export features --format h5 --store {store} --features-hash "
        f"{summary['features_hash']} --out DIR"
    )


def _encoder_argument(spec: str | None) -> str | None:
    """``--encoder`` as the flow's parameter; one with credentials in a URL goes to this process's environment
    (``features.encoder``, where the settings read it) instead, since Prefect stores and shows flow parameters."""
    if spec and redact_urls(spec) != spec:
        os.environ["PATHGEN_FEATURES__ENCODER"] = spec
        return None
    return spec


def _features_flow():
    from flows.features import features_flow  # Prefect with it: only once the command line has been checked

    return features_flow
