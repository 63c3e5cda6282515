"""``pathgen run`` (the factory: extract, caption, train-clip, evaluate in one flow run) and ``pathgen status``
(what a store holds, from the store alone)."""

from __future__ import annotations

import argparse
import sys

from pathgen.local_api import api_server
from pathgen.settings import Settings

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def add_commands(sub, common: argparse.ArgumentParser, settings_args, parts_arg) -> None:
    run = sub.add_parser(
        "run", parents=[common], help="the whole factory: extract, caption, train-clip, evaluate (each skips done work)"
    )
    run.add_argument("sources", nargs="*", metavar="SOURCE", help="as for extract (default: settings.sources)")
    run.add_argument("--store", metavar="URL", help="store root URL (default: settings.store, file://./store)")
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

    status = sub.add_parser("status", parents=[common], help="what the store holds: slides, pairs, models, failures")
    status.add_argument("--store", metavar="URL", help="store root URL (default: settings.store, file://./store)")
    settings_args(status)


def _run(args: argparse.Namespace) -> int:
    from pathgen.cli import EXIT_USAGE as USAGE
    from pathgen.cli import overrides_of, source_problem
    from pathgen.settings import load_settings

    overrides = overrides_of(args)
    for spec in args.sources:  # a missing local path is a usage error: nothing starts for it
        problem = source_problem(spec)
        if problem:
            print(f"pathgen run: {problem}", file=sys.stderr)
            return USAGE
    return run_factory(args, overrides, load_settings(args.config, overrides))


def _status(args: argparse.Namespace) -> int:
    from pathgen.cli import overrides_of
    from pathgen.settings import load_settings

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
    if state.is_completed():
        summary = state.result()
        print("\nfactory run:")
        for row in summary["stages"]:
            shown = {k: v for k, v in row.items() if k not in ("stage", "state") and v not in (None, "")}
            details = ", ".join(f"{k} {v}" for k, v in shown.items())
            print(f"  {row['stage']}: {row['state']} ({details})")
        print()
        _print_status(settings)
        return EXIT_OK
    print(f"pathgen run: {state.result(raise_on_failure=False)}", file=sys.stderr)
    _print_status(settings)
    return EXIT_FAILED


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


COMMANDS = {"run": _run, "status": _status}
