"""Whether a model folder holds trained weights: the weight files transformers and vLLM load, and the tiny models'
random-weights marker."""

from __future__ import annotations

import json
from pathlib import Path

from agents.tiny import RANDOM_MARKER

# What transformers and vLLM load weights from; a folder with none of these has nothing but a config to build from.
WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack", "*.gguf")
NOT_WEIGHTS = {"training_args.bin"}


def has_weight_files(folder: str | Path) -> bool:
    """Whether a model folder holds any weight file (top level, where from_pretrained looks)."""
    folder = Path(folder).expanduser()
    return any(f.name not in NOT_WEIGHTS for pattern in WEIGHT_FILES for f in folder.glob(pattern))


def folder_random_weights(model_id: str) -> str | None:
    """Why a local model folder is random weights (None: it is not, or it is not a local folder)."""
    folder = Path(model_id).expanduser()
    if not folder.is_dir():
        return None
    config = folder / "config.json"
    if config.is_file():
        try:
            if json.loads(config.read_text()).get(RANDOM_MARKER):
                return f"its config.json says it was built with random weights ({RANDOM_MARKER})"
        except (ValueError, OSError):
            pass
    if not has_weight_files(folder):
        return "its folder has no weight files (" + ", ".join(WEIGHT_FILES) + "): nothing but a config to build from"
    return None
