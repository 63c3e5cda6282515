"""``python -m tasks.llava.train_entry --plan FILE``: one process of a torchrun-launched LLaVA stage.

The plan travels in a file, written by :func:`tasks.llava.stages.launch`; every process reads the same one.
"""

from __future__ import annotations

import argparse
import json
import logging
import os

from tasks.llava.plan import TrainPlan
from tasks.llava.train import run_training


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--plan", required=True)
    args = parser.parse_args(argv)
    level = logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING  # one voice, not one per device
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s")
    with open(args.plan) as handle:
        plan = TrainPlan(**json.load(handle))
    run_training(plan, logging.getLogger("pathgen.llava"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
