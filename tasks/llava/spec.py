"""Which models a PathGen-LLaVA run uses, what identifies them in the run's name, and the guard that refuses
random-weight ones where ``models.allow_random_weights`` is false.

The vision tower comes from ``llava.vision`` (resolved by the flow: unset, the newest PathGen-CLIP checkpoint in the
store, else tiny-random); the language model from ``llava.language_model`` (unset: the tiny random-weight LM).
"""

from __future__ import annotations

from pathlib import Path

from pathgen.settings import Settings
from tasks.llava.vision import VisionSource
from tasks.models import RandomWeightsRefused


def model_identity(text: str | None, tiny: str) -> str:
    """A model as it changes training: a local file or folder by content, a hub id or open_clip tag by name."""
    from pathgen.digest import path_digest
    from tasks.clip.spec import local_checkpoint, parse_model_spec

    if not text:
        return tiny
    local = text.removeprefix("local-dir:")
    if "://" in text or text.lower().endswith((".pt", ".pth", ".bin", ".safetensors")):
        local = local_checkpoint(parse_model_spec(text).pretrained) or text
    if Path(local).exists():
        return f"{Path(local).name}:{path_digest(local)}"
    return text


def random_llava_models(settings: Settings, vision: VisionSource) -> list[str]:
    """One line per model of the run that would have random weights, naming the setting that chooses it."""
    from agents.backends import folder_random_weights

    found = []
    if vision.random_weights and settings.llava.vision:
        found.append(f"llava.vision {vision.label} has no trained weights")
    elif vision.random_weights:
        found.append("llava.vision is unset and the store holds no PathGen-CLIP checkpoint (tiny-random tower)")
    model = settings.llava.language_model
    if model is None:
        found.append("llava.language_model is unset (the tiny random-weight LM)")
    elif reason := folder_random_weights(model):
        found.append(f"llava.language_model {model}: {reason}")
    return found


def require_real_llava(settings: Settings, vision: VisionSource) -> None:
    """Refuse random-weight parts before any work when ``models.allow_random_weights`` is false."""
    if settings.models.allow_random_weights:
        return
    found = random_llava_models(settings, vision)
    if found:
        raise RandomWeightsRefused(
            "models.allow_random_weights is false and PathGen-LLaVA would use random weights: " + "; ".join(found)
        )
