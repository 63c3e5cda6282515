"""The ``pathgen`` command (``python -m pathgen``): one module per command group, each adding its subcommands with
``register(commands)`` (pathgen/cli/args.py); pathgen/cli/app.py builds the parser from them and runs the command.

Exit codes: ``extract``: 0 when at least one slide succeeded, 1 when none did; ``caption``: 0 when every slide is
captioned, 1 when slides remain pending or the store holds no patch shards (the cause is named); 2 for bad usage or
settings (a missing local SOURCE, an ``--out`` in a missing folder); 1 for an unexpected error, told in one line
(``pathgen --debug ...`` shows its traceback).
"""

from pathgen.processes import prefect_offline_defaults

prefect_offline_defaults()  # before Prefect is imported: no telemetry notice, no usage data

from pathgen.cli.app import main  # noqa: E402

__all__ = ["main"]
