"""``pathgen benchmark``: every dataset of a suite found under a folder, for every model, side by side in
``eval/benchmark/<run>/summary.json`` and ``summary.md`` (flows/benchmark.py).

Exit codes: 0 when every (dataset, model) cell has its numbers; 1 when some failed (their reasons are printed and
in the summary) or the run did not complete; 2 for bad usage: no dataset of the suite under --root, a bad --model,
or a refused random-weight model.
"""

from __future__ import annotations

import argparse
import sys

from pathgen.cli.args import EXIT_FAILED, EXIT_OK, EXIT_USAGE, Commands, overrides_of, settings_args, store_arg
from pathgen.local_api import api_server
from pathgen.settings import load_settings

COMMAND = "benchmark"


def register(commands: Commands) -> None:
    bench = commands.add(
        COMMAND,
        benchmark,
        help="evaluate models on every benchmark dataset under a folder, side by side (eval/benchmark/<run>/)",
    )
    bench.add_argument(
        "--suite",
        choices=["paper", "all"],
        default=None,
        help="paper: the paper's nine zero-shot datasets; all: every dataset there is a reader for (default: "
        "eval.suite, else paper)",
    )
    bench.add_argument(
        "--root",
        metavar="DIR",
        help="folder holding the downloaded datasets, one folder each under any name (default: eval.root)",
    )
    bench.add_argument(
        "--model",
        dest="models",
        metavar="NAME_OR_PATH",
        action="append",
        default=[],
        help="repeatable, first = the reference of the difference column; as pathgen evaluate --model takes it "
        "(ViT-B-16:openai, tiny-random, a checkpoint); default: eval.baselines, then the newest PathGen-CLIP",
    )
    bench.add_argument("--run", metavar="NAME", help="eval/benchmark/<NAME>/ (default: <suite>-<UTC time>)")
    store_arg(bench, "where eval/ goes and checkpoints are looked up (default: settings.store, file://./store)")
    settings_args(bench)


def benchmark(args: argparse.Namespace) -> int:
    overrides = overrides_of(args)
    settings = load_settings(args.config, overrides)
    problem = _usage_problem(args, settings)
    if problem:
        print(f"pathgen {COMMAND}: {problem}", file=sys.stderr)
        return EXIT_USAGE
    from flows.benchmark import benchmark_flow

    with api_server():
        state = benchmark_flow(
            suite=args.suite,
            root=args.root,
            models=args.models or None,
            run=args.run,
            config=args.config,
            overrides=overrides,
            return_state=True,
        )
    if not state.is_completed():
        error = state.result(raise_on_failure=False)
        print(f"pathgen {COMMAND}: {error}", file=sys.stderr)
        return EXIT_USAGE if isinstance(error, ValueError) else EXIT_FAILED
    return print_summary(state.result())


def _usage_problem(args: argparse.Namespace, settings) -> str | None:
    """What is wrong before Prefect starts: no root, a root without any dataset of the suite, a bad model name.
    The missing datasets are printed here, with where to get them."""
    from flows.benchmark import checked_models, missing_text
    from tasks.benchmark.run import plan_benchmark

    root = args.root or settings.eval.root
    if not root:
        return "name the folder of the downloaded datasets with --root DIR (or set eval.root)"
    suite = args.suite or settings.eval.suite or "paper"
    try:
        plan = plan_benchmark(root, suite)
        if args.models:
            checked_models(args.models)
    except ValueError as exc:
        return str(exc)
    print(f"suite {suite} under {root}: found {', '.join(f'{f.name} ({p})' for f, p in plan.found) or 'nothing'}")
    for line in missing_text(plan):
        print(f"  missing: {line}")
    if not plan.found:
        return f"no dataset of suite {suite} under {root}; download them (above), or choose --suite all"
    return None


def print_summary(summary: dict) -> int:
    from tasks.benchmark.summary import column_name, failures, random_text, table, unseen_classes
    from tasks.tables import text_table

    print(f"\nbenchmark {summary['run']}: {summary['metrics']}")
    for line in text_table(*table(summary)):
        print(f"  {line}")
    for line in failures(summary) + unseen_classes(summary):
        print(f"  {line}")
    for entry in summary["models"]:
        print(f"{column_name(entry)}: {entry['model']}")
        if entry["random_weights"]:
            print(f"  RANDOM WEIGHTS: {random_text(entry)}")
    print(f"summary: {summary['files']['json']}")
    print(f"         {summary['files']['markdown']}")
    runs = ", ".join(m["eval_run"] for m in summary["models"])
    print(f"per task: eval/benchmark/{summary['run']}/<eval_run>/<task>.json ({runs}; the newest in eval/<eval_run>/)")
    return EXIT_FAILED if summary["failed"] else EXIT_OK
