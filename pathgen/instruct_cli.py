"""``pathgen instruct`` (instruction conversations from the pairs' revised descriptions: PathGen-Instruct) and the
handler of ``pathgen export llava`` (both PathGen-LLaVA stages in LLaVA's conversation JSON, images beside it)."""

from __future__ import annotations

import argparse
import sys

from pathgen.settings import Settings

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
RANDOM_INSTRUCT = (
    "RANDOM WEIGHTS: the instruct model or the captioning models have random weights; this data is noise.\n"
    "Set instruct.model (and the agents.* models) to models with trained weights for real data"
)


def add_commands(sub, common: argparse.ArgumentParser, settings_args, parts_arg) -> None:
    instruct = sub.add_parser(
        "instruct",
        parents=[common],
        help="write instruction conversations (open, yes/no, multiple choice) from the pairs' revised descriptions",
    )
    instruct.add_argument("--store", metavar="URL", help="store root URL (default: settings.store, file://./store)")
    parts_arg(instruct)
    settings_args(instruct)


def _instruct(args: argparse.Namespace) -> int:
    from flows.instruct import resolve_hashes
    from pathgen.cli import overrides_of, run_stage_flow
    from pathgen.settings import load_settings
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
    from flows.instruct import instruct_flow

    summary = run_stage_flow("instruct", instruct_flow, args, overrides)
    return EXIT_FAILED if summary is None else _report(summary)


def _report(summary: dict) -> int:
    from pathgen.cli import report_parts_and_pending

    kinds = ", ".join(f"{k} {v}" for k, v in sorted(summary["kinds"].items())) or "none"
    print(
        f"\ninstruct: {summary['ok']} slides written, {summary['skipped']} already done; "
        f"{summary['conversations']} conversations ({kinds}); {summary['failed']} failed items"
    )
    for reason, count in sorted(summary["failures"].items(), key=lambda item: -item[1]):
        print(f"  failed {reason}: {count}")
    print(f"conversations: {summary['instruct_prefix']}/<slide_id>.parquet (from pairs/{summary['agents_hash']}/)")
    print(f"failed items:  failed-instruct/{summary['instruct_hash']}/<slide_id>.parquet")
    export = f"export both LLaVA stages:  pathgen export llava --store {summary['store']} --out llava/"
    return EXIT_FAILED if report_parts_and_pending("instruct", summary, RANDOM_INSTRUCT, export) else EXIT_OK


def export_llava(args: argparse.Namespace, settings: Settings) -> int:
    """``pathgen export llava --out DIR``: stage1.json, stage2.json, images/, provenance.json."""
    from tasks.instruct.export import empty_because
    from tasks.instruct.export import export_llava as export
    from tasks.reviews.report import review_line
    from tasks.store.objects import Store

    try:
        store = Store(settings.store, settings.s3)
        result = export(store, args.out, args.agents_hash, args.instruct_hash, reviews=settings.export.reviews)
    except ValueError as exc:
        print(f"pathgen export: {exc}", file=sys.stderr)
        return EXIT_USAGE
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
    return EXIT_OK if result.stage1 else EXIT_FAILED  # stage 1 alone trains; stage 2 says why it is empty


COMMANDS = {"instruct": _instruct}
