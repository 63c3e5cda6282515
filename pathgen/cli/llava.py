"""``pathgen train-llava``: run the PathGen-LLaVA training flow on a LLaVA data folder and print, per stage, its
steps, first and last loss and the Hugging Face folder it made."""

from __future__ import annotations

import argparse
import sys

from pathgen.cli.args import EXIT_FAILED, EXIT_OK, EXIT_USAGE, Commands, overrides_of, settings_args, store_arg
from pathgen.local_api import api_server


def register(commands: Commands) -> None:
    train = commands.add(
        "train-llava",
        train_llava,
        help="train PathGen-LLaVA (projector, then instruction tuning) on a LLaVA conversation folder",
    )
    train.add_argument(
        "--data",
        metavar="DIR",
        help="LLaVA JSON folder (stage1.json, stage2.json, images); default: export the store's data first",
    )
    store_arg(train)
    settings_args(train)


def train_llava(args: argparse.Namespace) -> int:
    overrides = overrides_of(args)  # a bad setting fails here, before Prefect starts
    from flows.train_llava import train_llava_flow

    with api_server():
        state = train_llava_flow(config=args.config, overrides=overrides, data=args.data, return_state=True)
    if not state.is_completed():
        error = state.result(raise_on_failure=False)
        print(f"pathgen train-llava: {error}", file=sys.stderr)
        return EXIT_USAGE if isinstance(error, ValueError) else EXIT_FAILED
    summary = state.result()
    print_summary(summary)
    if summary["error"]:
        print(f"pathgen train-llava: {summary['error']}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def print_summary(summary: dict) -> None:
    for stage in summary["stages"]:
        random = "  RANDOM WEIGHTS" if stage.get("random_weights") else ""
        if stage["status"] == "no-data":
            print(f"{stage['stage']}: NOT TRAINED  {stage['error']}")
            continue
        if stage["status"] not in ("ok", "skipped"):
            print(f"{stage['stage']}: {stage['status']}  {stage.get('error')}")
            continue
        print(
            f"{stage['stage']}: {stage['status']}  {stage.get('steps', 0)} steps  "
            f"loss {_loss(stage.get('first_loss'))} -> {_loss(stage.get('last_loss'))}  "
            f"-> {stage.get('model')}{random}"
        )
    print(f"run: {summary['store'].rstrip('/')}/models/llava/{summary['run']}/ (run.json, metrics.jsonl per stage)")
    if summary["random_weights"]:
        print("RANDOM WEIGHTS: " + "; ".join(summary["random_models"]))


def _loss(value) -> str:
    return f"{value:.4f}" if isinstance(value, int | float) else "-"
