"""``torchrun ... -m tasks.clip.trainer_entry --args-file FILE``: open_clip_train with our model configs registered
(registration does not survive into the processes torchrun starts); FILE is a JSON list of the trainer's arguments."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main() -> int:
    from open_clip_train.main import main as train

    from pathgen.processes import die_with_parent
    from tasks.selection.embedding import _register_configs

    die_with_parent(pdeathsig=False)  # torchrun's agent gone (killed run): no trainer left holding a GPU

    _register_configs()
    args = sys.argv[1:]
    if args[:1] == ["--args-file"]:
        args = json.loads(Path(args[1]).read_text())
    status = train(args)
    return 0 if status in (None, 0) else 1


if __name__ == "__main__":
    sys.exit(main())
