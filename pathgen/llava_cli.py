"""``pathgen train-llava``: run the PathGen-LLaVA training flow on a LLaVA data folder and print, per stage, its
steps, first and last loss and the Hugging Face folder it made."""

from __future__ import annotations

import argparse
import sys

from pathgen.local_api import api_server

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def add_commands(sub, common: argparse.ArgumentParser, settings_args, parts_arg) -> None:
    from pathgen.cli import store_arg  # pathgen.cli imports this module while it builds its parser

    train = sub.add_parser(
        "train-llava",
        parents=[common],
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
    from flows.train_llava import train_llava_flow
    from pathgen.cli import overrides_of

    overrides = overrides_of(args)  # a bad setting fails here, before Prefect starts

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


COMMANDS = {"train-llava": train_llava}
