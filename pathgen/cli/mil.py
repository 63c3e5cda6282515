"""``pathgen mil-task``: a whole-slide task file (CLAM's CSV: case_id, slide_id, label, split) built from a benchmark's
official download layout with the PathGen-CLIP paper's splits (tasks/mil/tasks.py). It only lists slides and reads
label files, so it runs in this process without Prefect.

``pathgen train-mil --task FILE [--features HASH|DIR] [--model abmil|acmil|mean]``: the train_mil flow; prints the
run, the chosen lr, the test metrics (mean±std over seeds), where the evaluation and heatmaps are, and RANDOM
WEIGHTS when the features came from random weights.

Exit codes: 0 when the file is written / the run trained or was found finished; 2 for bad usage, a layout, label or
task file refused, or features missing (the message names the file, the line and the fix); 1 when a run stays
pending (infrastructure: run again).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pathgen.cli.args import EXIT_FAILED, EXIT_OK, EXIT_USAGE, Commands, overrides_of, settings_args, store_arg
from pathgen.local_api import api_server

COMMAND = "mil-task"
TRAIN_COMMAND = "train-mil"
BRACS_CLASSES = ("subtype", "group")  # build_bracs(classes=...)
# The options each builder takes; an option given for another data set is refused rather than silently ignored.
DATASET_OPTIONS = {"camelyon16": ("seed",), "camelyon17": ("seed", "scheme"), "bracs": ("classes",)}


def register(commands: Commands) -> None:
    from tasks.mil.tasks import BUILDERS, CAMELYON17_SCHEMES  # standard library only: cheap at parser time

    task = commands.add(
        COMMAND,
        mil_task,
        help="build a whole-slide task file (slide_id, label, split) from a benchmark's official layout",
    )
    task.add_argument("dataset", choices=list(BUILDERS), help="which benchmark's download layout ROOT holds")
    task.add_argument("--root", metavar="DIR", required=True, help="the data set's folder (e.g. .../CAMELYON16)")
    task.add_argument("--out", metavar="FILE", required=True, help="the task CSV to write")
    task.add_argument(
        "--seed", type=int, metavar="N", help="camelyon16/17: seed of the train/val split (default 0; bracs: none)"
    )
    task.add_argument(
        "--scheme",
        choices=list(CAMELYON17_SCHEMES),
        help="camelyon17 labels: binary (default; itc counts as negative), any_tumor, or stage (4 classes)",
    )
    task.add_argument(
        "--classes", choices=BRACS_CLASSES, help="bracs labels: subtype (default, 7 classes) or group (BT/AT/MT)"
    )
    _add_train_command(commands)


def _add_train_command(commands: Commands) -> None:
    train = commands.add(
        TRAIN_COMMAND,
        train_mil,
        help="train and evaluate an attention-MIL slide classifier on slide features (models/mil/, eval/mil/)",
    )
    train.add_argument("--task", metavar="FILE", required=True, help="task CSV: slide_id,label[,case_id][,split]")
    train.add_argument(
        "--features",
        metavar="HASH|DIR",
        help="a features hash in the store or a folder of CLAM/TRIDENT <slide_id>.h5 files; default: mil.features, "
        "else the features of these settings (pathgen features)",
    )
    train.add_argument("--model", choices=("abmil", "acmil", "mean"), help="default: mil.model (abmil)")
    store_arg(train)
    settings_args(train)


def usage_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with the command line, told before any file is read."""
    allowed = DATASET_OPTIONS[args.dataset]
    for option in ("seed", "scheme", "classes"):
        if getattr(args, option) is not None and option not in allowed:
            takes = ", ".join(f"--{name}" for name in allowed)
            return f"--{option} does not apply to {args.dataset} (it takes {takes}); drop it"
    out = Path(args.out).expanduser()
    if out.is_dir():
        return f"--out {args.out} is a folder; give a file name, e.g. {out / (args.dataset + '.csv')}"
    return None


def mil_task(args: argparse.Namespace) -> int:
    from tasks.mil.tasks import BUILDERS, TaskError, write_task

    problem = usage_problem(args)
    if problem:
        print(f"pathgen {COMMAND}: {problem}", file=sys.stderr)
        return EXIT_USAGE
    options = {name: getattr(args, name) for name in DATASET_OPTIONS[args.dataset] if getattr(args, name) is not None}
    try:
        rows = BUILDERS[args.dataset](Path(args.root).expanduser(), **options)
        out = write_task(rows, Path(args.out).expanduser())
    except TaskError as exc:
        print(f"pathgen {COMMAND}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(
        f"wrote {out}: {args.dataset}, {len(rows)} slides, {len({row.case_id for row in rows})} cases{_options(args)}"
    )
    print(counts_table(rows))
    return EXIT_OK


