"""``pathgen evaluate-mc``: score a vision-language model (PathGen-LLaVA, a baseline, or the tiny random VLM) on a
PathMMU-style multiple-choice JSON Lines file, in this process; the report goes to ``eval/mc/<run>/<dataset>.json``
in the store (--store, by default settings.store as for every command) and, with --out, to a file as well.

Exit codes: 0 when every question was put to the model (however many it got right); 2 for bad usage, a bad
dataset file or a refused random-weight model; 1 when the model or the store failed.

``pathgen mc-dataset pathmmu --root DIR --out FILE``: the released PathMMU files as such a JSON Lines file
(tasks/mc/pathmmu.py). Exit codes: 0 when every question was converted; 1 when some were not (the file holds the
rest; each left out is reported with its reason) or none were (nothing written); 2 for bad usage or a root that is
no PathMMU release.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from pathgen.cli.args import EXIT_FAILED, EXIT_OK, EXIT_USAGE, Commands, assignments_of, settings_args, store_arg
from pathgen.settings import load_settings

COMMAND = "evaluate-mc"
DATASET_COMMAND = "mc-dataset"
SKIPPED_SHOWN = 5  # questions named per reason; the counts are always complete


def register(commands: Commands) -> None:
    mc = commands.add(COMMAND, evaluate_mc, help="multiple-choice accuracy of a vision-language model (PathMMU format)")
    mc.add_argument(
        "--dataset", metavar="FILE", required=True, help="JSONL: id, image, question, options, answer[, subset]"
    )
    mc.add_argument(
        "--model",
        metavar="NAME_OR_FOLDER",
        help="hub id, local folder (e.g. a PathGen-LLaVA export) or served model name; default: the tiny "
        "random-weight VLM (its scores are noise)",
    )
    mc.add_argument(
        "--backend",
        choices=["transformers", "openai", "vllm"],
        default="transformers",
        help="transformers (default), openai (with --set agents.openai_base_url=URL) or vllm",
    )
    store_arg(mc, "store root URL for eval/mc/<run>/<dataset>.json (default: settings.store, file://./store)")
    mc.add_argument("--out", metavar="FILE", help="also write the report to this JSON file")
    mc.add_argument("--limit", type=int, metavar="N", help="only the first N questions (named <dataset>-firstN)")
    mc.add_argument("--run", metavar="NAME", help="the report's folder under eval/mc/ (default: from the model)")
    mc.add_argument(
        "--prompt",
        metavar="FILE",
        help="prompt .txt ([system], [user] with {image}, {question}, {options}); default: tasks/mc/prompts/mc.v1.txt",
    )
    mc.add_argument("--max-new-tokens", type=int, default=None, metavar="N", help="reply length cap (default 32)")
    settings_args(mc)
    _add_dataset_command(commands)


def _add_dataset_command(commands: Commands) -> None:
    from tasks.mc.pathmmu import SPLITS

    dataset = commands.add(
        DATASET_COMMAND, mc_dataset, help="convert a released multiple-choice benchmark for evaluate-mc"
    )
    formats = dataset.add_subparsers(dest="mc_format", required=True)
    pathmmu = formats.add_parser(
        "pathmmu",
        parents=[commands.common],
        help="PathMMU (data.json + images/ from huggingface.co/datasets/jamessyx/PathMMU)",
    )
    pathmmu.add_argument("--root", metavar="DIR", required=True, help="the release folder: data.json and images/")
    pathmmu.add_argument(
        "--out",
        metavar="FILE",
        required=True,
        help="JSONL to write, in the root or a folder above it (else use --copy-images)",
    )
    pathmmu.add_argument("--split", choices=SPLITS, default="test", help="which split (default: test)")
    pathmmu.add_argument(
        "--subset", action="append", metavar="NAME", help="only this subset, e.g. PubMed (repeatable; default: all)"
    )
    pathmmu.add_argument(
        "--copy-images",
        action="store_true",
        help="put the images beside --out in <out stem>-images/ (hard links where possible) instead of naming "
        "them in place; needed when --out is not in the root or a folder above it",
    )


def usage_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with the command line, told before any model loads."""
    if args.limit is not None and args.limit < 1:
        return f"--limit must be at least 1 (got {args.limit})"
    if args.max_new_tokens is not None and not 1 <= args.max_new_tokens <= 8192:
        return f"--max-new-tokens must be between 1 and 8192 (got {args.max_new_tokens})"
    if args.backend in ("openai", "vllm") and not args.model:
        return f"the {args.backend} backend needs --model (the served model name, hub id or folder)"
    if args.out:
        out = Path(args.out).expanduser()
        if out.is_dir():
            return f"--out {args.out} is a folder; give a file name, e.g. {out / 'mc.json'}"
        if not out.absolute().parent.is_dir():
            return f"folder {out.absolute().parent} does not exist; create it or choose another --out"
    return None


