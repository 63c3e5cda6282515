"""``torchrun ... -m tasks.clip.trainer_entry --args-file FILE``: open_clip_train with our model configs registered
(registration does not survive into the processes torchrun starts); FILE is a JSON list of the trainer's arguments."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path


def _progress_on_the_terminal(trainer) -> None:
    """open_clip's logging, with its console handler passing only progress lines: the model dump and the parameter
    list (about 110 lines) go to out.log alone, as in the in-process trainer."""
    from tasks.clip.train import TrainerProgressOnly

    original = trainer.setup_logging

    def setup_logging(log_file, level, include_host=False):
        original(log_file, level, include_host)
        for handler in logging.root.handlers:
            if not isinstance(handler, logging.FileHandler):
                handler.addFilter(TrainerProgressOnly())

    trainer.setup_logging = setup_logging


def main() -> int:
    import open_clip_train.main as trainer

    from pathgen.processes import die_with_parent
    from tasks.clip import scalars
    from tasks.clip.spec import register_model_configs

    die_with_parent(pdeathsig=False)  # torchrun's agent gone (killed run): no trainer left holding a GPU

    register_model_configs()
    _progress_on_the_terminal(trainer)
    scalars.install(trainer)  # the metrics pathgen reads
    args = sys.argv[1:]
    if args[:1] == ["--args-file"]:
        args = json.loads(Path(args[1]).read_text())
    status = trainer.main(args)
    return 0 if status in (None, 0) else 1


if __name__ == "__main__":
    sys.exit(main())
