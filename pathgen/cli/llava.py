"""``pathgen train-llava``: run the PathGen-LLaVA training flow on a LLaVA data folder and print, per stage, its
steps, first and last loss and the Hugging Face folder it made."""

from __future__ import annotations

import argparse

from pathgen.cli.args import Commands, overrides_of, settings_args, store_arg
from pathgen.cli.runs import run_training_flow


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

    def run():
        return train_llava_flow(config=args.config, overrides=overrides, data=args.data, return_state=True)

    # a ValueError: the data folder or the settings are wrong, not the run
    return run_training_flow("train-llava", run, print_summary, usage_errors=(ValueError,))


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
