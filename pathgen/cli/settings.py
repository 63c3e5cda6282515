"""``pathgen settings``: the effective settings (defaults, --config, environment, --set) as YAML."""

from __future__ import annotations

import argparse

from pathgen.cli.args import EXIT_OK, Commands, settings_args
from pathgen.settings import load_settings, parse_assignments


def register(commands: Commands) -> None:
    settings = commands.add("settings", print_settings, help="print the effective settings as YAML")
    settings_args(settings)


def print_settings(args: argparse.Namespace) -> int:
    import yaml

    settings = load_settings(args.config, parse_assignments(args.assignments))
    print(yaml.safe_dump(settings.model_dump(), sort_keys=False), end="")
    return EXIT_OK
