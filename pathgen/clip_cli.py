"""``pathgen export webdataset``, ``pathgen train-clip`` and ``pathgen evaluate``: run the flows, print what they
made and where."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pathgen.local_api import api_server
from pathgen.settings import Settings

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def export_webdataset(args: argparse.Namespace, settings: Settings) -> int:
    from tasks.captions.export import agents_hashes
    from tasks.clip.webdataset import export_pairs
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
        summary = export_pairs(
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


def train_clip(args: argparse.Namespace, overrides: dict) -> int:
    from flows.train_clip import train_clip_flow

    with api_server():
        state = train_clip_flow(config=args.config, overrides=overrides, return_state=True)
    if not state.is_completed():
        print(f"pathgen train-clip: {state.result(raise_on_failure=False)}", file=sys.stderr)
        return EXIT_FAILED
    summary = state.result()
    for stage in summary["stages"]:
        print(
            f"{stage['stage']}: {stage['status']}  {stage['items']} pairs  {stage.get('steps', 0)} steps  "
            f"final loss {stage.get('final_loss')}  -> {stage.get('checkpoint') or stage.get('error')}"
        )
        for result in stage.get("evaluations", []):
            print(f"  eval {result['dataset']}: {result['status']} {_headline(result)} {result.get('json', '')}")
    if summary.get("run"):
        print(f"run: {summary['store'].rstrip('/')}/models/clip/{summary['run']}/ (run.json, metrics.jsonl per stage)")
    if summary["random_weights"]:
        print(
            f"RANDOM WEIGHTS: {summary.get('model', 'the model')} was trained from random initialisation; set "
            "clip.pretrained (with clip.model) to start from trained weights"
        )
    if summary["error"]:
        print(f"pathgen train-clip: {summary['error']}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def evaluate(args: argparse.Namespace, overrides: dict) -> int:
    from flows.evaluate import evaluate_flow

    try:
        datasets = [dataset_entry(args.dataset, args.classes, args.dataset_format)]
    except ValueError as exc:  # before Prefect starts: a folder that is no dataset is told at once
        print(f"pathgen evaluate: {exc}", file=sys.stderr)
        return EXIT_USAGE
    with api_server():
        state = evaluate_flow(
            datasets, model=args.model, holdout=args.holdout, config=args.config, overrides=overrides, return_state=True
        )
    if not state.is_completed():
        error = state.result(raise_on_failure=False)
        print(f"pathgen evaluate: {error}", file=sys.stderr)
        return EXIT_USAGE if isinstance(error, ValueError) else EXIT_FAILED  # a wrong input, or the store failed
    summary = state.result()
    for result in summary["results"]:
        print(f"{summary['model']} on {result['dataset']}: {result['status']} {_headline(result)}")
        print(f"  {result.get('json') or result.get('error')}")
    if summary["random_weights"]:
        print(f"RANDOM WEIGHTS: {summary['model']}: {summary['random_why']}")
    return EXIT_OK if summary["ok"] == len(summary["results"]) else EXIT_FAILED


def dataset_entry(dataset: str, classes: str | None, dataset_format: str | None) -> dict[str, str]:
    """``--dataset`` with ``--classes`` (one folder per class) or its format, named or detected from its files."""
    from tasks.clip.evaluate import located_entry

    return located_entry({"dataset": dataset, "classes": classes, "format": dataset_format})


def _headline(result: dict) -> str:
    keys = ("accuracy", "balanced_accuracy", "R@1")
    return " ".join(f"{k}={result[k]:.3f}" for k in keys if isinstance(result.get(k), int | float))
