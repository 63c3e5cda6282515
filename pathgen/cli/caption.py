"""``pathgen caption``: the selected patches captioned by the agents (describe, revise, summarize).

Exit codes: 0 when every slide is captioned; 1 when slides remain pending or the store holds no patch shards (the
cause is named); 2 for bad usage or settings."""

from __future__ import annotations

import argparse
import sys

from pathgen.cli.args import EXIT_FAILED, EXIT_OK, Commands, overrides_of, parts_arg, settings_args, store_arg
from pathgen.cli.runs import report_parts_and_pending, run_stage_flow
from pathgen.settings import load_settings

COMMAND = "caption"
RANDOM_CAPTIONS = (
    "RANDOM WEIGHTS: these captions come from tiny random-weight models and are noise;\n"
    "set agents.describe.model, agents.revise.model and agents.summarize.model for real captions"
)


def register(commands: Commands) -> None:
    caption = commands.add(COMMAND, caption_patches, help="caption the selected patches: describe, revise, summarize")
    store_arg(caption)
    parts_arg(caption)
    settings_args(caption)


def caption_patches(args: argparse.Namespace) -> int:
    overrides = overrides_of(args)
    from flows.caption import NoPatchShardsError, caption_flow, require_patch_shards
    from tasks.store.objects import StoreError

    try:
        # Before Prefect starts: caption before extract is told at once, without creating the store folder.
        require_patch_shards(load_settings(args.config, overrides))
    except (NoPatchShardsError, StoreError) as exc:
        print(f"pathgen caption: {exc}", file=sys.stderr)
        return EXIT_FAILED
    summary = run_stage_flow(COMMAND, caption_flow, args, overrides)
    if summary is None:
        return EXIT_FAILED
    return EXIT_FAILED if print_summary(summary) else EXIT_OK


def print_summary(summary: dict) -> bool:
    """What the run captioned and where; returns whether slides remain pending."""
    print(
        f"\ncaptioned {summary['ok']} slides ({summary['pairs']} pairs; {summary['skipped']} slides already done); "
        f"{summary['failed_items']} patches failed {summary['failures'] or ''}"
    )
    print(f"pairs: {summary['pairs_prefix']}/<slide_id>.parquet; failed items under failed/{summary['agents_hash']}/")
    print(f"longest caption: {summary['max_tokens']} CLIP tokens")
    export = f"export them:  pathgen export pathgen-json --store {summary['store']} --out pairs.json"
    return report_parts_and_pending(COMMAND, summary, RANDOM_CAPTIONS, export)
