"""``torchrun ... -m tasks.clip.trainer_entry <open_clip_train args>``: the trainer with our model configs registered
(registration does not survive into the processes torchrun starts)."""

from __future__ import annotations

import sys


def main() -> int:
    from open_clip_train.main import main as train

    from tasks.selection.embedding import _register_configs

    _register_configs()
    status = train(sys.argv[1:])
    return 0 if status in (None, 0) else 1


if __name__ == "__main__":
    sys.exit(main())
