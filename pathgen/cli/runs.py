"""Running a stage's flow from a command: the checks before Prefect starts, the run on the shared local API, and
what a run left pending."""

from __future__ import annotations

import argparse
import glob
import os
import sys
from collections.abc import Callable
from typing import Any

from pathgen.cli.args import EXIT_FAILED, EXIT_OK, EXIT_USAGE, assignments_of, credentials_to_environment
from pathgen.local_api import api_server
from pathgen.settings import SettingsError, load_settings

SOURCE_KINDS = "a slide file, a folder, a glob, an s3:// URL, a GDC manifest or a PathGen JSON file"
GLOB_CHARS = "*?["


def source_problem(spec: str) -> str | None:
    """Why a local SOURCE names nothing (it does not exist, or its glob matches no slide file), told before Prefect
    starts; None for a remote URL or a local source that is there (whether it reads is the flow's to find out)."""
    from tasks.slides.sources import is_slide_name
    from tasks.store.objects import is_remote, local_path

    spec = str(spec)
    if is_remote(spec):
        return None
    if any(ch in spec for ch in GLOB_CHARS):
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


def sources_problem(sources: list[str]) -> str | None:
    """The first local SOURCE that names nothing: a usage error, so nothing starts and nothing is written for it."""
    return next(filter(None, map(source_problem, sources)), None)


def run_slide_flow(
    command: str,
    args: argparse.Namespace,
    load_flow: Callable[[], Any],
    print_summary: Callable[[dict], None],
    **parameters: Any,
) -> int:
    """A flow over SOURCE... (extract, features): settings and sources checked before the flow (and Prefect with it)
    is loaded, the flow run on the shared local API when none is configured, its summary printed; exit 0, 1 (no
    slide succeeded) or 2."""
    overrides = assignments_of(args)
    settings = load_settings(args.config, overrides)  # fails here, before Prefect starts, on a bad setting
    sources = args.sources or settings.sources
    if not sources:
        print(f"pathgen {command}: name at least one SOURCE (or set `sources` in the config)", file=sys.stderr)
        return EXIT_USAGE
    problem = sources_problem(sources)
    if problem:
        print(f"pathgen {command}: {problem}", file=sys.stderr)
        return EXIT_USAGE
    flow = load_flow()
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

        return EXIT_USAGE if isinstance(error, SettingsError | SourceError) else EXIT_FAILED
    print_summary(state.result())
    return EXIT_OK


def run_stage_flow(command: str, flow: Any, args: argparse.Namespace, overrides: dict) -> dict | None:
    """Run a slide stage's flow; its summary, or None (the reason told on stderr) when the run did not complete."""
    with api_server():  # no API configured: the shared local server (pathgen/local_api.py)
        state = flow(config=args.config, overrides=overrides, parts=args.parts, return_state=True)
    if not state.is_completed():
        print(f"pathgen {command}: {state.result(raise_on_failure=False)}", file=sys.stderr)
        print(f"pathgen {command}: nothing was committed for the slides still pending; run again", file=sys.stderr)
        return None
    return state.result()


def run_training_flow(
    command: str,
    run: Callable[[], Any],
    print_summary: Callable[[dict], None],
    usage_errors: tuple[type[BaseException], ...] = (),
) -> int:
    """Run a training flow (``run`` starts it and returns its final state) beside the local API, print its summary,
    then its error on stderr; the exit code. A run that did not complete fails with its reason (a usage error when
    it is one of ``usage_errors``)."""
    with api_server():  # no API configured: the shared local server (pathgen/local_api.py)
        state = run()
    if not state.is_completed():
        error = state.result(raise_on_failure=False)
        print(f"pathgen {command}: {error}", file=sys.stderr)
        return EXIT_USAGE if isinstance(error, usage_errors) else EXIT_FAILED
    summary = state.result()
    print_summary(summary)
    if summary["error"]:
        print(f"pathgen {command}: {summary['error']}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


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
