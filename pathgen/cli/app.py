"""The ``pathgen`` parser, built from the command modules in help order, and ``main``: parse, run the chosen
command's handler, turn errors into the documented exit codes."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pathgen.cli import (
    benchmark,
    caption,
    clip,
    export,
    extract,
    factory,
    features,
    inspect,
    instruct,
    llava,
    mc,
    mil,
    serve,
    settings,
)
from pathgen.cli.args import DEBUG_HELP, EXIT_FAILED, EXIT_USAGE, CommandGroup, Commands
from pathgen.errors import cut
from pathgen.local_api import lost_api_explanation, name_command
from pathgen.processes import bound_threads
from pathgen.settings import SettingsError

# The command groups in the order `pathgen --help` lists their commands.
COMMAND_GROUPS: tuple[CommandGroup, ...] = (
    extract,
    caption,
    export,
    clip,
    inspect,
    factory,
    mc,
    instruct,
    llava,
    mil,
    features,
    benchmark,
    serve,
    settings,
)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="pathgen", description="PathGen Factory: slides to image-text pairs.")
    top.add_argument("--debug", action="store_true", help=DEBUG_HELP)  # also after the subcommand (Commands)
    commands = Commands(top)
    for group in COMMAND_GROUPS:
        group.register(commands)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    name_command(f"pathgen {args.command}")  # how a lost Prefect API is told (pathgen/local_api.py)
    bound_threads()  # one thread budget for torch/OpenMP/BLAS/OpenCV here and, via the environment, in children
    if getattr(args, "parts", 1) < 1:
        print(f"pathgen {args.command}: --parts must be at least 1 (got {args.parts})", file=sys.stderr)
        return EXIT_USAGE
    try:
        return args.handler(args)
    except SettingsError as exc:
        print(f"pathgen: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:
        if args.debug:
            raise
        return unexpected_error(args.command, exc)


def unexpected_error(command: str, exc: Exception) -> int:
    """One line on stderr: a lost Prefect API told as such, anything else by its type and (cut) reason."""
    lost = lost_api_explanation(exc)
    if lost:
        print(lost, file=sys.stderr)
        return EXIT_FAILED
    reason = cut(" ".join(str(exc).split()), 300)
    print(f"pathgen {command}: {type(exc).__name__}: {reason} (run with --debug for the traceback)", file=sys.stderr)
    return EXIT_FAILED
