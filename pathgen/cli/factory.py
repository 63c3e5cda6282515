"""``pathgen run`` (the factory: extract, caption, train-clip, evaluate in one flow run) and ``pathgen status``
(what a store holds, from the store alone)."""

from __future__ import annotations

import argparse
import sys

from pathgen.cli.args import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    Commands,
    overrides_of,
    parts_arg,
    settings_args,
    store_arg,
)
from pathgen.cli.runs import sources_problem
from pathgen.local_api import api_server
from pathgen.settings import Settings, load_settings


def register(commands: Commands) -> None:
    run = commands.add(
        "run", factory_run, help="the whole factory: extract, caption, train-clip, evaluate (each skips done work)"
    )
    run.add_argument("sources", nargs="*", metavar="SOURCE", help="as for extract (default: settings.sources)")
    store_arg(run)
    run.add_argument(
        "--stages",
        default="extract,caption,train-clip,evaluate",
        metavar="LIST",
        help="comma-separated stages, run in the factory's order: extract, caption, instruct, train-clip, evaluate, "
        "features, train-mil (on mil.task), train-llava (default: extract,caption,train-clip,evaluate)",
    )
    run.add_argument("--dataset", metavar="DIR", help="evaluate on this labelled folder (with --classes)")
    run.add_argument("--classes", metavar="FILE", help="JSON: folder -> class names, for --dataset")
    parts_arg(run)
    settings_args(run)

    status = commands.add("status", store_status, help="what the store holds: slides, pairs, models, failures")
    store_arg(status)
    settings_args(status)


def factory_run(args: argparse.Namespace) -> int:
    overrides = overrides_of(args)
    problem = sources_problem(args.sources)  # a missing local path is a usage error: nothing starts for it
    if problem:
        print(f"pathgen run: {problem}", file=sys.stderr)
        return EXIT_USAGE
    return run_factory(args, overrides, load_settings(args.config, overrides))


def store_status(args: argparse.Namespace) -> int:
    return status(load_settings(args.config, overrides_of(args)))


def run_factory(args: argparse.Namespace, overrides: dict, settings: Settings) -> int:
    from flows.factory import checked_stages, factory_flow
    from tasks.models import require_real_models

    stages = checked_stages([s.strip() for s in args.stages.split(",") if s.strip()])
    require_real_models(settings, stages)  # before Prefect starts
    if bool(args.dataset) != bool(args.classes):
        print("pathgen run: give --dataset and --classes together", file=sys.stderr)
        return EXIT_USAGE
    datasets = [{"dataset": args.dataset, "classes": args.classes}] if args.dataset else None
    with api_server():
        state = factory_flow(
            sources=args.sources or None,
            config=args.config,
            overrides=overrides,
            stages=stages,
            parts=args.parts,
            datasets=datasets,
            return_state=True,
        )
    if not state.is_completed():
        print(f"pathgen run: {state.result(raise_on_failure=False)}", file=sys.stderr)
        _print_status(settings)
        return EXIT_FAILED
    print_stages(state.result())
    print()
    _print_status(settings)
    return EXIT_OK


def print_stages(summary: dict) -> None:
    print("\nfactory run:")
    for row in summary["stages"]:
        shown = {k: v for k, v in row.items() if k not in ("stage", "state") and v not in (None, "")}
        details = ", ".join(f"{k} {v}" for k, v in shown.items())
        print(f"  {row['stage']}: {row['state']} ({details})")


def status(settings: Settings) -> int:
    from tasks.store.objects import Store

    store = Store(settings.store, settings.s3)
    if not store.exists(""):
        print(f"pathgen status: no store at {store.url}; make one with pathgen run SOURCE --store {store.url}")
        return EXIT_FAILED
    _print_status(settings)
    return EXIT_OK


def _print_status(settings: Settings) -> None:
    from tasks.report import store_report, text
    from tasks.store.objects import Store

    print(text(store_report(Store(settings.store, settings.s3))))
