"""``pathgen instruct``: instruction conversations from the pairs' revised descriptions (PathGen-Instruct); ``pathgen
export llava`` (pathgen/cli/export.py) writes them, with the pairs, as PathGen-LLaVA's two stages."""

from __future__ import annotations

import argparse
import sys

from pathgen.cli.args import EXIT_FAILED, EXIT_OK, Commands, overrides_of, parts_arg, settings_args, store_arg
from pathgen.cli.runs import report_parts_and_pending, run_stage_flow
from pathgen.settings import load_settings

COMMAND = "instruct"
RANDOM_INSTRUCT = (
    "RANDOM WEIGHTS: the instruct model or the captioning models have random weights; this data is noise.\n"
    "Set instruct.model (and the agents.* models) to models with trained weights for real data"
)


def register(commands: Commands) -> None:
    instruct = commands.add(
        COMMAND,
        instruct_conversations,
        help="write instruction conversations (open, yes/no, multiple choice) from the pairs' revised descriptions",
    )
    store_arg(instruct)
    parts_arg(instruct)
    settings_args(instruct)


def instruct_conversations(args: argparse.Namespace) -> int:
    from flows.instruct import instruct_flow, resolve_hashes
    from tasks.instruct.plan import NoPairsError
    from tasks.models import require_real_models
    from tasks.store.objects import StoreError

    overrides = overrides_of(args)
    settings = load_settings(args.config, overrides)
    require_real_models(settings, ["instruct"])  # before Prefect starts (a settings error: exit 2)
    try:
        resolve_hashes(settings)  # no pairs, or a model server that does not answer: told before Prefect starts
    except (NoPairsError, StoreError) as exc:
        print(f"pathgen instruct: {exc}", file=sys.stderr)
        return EXIT_FAILED
    summary = run_stage_flow(COMMAND, instruct_flow, args, overrides)
    return EXIT_FAILED if summary is None else _report(summary)


def _report(summary: dict) -> int:
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(summary["kinds"].items())) or "none"
    print(
        f"\ninstruct: {summary['ok']} slides written, {summary['skipped']} already done; "
        f"{summary['conversations']} conversations ({kinds}); {summary['failed_items']} failed items"
    )
    for reason, count in sorted(summary["failures"].items(), key=lambda item: -item[1]):
        print(f"  failed {reason}: {count}")
    print(f"conversations: {summary['instruct_prefix']}/<slide_id>.parquet (from pairs/{summary['agents_hash']}/)")
    print(f"failed items:  failed-instruct/{summary['instruct_hash']}/<slide_id>.parquet")
    export = f"export both LLaVA stages:  pathgen export llava --store {summary['store']} --out llava/"
    return EXIT_FAILED if report_parts_and_pending(COMMAND, summary, RANDOM_INSTRUCT, export) else EXIT_OK