def _options(args: argparse.Namespace) -> str:
    """The builder options in effect, given or default (``, seed 0``), so the printed summary says how it was split."""
    import inspect

    from tasks.mil.tasks import BUILDERS

    parameters = inspect.signature(BUILDERS[args.dataset]).parameters
    chosen = {name: getattr(args, name) for name in DATASET_OPTIONS[args.dataset]}
    return "".join(f", {name} {parameters[name].default if value is None else value}" for name, value in chosen.items())


def counts_table(rows) -> str:
    """Slides per split (rows) and label (columns), with totals and the number of cases per split."""
    from collections import Counter

    from tasks.mil.tasks import split_counts

    labels = sorted({row.label for row in rows})
    splits = list(split_counts(rows))
    per_cell = Counter((row.split, row.label) for row in rows)
    cases = {split: len({row.case_id for row in rows if row.split == split}) for split in splits}
    header = ["split", *labels, "slides", "cases"]
    table = [header]
    for split in splits:
        cells = [per_cell[split, label] for label in labels]
        table.append([split or "(none)", *map(str, cells), str(sum(cells)), str(cases[split])])
    totals = [sum(per_cell[split, label] for split in splits) for label in labels]
    table.append(["total", *map(str, totals), str(len(rows)), str(len({row.case_id for row in rows}))])
    widths = [max(len(line[column]) for line in table) for column in range(len(header))]
    return "\n".join("  " + "  ".join(_aligned(line, widths)) for line in table)


def _aligned(line: list[str], widths: list[int]) -> list[str]:
    """The first column left-aligned, the counts right-aligned."""
    return [line[0].ljust(widths[0])] + [cell.rjust(width) for cell, width in zip(line[1:], widths[1:], strict=True)]


def train_mil(args: argparse.Namespace) -> int:
    overrides = overrides_of(args)  # a bad setting fails here, before Prefect starts
    if not Path(args.task).expanduser().is_file():
        print(f"pathgen {TRAIN_COMMAND}: --task {args.task}: no such task file; build one with `pathgen mil-task`",
              file=sys.stderr)  # fmt: skip
        return EXIT_USAGE
    from flows.train_mil import train_mil_flow

    task = str(Path(args.task).expanduser())
    with api_server():
        state = train_mil_flow(
            task=task, features=args.features, model=args.model, config=args.config, overrides=overrides,
            return_state=True,
        )  # fmt: skip
    if not state.is_completed():
        error = state.result(raise_on_failure=False)
        print(f"pathgen {TRAIN_COMMAND}: {error}", file=sys.stderr)
        return EXIT_USAGE if isinstance(error, ValueError) else EXIT_FAILED
    summary = state.result()
    if summary["status"] not in ("trained", "skipped"):
        why = "its input was refused" if summary["status"] == "failed" else "it stays pending; run again"
        print(f"pathgen {TRAIN_COMMAND}: {summary['task']}: {why}: {summary.get('error')}", file=sys.stderr)
        return EXIT_USAGE if summary["status"] == "failed" else EXIT_FAILED
    print_train_summary(summary)
    return EXIT_OK


def print_train_summary(summary: dict) -> None:
    from tasks.mil.run import headline_text

    print(f"run: {summary['run']} ({summary['status']}) -> {summary['run_prefix']}/")
    print(f"model {summary['model']} on features {summary['features']}; chosen lr {summary['chosen_lr']}")
    seeds = len(summary["seeds"])
    print(f"test metrics, mean±std over {seeds} seed(s) ({summary['std_definition']}):")
    for name, text in headline_text(summary["mean"], summary["std"]).items():
        print(f"  {name:<18} {text}")
    print(f"evaluation: {summary['eval_uri']}")
    print(f"confusion:  {summary['confusion_png']}")
    skipped = summary["heatmaps_skipped"]
    where = summary["heatmaps"][0].rsplit("/", 1)[0] + "/" if summary["heatmaps"] else "none drawn"
    print(f"heatmaps:   {len(summary['heatmaps'])} ({where}){f', {len(skipped)} skipped' if skipped else ''}")
    for skip in skipped[:5]:
        print(f"  skipped {skip['slide_id']}: {skip['reason']}")
    if summary["random_weights"]:
        from flows.train_mil import RANDOM_FEATURES

        print(RANDOM_FEATURES)
