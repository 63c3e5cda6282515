"""``pathgen train-clip`` and ``pathgen evaluate``: run the flows, print what they made and where."""

from __future__ import annotations

import argparse
import sys

from pathgen.cli.args import EXIT_FAILED, EXIT_OK, EXIT_USAGE, Commands, overrides_of, settings_args, store_arg
from pathgen.cli.runs import run_training_flow
from pathgen.local_api import api_server


def register(commands: Commands) -> None:
    train = commands.add("train-clip", train_clip, help="train PathGen-CLIP on the pairs with open_clip's trainer")
    store_arg(train)
    settings_args(train)

    evaluate_parser = commands.add(
        "evaluate", evaluate, help="zero-shot, linear-probe and retrieval evaluation of a CLIP model"
    )
    evaluate_parser.add_argument(
        "--dataset", metavar="DIR", required=True, help="a benchmark dataset as downloaded, or one folder per class"
    )
    evaluate_parser.add_argument(
        "--format",
        dest="dataset_format",
        metavar="NAME",
        help="the dataset's format (pcam, crc100k, ...: tasks/benchmark/readers/); default: detected from its files",
    )
    evaluate_parser.add_argument(
        "--classes", metavar="FILE", help="JSON: folder -> class names [templates], for one folder per class"
    )
    evaluate_parser.add_argument(
        "--model", metavar="NAME_OR_PATH", help="ViT-B-16:openai, a checkpoint path; default: newest in the store"
    )
    evaluate_parser.add_argument("--holdout", metavar="DIR", help="held-out pair tars for retrieval recall")
    store_arg(evaluate_parser, "where eval/<run>/ goes and checkpoints are looked up")
    settings_args(evaluate_parser)


def train_clip(args: argparse.Namespace) -> int:
    overrides = overrides_of(args)
    from flows.train_clip import train_clip_flow

    def run():
        return train_clip_flow(config=args.config, overrides=overrides, return_state=True)

    return run_training_flow("train-clip", run, print_training)


def print_training(summary: dict) -> None:
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


def evaluate(args: argparse.Namespace) -> int:
    overrides = overrides_of(args)
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