def evaluate_mc(args: argparse.Namespace) -> int:
    from tasks.mc.answers import load_mc_prompt
    from tasks.mc.dataset import DatasetError, load_questions

    problem = usage_problem(args)
    if problem:
        print(f"pathgen {COMMAND}: {problem}", file=sys.stderr)
        return EXIT_USAGE
    settings = load_settings(args.config, assignments_of(args))
    try:
        prompt = load_mc_prompt(args.prompt)
    except ValueError as exc:  # a missing or malformed --prompt file
        print(f"pathgen {COMMAND}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        questions = load_questions(args.dataset)
    except DatasetError as exc:
        print(f"pathgen {COMMAND}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    store = _checked_store(settings.store, settings)  # before the model: fail fast
    return _evaluate(args, settings, prompt, questions, store)


def _checked_store(url: str, settings) -> Any:
    from tasks.store.objects import Store

    store = Store(url, settings.s3)
    store.check()
    return store


def _evaluate(args: argparse.Namespace, settings, prompt, questions: list, store) -> int:
    from tasks.mc.backend import load_backend
    from tasks.mc.evaluate import (
        DEFAULT_MAX_NEW_TOKENS,
        answer_questions,
        build_report,
        dataset_name,
        mc_sampling,
        publish,
        report_bytes,
        run_name,
    )

    max_new_tokens = args.max_new_tokens or DEFAULT_MAX_NEW_TOKENS
    chosen = questions[: args.limit] if args.limit else questions
    backend, model = load_backend(settings, args.backend, args.model, max_new_tokens, args.prompt)
    sampling = mc_sampling(max_new_tokens)
    predictions = answer_questions(backend, chosen, prompt, sampling, progress=_progress)
    name = dataset_name(Path(args.dataset), args.limit, len(questions))
    report = build_report(Path(args.dataset).resolve(), name, predictions, model, prompt, sampling, args.limit)
    run = args.run or run_name(model)
    written = [publish(store, run, report)]
    if args.out:
        Path(args.out).expanduser().write_bytes(report_bytes(report))
        written.append(str(Path(args.out).expanduser().absolute()))
    print_report(run, report, written)
    return EXIT_OK


def _progress(done: int, total: int) -> None:
    print(f"answered {done}/{total} questions", file=sys.stderr, flush=True)


def print_report(run: str, report: dict[str, Any], written: list[str]) -> None:
    overall = report["overall"]
    print(
        f"\n{run} on {report['dataset']}: accuracy {overall['accuracy']:.3f} ({overall['correct']}/{overall['n']} "
        f"correct), {overall['unparsed']} replies named no single option"
    )
    if report["by_subset"]:
        print(f"  {'subset':<16} {'n':>6} {'correct':>8} {'accuracy':>9} {'unparsed':>9}")
        for subset, f in report["by_subset"].items():
            print(f"  {subset:<16} {f['n']:>6} {f['correct']:>8} {f['accuracy']:>9.3f} {f['unparsed']:>9}")
    if report["unparsed"]:
        print("unparsed replies (scored wrong):")
        for reason, ids in report["unparsed"].items():
            shown = ", ".join(ids[:10]) + (f", ... ({len(ids) - 10} more)" if len(ids) > 10 else "")
            print(f"  {reason}: {len(ids)} ({shown})")
    for target in written:
        print(f"report: {target}")
    if report["random_weights"]:
        model = report["model"]
        print(f"RANDOM WEIGHTS: {model['model_id']} ({model['random_reason']}); its replies are noise and these "
              "numbers measure nothing; pass --model for a real evaluation")  # fmt: skip


def mc_dataset(args: argparse.Namespace) -> int:
    from tasks.mc.pathmmu import PathmmuError, convert_release, write_conversion

    out = Path(args.out).expanduser()
    if out.is_dir() or not out.absolute().parent.is_dir():
        why = "is a folder" if out.is_dir() else f"is in {out.absolute().parent}, which does not exist"
        print(
            f"pathgen {DATASET_COMMAND}: --out {args.out} {why}; give a .jsonl file in an existing folder",
            file=sys.stderr,
        )
        return EXIT_USAGE
    try:
        conversion = convert_release(Path(args.root).expanduser(), out, args.split, args.subset, args.copy_images)
    except PathmmuError as exc:
        print(f"pathgen {DATASET_COMMAND}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if conversion.records:
        write_conversion(conversion, out, args.copy_images)
    print_conversion(conversion, out, args.split)
    return EXIT_OK if conversion.records and not conversion.skipped else EXIT_FAILED


def print_conversion(conversion, out: Path, split: str) -> None:
    converted = conversion.converted_by_subset()
    total = len(conversion.records) + len(conversion.skipped)
    print(f"PathMMU {split}: {len(conversion.records)} of {total} questions converted")
    for subset in conversion.subsets:
        left = sum(1 for s in conversion.skipped if s.subset == subset)
        print(f"  {subset:<12} {converted.get(subset, 0):>6} converted, {left:>6} not converted")
    by_reason: dict[str, list] = {}
    for skipped in conversion.skipped:
        by_reason.setdefault(skipped.kind, []).append(skipped)
    for kind, items in by_reason.items():
        print(f"not converted, {kind}: {len(items)}")
        for item in items[:SKIPPED_SHOWN]:
            print(f"  {item.id}: {item.detail}")
        if len(items) > SKIPPED_SHOWN:
            print(f"  ... and {len(items) - SKIPPED_SHOWN} more")
    if conversion.records:
        print(f"written: {out.absolute()} (pathgen evaluate-mc --dataset {out})")
    else:
        print("nothing written: no question could be converted")
