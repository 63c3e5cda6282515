"""The ``pathgen`` command.

Exit codes: ``extract``: 0 when at least one slide succeeded, 1 when none did; ``caption``: 0 when every slide is
captioned, 1 when slides remain pending or the store holds no patch shards (the cause is named); 2 for bad usage or
settings (a missing local SOURCE, an ``--out`` in a missing folder); 1 for an unexpected error, told in one line
(``pathgen --debug ...`` shows its traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from pathgen.processes import prefect_offline_defaults

prefect_offline_defaults()  # before Prefect is imported: no telemetry notice, no usage data

from pathgen.local_api import api_server, lost_api_explanation, name_command  # noqa: E402
from pathgen.processes import bound_threads  # noqa: E402
from pathgen.settings import SettingsError, load_settings, parse_assignments  # noqa: E402

EXIT_OK, EXIT_NONE_SUCCEEDED, EXIT_USAGE = 0, 1, 2
EXIT_ERROR = 1
SOURCE_KINDS = "a slide file, a folder, a glob, an s3:// URL, a GDC manifest or a PathGen JSON file"
GLOB_CHARS = "*?["
RANDOM_CAPTIONS = (
    "RANDOM WEIGHTS: these captions come from tiny random-weight models and are noise;\n"
    "set agents.describe.model, agents.revise.model and agents.summarize.model for real captions"
)


def _settings_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", metavar="FILE", help="YAML settings file; FILE#VARIANT for one of its variants (e.g. #clip-l)"
    )
    parser.add_argument(
        "--set",
        dest="assignments",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        help="override one setting, e.g. --set patch.target_mpp=0.5 (repeatable)",
    )


STORE_HELP = "store root URL (default: settings.store, file://./store)"


def store_arg(parser: argparse.ArgumentParser, help: str = STORE_HELP) -> None:
    """``--store URL``: the store a command reads and writes; unset, settings.store (as for every command)."""
    parser.add_argument("--store", metavar="URL", help=help)


def _parts_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--parts",
        type=int,
        default=1,
        metavar="N",
        help="split the slides into N parts by a stable hash of the slide id (as a deployment, one child run each)",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pathgen", description="PathGen Factory: slides to image-text pairs.")
    debug_help = "on an unexpected error print its traceback, not just its one-line reason"
    parser.add_argument("--debug", action="store_true", help=debug_help)
    # Also after the subcommand; SUPPRESS keeps a subcommand without it from resetting the global flag.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help)
    sub = parser.add_subparsers(dest="command", required=True)

    extract = sub.add_parser("extract", parents=[common], help="extract tissue patches from slides into the store")
    extract.add_argument(
        "sources",
        nargs="*",
        metavar="SOURCE",
        help="slide file, folder, glob, s3:// prefix, GDC manifest or PathGen JSON",
    )
    store_arg(extract)
    extract.add_argument("--threads", action="store_true", help="run slide groups in threads, not processes")
    _parts_arg(extract)
    _settings_args(extract)

    caption = sub.add_parser(
        "caption", parents=[common], help="caption the selected patches: describe, revise, summarize"
    )
    store_arg(caption)
    _parts_arg(caption)
    _settings_args(caption)

    export = sub.add_parser("export", parents=[common], help="write pairs in an interchange format")
    export.add_argument(
        "format",
        choices=["pathgen-json", "webdataset", "llava", "features"],
        help="pathgen-json: the PathGen-1.6M JSON format (--out FILE); webdataset: tars for open_clip (--out DIR); "
        "llava: stage1.json, stage2.json and images/ for PathGen-LLaVA (--out DIR); features: slide features as "
        "CLAM/TRIDENT <slide_id>.h5 files (--format h5 --out DIR)",
    )
    export.add_argument("--out", metavar="PATH", required=True)
    store_arg(export)
    export.add_argument("--agents-hash", metavar="HASH", help="which pairs (needed when the store holds several)")
    export.add_argument("--instruct-hash", metavar="HASH", help="llava: which instruction data (when several)")
    export.add_argument("--format", dest="file_format", choices=["h5"], default="h5", help="features: file format")
    export.add_argument("--features-hash", metavar="HASH", help="features: which features (when several)")
    _settings_args(export)

    train = sub.add_parser(
        "train-clip", parents=[common], help="train PathGen-CLIP on the pairs with open_clip's trainer"
    )
    store_arg(train)
    _settings_args(train)

    evaluate = sub.add_parser(
        "evaluate", parents=[common], help="zero-shot, linear-probe and retrieval evaluation of a CLIP model"
    )
    evaluate.add_argument(
        "--dataset", metavar="DIR", required=True, help="a benchmark dataset as downloaded, or one folder per class"
    )
    evaluate.add_argument(
        "--format",
        dest="dataset_format",
        metavar="NAME",
        help="the dataset's format (pcam, crc100k, ...: tasks/benchmark/readers/); default: detected from its files",
    )
    evaluate.add_argument(
        "--classes", metavar="FILE", help="JSON: folder -> class names [templates], for one folder per class"
    )
    evaluate.add_argument(
        "--model", metavar="NAME_OR_PATH", help="ViT-B-16:openai, a checkpoint path; default: newest in the store"
    )
    evaluate.add_argument("--holdout", metavar="DIR", help="held-out pair tars for retrieval recall")
    evaluate.add_argument("--store", metavar="URL", help="where eval/<run>/ goes and checkpoints are looked up")
    _settings_args(evaluate)

    inspect = sub.add_parser(
        "inspect", parents=[common], help="show what a store or a shard holds and write a contact sheet"
    )
    inspect.add_argument("url", metavar="URL", help="store root or a .parquet shard")
    inspect.add_argument(
        "--out", metavar="PNG", help="contact sheet path (default: the store's reports/contact-sheet.png)"
    )
    inspect.add_argument("--samples", type=int, default=24, help="patches on the contact sheet")
    inspect.add_argument("--rows", type=int, default=5, help="sample rows printed")

    for module in _command_modules():
        module.add_commands(sub, common, _settings_args, _parts_arg)
    settings = sub.add_parser("settings", parents=[common], help="print the effective settings as YAML")
    _settings_args(settings)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    name_command(f"pathgen {args.command}")  # how a lost Prefect API is told (pathgen/local_api.py)
    bound_threads()  # one thread budget for torch/OpenMP/BLAS/OpenCV here and, via the environment, in children
    if getattr(args, "parts", 1) < 1:
        print(f"pathgen {args.command}: --parts must be at least 1 (got {args.parts})", file=sys.stderr)
        return EXIT_USAGE
    try:
        if args.command == "extract":
            return _extract(args)
        if args.command == "caption":
            return _caption(args)
        if args.command == "export":
            return _export(args)
        if args.command == "train-clip":
            from pathgen.clip_cli import train_clip

            return train_clip(args, overrides_of(args))
        if args.command == "evaluate":
            from pathgen.clip_cli import evaluate

            return evaluate(args, overrides_of(args))
        for module in _command_modules():
            if args.command in module.COMMANDS:
                return module.COMMANDS[args.command](args)
        if args.command == "inspect":
            from pathgen.inspect import inspect_url

            return inspect_url(args.url, out=args.out, samples=args.samples, rows=args.rows)
        if args.command == "settings":
            import yaml

            settings = load_settings(args.config, parse_assignments(args.assignments))
            print(yaml.safe_dump(settings.model_dump(), sort_keys=False), end="")
            return EXIT_OK
    except SettingsError as exc:
        print(f"pathgen: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:
        if args.debug:
            raise
        lost = lost_api_explanation(exc)
        if lost:
            print(lost, file=sys.stderr)
            return EXIT_ERROR
        from pathgen.errors import cut

        reason = cut(" ".join(str(exc).split()), 300)
        print(
            f"pathgen {args.command}: {type(exc).__name__}: {reason} (run with --debug for the traceback)",
            file=sys.stderr,
        )
        return EXIT_ERROR
    return EXIT_USAGE


def source_problem(spec: str) -> str | None:
    """Why a local SOURCE names nothing (it does not exist, or its glob matches no slide file), told before Prefect
    starts; None for a remote URL or a local source that is there (whether it reads is the flow's to find out)."""
    from tasks.slides.sources import is_slide_name
    from tasks.store.objects import is_remote, local_path

    spec = str(spec)
    if is_remote(spec):
        return None
    if any(ch in spec for ch in GLOB_CHARS):
        import glob

        pattern = os.path.expanduser(spec)  # as the source resolver reads it
        if any(is_slide_name(p) for p in glob.iglob(pattern, recursive=True)):
            return None
        return (
            f"the glob {spec} matches no slide file; check the pattern, or give a slide file, a folder, "
            "an s3:// URL, a GDC manifest or a PathGen JSON file"
        )
    if os.path.exists(local_path(spec)):
        return None
    return f"{spec} does not exist; give {SOURCE_KINDS}"


def _extract(args: argparse.Namespace) -> int:
    from flows.extract import extract_flow

    return run_slide_flow("extract", args, extract_flow, _print_summary)


def run_slide_flow(command: str, args: argparse.Namespace, flow, print_summary, **parameters) -> int:
    """A flow over SOURCE... (extract, features): settings and sources checked before Prefect starts, the flow run
    on the shared local API when none is configured, its summary printed; exit 0, 1 (no slide succeeded) or 2."""
    overrides = parse_assignments(args.assignments)
    if args.store:
        overrides["store"] = args.store
    settings = load_settings(args.config, overrides)  # fails here, before Prefect starts, on a bad setting
    sources = args.sources or settings.sources
    if not sources:
        print(f"pathgen {command}: name at least one SOURCE (or set `sources` in the config)", file=sys.stderr)
        return EXIT_USAGE
    for spec in sources:  # a missing local path is a usage error: nothing starts and nothing is written for it
        problem = source_problem(spec)
        if problem:
            print(f"pathgen {command}: {problem}", file=sys.stderr)
            return EXIT_USAGE
    with api_server():  # no API configured: the shared local server (pathgen/local_api.py)
        state = flow(
            sources=list(sources),
            config=args.config,
            overrides=credentials_to_environment(overrides),
            processes=not args.threads,
            parts=args.parts,
            return_state=True,
            **parameters,
        )
    if not state.is_completed():
        error = state.result(raise_on_failure=False)
        print(f"pathgen {command}: {error}", file=sys.stderr)
        from tasks.slides.sources import SourceError

        return EXIT_USAGE if isinstance(error, SettingsError | SourceError) else EXIT_NONE_SUCCEEDED
    print_summary(state.result())
    return EXIT_OK


# Modules that add subcommands: each has add_commands(sub, common, settings_args, parts_arg) and COMMANDS, a map of
# command name -> handler(args) -> exit code. Imported when the parser is built; they import their flows lazily.
COMMAND_MODULES = (
    "pathgen.factory_cli",
    "pathgen.mc_cli",
    "pathgen.instruct_cli",
    "pathgen.llava_cli",
    "pathgen.mil_cli",
    "pathgen.features_cli",
    "pathgen.benchmark_cli",
    "pathgen.serve_cli",
)


def _command_modules() -> list:
    import importlib

    return [importlib.import_module(name) for name in COMMAND_MODULES]


def overrides_of(args: argparse.Namespace) -> dict:
    overrides = parse_assignments(args.assignments)
    if args.store:
        overrides["store"] = args.store
    load_settings(args.config, overrides)  # fail here, before Prefect starts, on a bad setting
    return credentials_to_environment(overrides)


def credentials_to_environment(overrides: dict) -> dict:
    """A URL with credentials in it (``https://user:secret@host``) goes to this process's environment, where the
    settings read it, instead of into the flow run's parameters, which Prefect stores and shows in its UI."""
    from pathgen.errors import without_userinfo

    kept = {}
    for key, value in overrides.items():
        if isinstance(value, str) and without_userinfo(value) != value:
            os.environ["PATHGEN_" + key.upper().replace(".", "__")] = value
        else:
            kept[key] = value
    return kept


def _caption(args: argparse.Namespace) -> int:
    overrides = overrides_of(args)
    from flows.caption import NoPatchShardsError, caption_flow, require_patch_shards
    from tasks.store.objects import StoreError

    try:
        # Before Prefect starts: caption before extract is told at once, without creating the store folder.
        require_patch_shards(load_settings(args.config, overrides))
    except (NoPatchShardsError, StoreError) as exc:
        print(f"pathgen caption: {exc}", file=sys.stderr)
        return EXIT_NONE_SUCCEEDED
    summary = run_stage_flow("caption", caption_flow, args, overrides)
    if summary is None:
        return EXIT_NONE_SUCCEEDED
    print(
        f"\ncaptioned {summary['ok']} slides ({summary['pairs']} pairs; {summary['skipped']} slides already done); "
        f"{summary['failed']} patches failed {summary['failures'] or ''}"
    )
    print(f"pairs: {summary['pairs_prefix']}/<slide_id>.parquet; failed items under failed/{summary['agents_hash']}/")
    print(f"longest caption: {summary['max_tokens']} CLIP tokens")
    export = f"export them:  pathgen export pathgen-json --store {summary['store']} --out pairs.json"
    return EXIT_NONE_SUCCEEDED if report_parts_and_pending("caption", summary, RANDOM_CAPTIONS, export) else EXIT_OK


def run_stage_flow(command: str, flow: Any, args: argparse.Namespace, overrides: dict) -> dict | None:
    """Run a slide stage's flow; its summary, or None (the reason told on stderr) when the run did not complete."""
    with api_server():  # no API configured: the shared local server (pathgen/local_api.py)
        state = flow(config=args.config, overrides=overrides, parts=args.parts, return_state=True)
    if not state.is_completed():
        print(f"pathgen {command}: {state.result(raise_on_failure=False)}", file=sys.stderr)
        print(f"pathgen {command}: nothing was committed for the slides still pending; run again", file=sys.stderr)
        return None
    return state.result()


def report_parts_and_pending(command: str, summary: dict, random_weights_note: str, next_step: str) -> bool:
    """Print each part's run, the note when random weights made the data and the next step; then, on stderr, why
    slides remain pending. Returns whether any do."""
    for part in summary.get("parts", []):
        line = f"part {part['part']}: {part.get('state')} {part.get('flow_run', '')} {part.get('host', '')}".rstrip()
        print(line + (f": {part['reason']}" if part.get("reason") else ""))
    if summary["random_weights"]:
        print(random_weights_note)
    print(next_step)
    if not (summary["pending"] or summary.get("lost_parts")):
        return False
    causes = sorted({p["error"] for p in summary["pending_slides"] if p.get("error")})
    causes += sorted({f"part {p['part']}: {p['reason']}" for p in summary.get("parts", []) if p.get("reason")})
    lost = summary.get("lost_parts") or []
    lost_text = f"; so do the slides that part(s) {', '.join(map(str, lost))} did not finish" if lost else ""
    print(
        f"pathgen {command}: {summary['pending']} slides remain pending (nothing committed for them){lost_text}; "
        f"cause: {'; '.join(causes) or 'a part did not complete'}; run again",
        file=sys.stderr,
    )
    return True


def _export(args: argparse.Namespace) -> int:
    from tasks.captions.export import export_pathgen_json
    from tasks.store.objects import Store

    problem = _out_problem(args.format, args.out)
    if problem:  # before reading the store: a wrong --out is told at once
        print(f"pathgen export: {problem}", file=sys.stderr)
        return EXIT_USAGE
    settings = load_settings(args.config, overrides_of(args))
    if args.format == "webdataset":
        from pathgen.clip_cli import export_webdataset

        return export_webdataset(args, settings)
    if args.format == "llava":
        from pathgen.instruct_cli import export_llava

        return export_llava(args, settings)
    if args.format == "features":
        from pathgen.features_cli import export_features

        return export_features(args, settings)
    try:
        store = Store(settings.store, settings.s3)
        count = export_pathgen_json(store, args.out, args.agents_hash, settings.export.reviews)
    except ValueError as exc:
        print(f"pathgen export: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(f"wrote {count} records to {args.out}")
    from tasks.captions.export import provenance_path
    from tasks.reviews.report import review_line

    side = json.loads(provenance_path(args.out).read_text())
    print(f"provenance: {provenance_path(args.out)}")
    print(review_line(side["reviews"]))
    if side["random_weights"]:
        print(f"RANDOM WEIGHTS: {side['random_weight_records']} of {count} records were captioned by random-weight "
              "models; their captions are noise")  # fmt: skip
    return EXIT_OK if count else EXIT_NONE_SUCCEEDED


def _out_problem(fmt: str, out: str) -> str | None:
    """Why ``--out`` cannot be written: pathgen-json writes a file into a folder that must exist; webdataset writes a
    folder, created when missing, so only an existing file in its place is wrong."""
    from pathlib import Path

    path = Path(out).expanduser()
    if fmt in ("webdataset", "llava", "features"):
        if path.exists() and not path.is_dir():
            return f"--out {out} is a file; {fmt} writes a folder: choose a folder"
        return None
    if path.is_dir():
        return f"--out {out} is a folder; pathgen-json writes one file: choose a file name, e.g. {path / 'pairs.json'}"
    parent = path.absolute().parent
    if not parent.exists():
        return f"folder {parent} does not exist; create it or choose another --out"
    if not parent.is_dir():
        return f"{parent} is not a folder; choose another --out"
    return None


def _print_summary(summary: dict) -> None:
    store = summary["store"]
    print(
        f"\nextracted {summary['slides']} slides: {summary['ok']} ok, {summary['skipped']} already done, "
        f"{summary['failed']} failed, {summary['pending']} pending; {summary['patches']} patches"
    )
    print(f"store: {store}")
    print(f"  patch shards:  {store}/patches/<slide_id>.parquet")
    print(f"  per slide:     {store}/slides/<slide_id>/slide.json and thumbnail.png")
    if summary.get("selection") == "representative":
        print(f"  selection:     {store}/slides/<slide_id>/selection.png")
    if summary.get("random_weights"):
        print("  RANDOM WEIGHTS: the selection model has no pretrained weights (or was trained from random), so")
        print("  its picks are noise; set embedding.model and embedding.pretrained for a real selection")
    for failed in summary["failed_slides"]:
        print(f"failed: {failed['slide_id']}: {failed['error']}")
    for pending in summary["pending_slides"]:
        print(f"pending (storage failed; run again): {pending['slide_id']}: {pending['error']}")
    print(f"look at them:  pathgen inspect {store}")
