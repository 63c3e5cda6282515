"""The features hash: what makes every vector under ``features/<features_hash>/`` what it is, and nothing else.

It covers the encoder (its open_clip name and the content digest of its weights: a checkpoint overwritten at the same
path changes it, the same bytes elsewhere do not), the patch scale (``features.target_mpp``; the side is the
encoder's input size), the tissue mask, the quality filters, ``slides.default_mpp`` and the feature format (which
includes how vectors are stored: the raw ``encode_image`` output, not L2-normalised). Batch size, device, prefetch
and concurrency change how fast, never what. Nothing of one slide enters it: a slide's own inputs (its source
identity and MPP override) sit in its file's metadata, which decides when that slide alone is redone.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pathgen.settings import Settings
from tasks.features.store import FORMAT

# Bump when the same settings and encoder would give other vectors (preprocessing, reading, what is stored).
# Stored as encode_image returns them: attention MIL (CLAM, ABMIL, ACMIL) trains on unnormalised features, and a
# vector's norm is information that normalising would destroy (a consumer can still normalise; it cannot undo it).
L2_NORMALISED = False


def hash_inputs(settings: Settings, identity: dict[str, Any]) -> dict[str, Any]:
    """The settings and encoder fields the hash covers (also written to ``features.json``)."""
    return {
        "format": FORMAT,
        "l2_normalised": L2_NORMALISED,
        "encoder": {key: identity.get(key) for key in ("name", "digest", "image_size", "dim")},
        "target_mpp": settings.features.target_mpp,
        "tissue": settings.tissue.model_dump(mode="json"),
        "quality": settings.quality.model_dump(mode="json"),
        "default_mpp": settings.slides.default_mpp,
    }


def features_hash(settings: Settings, identity: dict[str, Any]) -> str:
    """16 hex digits of sha256 over :func:`hash_inputs`."""
    text = json.dumps(hash_inputs(settings, identity), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
