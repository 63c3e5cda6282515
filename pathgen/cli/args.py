"""What every command shares: the one way a command module registers its subcommands (``register(commands)``), the
common arguments (``--config``/``--set``, ``--store``, ``--parts``), the exit codes, and the settings overrides a
command hands its flow."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any, Protocol

from pathgen.errors import without_userinfo
from pathgen.settings import load_settings, parse_assignments

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
STORE_HELP = "store root URL (default: settings.store, file://./store)"
DEBUG_HELP = "on an unexpected error print its traceback, not just its one-line reason"

Handler = Callable[[argparse.Namespace], int]


class Commands:
    """The registry of subcommands: ``add`` makes a subcommand's parser (which also takes ``--debug`` after the
    subcommand) and binds the handler ``main`` calls with the parsed arguments; it returns an exit code."""

    def __init__(self, parser: argparse.ArgumentParser) -> None:
        # SUPPRESS keeps a subcommand without --debug from resetting the global flag.
        self.common = argparse.ArgumentParser(add_help=False)
        self.common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
        self.subparsers = parser.add_subparsers(dest="command", required=True)

    def add(self, name: str, handler: Handler, **parser_options: Any) -> argparse.ArgumentParser:
        command = self.subparsers.add_parser(name, parents=[self.common], **parser_options)
        command.set_defaults(handler=handler)
        return command


class CommandGroup(Protocol):
    """A module of pathgen/cli/: one command group, added to the parser by ``register``."""

    def register(self, commands: Commands) -> None: ...


def settings_args(parser: argparse.ArgumentParser) -> None:
    """``--config FILE[#VARIANT]`` and repeatable ``--set KEY=VALUE``."""
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


def store_arg(parser: argparse.ArgumentParser, help: str = STORE_HELP) -> None:
    """``--store URL``: the store a command reads and writes; unset, settings.store (as for every command)."""
    parser.add_argument("--store", metavar="URL", help=help)


def parts_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--parts",
        type=int,
        default=1,
        metavar="N",
        help="split the slides into N parts by a stable hash of the slide id (as a deployment, one child run each)",
    )


def overrides_of(args: argparse.Namespace) -> dict:
    """``--set`` and ``--store`` as settings overrides, checked before Prefect starts (a bad setting fails here);
    credentials in URLs moved to the environment."""
    overrides = assignments_of(args)
    load_settings(args.config, overrides)
    return credentials_to_environment(overrides)


def assignments_of(args: argparse.Namespace) -> dict:
    """``--set`` and ``--store`` as settings overrides, unchecked."""
    overrides = parse_assignments(args.assignments)
    if args.store:
        overrides["store"] = args.store
    return overrides


def credentials_to_environment(overrides: dict) -> dict:
    """A URL with credentials in it (``https://user:secret@host``) goes to this process's environment, where the
    settings read it, instead of into the flow run's parameters, which Prefect stores and shows in its UI."""
    kept = {}
    for key, value in overrides.items():
        if isinstance(value, str) and without_userinfo(value) != value:
            os.environ["PATHGEN_" + key.upper().replace(".", "__")] = value
        else:
            kept[key] = value
    return kept
