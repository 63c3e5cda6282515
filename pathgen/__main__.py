import sys

from pathgen.processes import prefect_offline_defaults

prefect_offline_defaults()  # before Prefect is imported: no telemetry notice, no usage data

from pathgen.cli import main  # noqa: E402

sys.exit(main())
