"""Which encoder features a slide, what it is (its identity, with a content digest of its weights), and loading it.

A spec is any open_clip ``NAME:PRETRAINED`` (a tag such as ``ViT-B-16:openai``, or a checkpoint path or URL), a
PathGen-CLIP run name in the store (``models/clip/<run>``: its newest stage's last checkpoint), a checkpoint key in
the store, or unset: the newest PathGen-CLIP checkpoint in the store, else ``tiny-random`` (RANDOM WEIGHTS).

The identity names the weights by their bytes (sha256 of the checkpoint, remembered under its path, size and
modification time; an object in S3 is fetched once into the checkpoint cache, keyed by its ETag), so a checkpoint
overwritten at the same path gives another features hash, and a checkpoint moved elsewhere the same one.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pathgen.digest import file_digest, folder_digest
from pathgen.errors import ModelUnavailable, redact_urls, short_error
from tasks.clip.spec import (
    TINY_RANDOM,
    ModelSpec,
    has_random_weights,
    local_checkpoint,
    parse_model_spec,
    register_model_configs,
)
from tasks.clip.stages import RUNS, newest_checkpoint
from tasks.selection.embedding import EmbeddingModel, load_clip_model
from tasks.store.objects import Store

log = logging.getLogger("pathgen.features")
RUN_NAME = re.compile(r"[A-Za-z0-9_.-]+")
RANDOM_WEIGHTS_WARNING = (
    "RANDOM WEIGHTS: slide features come from {model}, which has no pretrained weights (or was trained from random "
    "initialisation); the vectors are noise, and so is any MIL model trained on them; pass --encoder "
    "NAME:PRETRAINED or a PathGen-CLIP checkpoint (features.encoder) for real features"
)


def resolve_encoder_spec(spec: str | None, store: Store) -> str:
    """The encoder to use, as a spec that needs no store to read: unset -> the newest PathGen-CLIP checkpoint in the
    store, else tiny-random; a PathGen-CLIP run name -> its newest stage's last checkpoint; anything else as given."""
    spec = (spec or "").strip()
    if not spec:
        return newest_checkpoint(store) or TINY_RANDOM
    if RUN_NAME.fullmatch(spec) and spec != TINY_RANDOM:
        checkpoint = newest_checkpoint(store, f"{RUNS}/{spec}")
        if checkpoint:
            return checkpoint
    if spec.endswith(".pt") and "://" not in spec and not Path(spec).exists() and store.exists(spec):
        return store.uri(spec)  # a checkpoint key in the store, such as models/clip/<run>/<stage>/checkpoints/x.pt
    return spec


def _weights_digest(spec: ModelSpec) -> str:
    """What the weights are: sha256 of a checkpoint's (or a local-dir folder's) bytes, the tag, or random-init."""
    if spec.name.startswith("local-dir:"):
        return "sha256:" + folder_digest(spec.name.removeprefix("local-dir:"))
    if spec.name.startswith("hf-hub:"):
        return spec.name  # the hub names its revision; we cannot read its bytes without fetching them
    if not spec.pretrained:
        return "random-init"
    local = local_checkpoint(spec.pretrained)  # an object is fetched once into the cache keyed by its ETag
    if local and Path(local).is_file():
        return "sha256:" + file_digest(local)
    if local and ("/" in local or Path(local).suffix):
        raise FileNotFoundError(f"checkpoint {local} of {spec.name} does not exist")
    return f"open_clip:{spec.pretrained}"


def _model_config(spec: ModelSpec) -> dict[str, Any] | None:
    """open_clip's config of the model (image size and output dimension) without building it."""
    import open_clip

    register_model_configs()
    if spec.name.startswith("local-dir:"):
        path = Path(spec.name.removeprefix("local-dir:")) / "open_clip_config.json"
        return json.loads(path.read_text()).get("model_cfg") if path.is_file() else None
    return open_clip.get_model_config(spec.name)


def _shape(spec: ModelSpec) -> tuple[int, int]:
    """(input side in px, output dimension) of the encoder, from its config, else from the loaded model."""
    config = _model_config(spec)
    if config and "embed_dim" in config and "image_size" in config.get("vision_cfg", {}):
        size = config["vision_cfg"]["image_size"]
        return int(size[0] if isinstance(size, list | tuple) else size), int(config["embed_dim"])
    model = load_clip_model(spec, "cpu")
    return model.image_size, _output_dim(model)


def _output_dim(model: EmbeddingModel) -> int:
    import torch

    with torch.inference_mode():
        probe = torch.zeros(1, 3, model.image_size, model.image_size, device=model.device)
        return int(model.model.encode_image(probe).shape[-1])


def encoder_identity(spec: str) -> dict[str, Any]:
    """The encoder's identity: spec label, open_clip name, pretrained, content digest, input side, output dimension
    and whether its weights are random. ModelUnavailable when its weights cannot be had (the slides stay pending)."""
    try:
        parsed = parse_model_spec(spec)
        digest = _weights_digest(parsed)
        image_size, dim = _shape(parsed)
    except Exception as exc:  # a missing file, an unreachable store or hub: not the slides' fault
        raise ModelUnavailable(
            redact_urls(
                f"the encoder {spec} could not be resolved ({short_error(exc)}); give an open_clip NAME:PRETRAINED, "
                "an existing checkpoint or a PathGen-CLIP run in the store (--encoder / features.encoder), then run "
                "again: the slides stay pending"
            )
        ) from exc
    return {
        # redact_urls, not without_userinfo: NAME:s3://user:secret@host/x.pt is not a URL itself
        "spec": redact_urls(spec),
        "name": parsed.name,
        "pretrained": redact_urls(parsed.pretrained) if parsed.pretrained else None,
        "digest": digest,
        "image_size": image_size,
        "dim": dim,
        "random_weights": has_random_weights(parsed),
    }


@dataclass(eq=False)
class FeatureEncoder:
    """A loaded encoder and the identity its features are recorded under."""

    identity: dict[str, Any]
    model: EmbeddingModel

    @property
    def image_size(self) -> int:
        return int(self.identity["image_size"])


def load_encoder(spec: str, identity: dict[str, Any], device: str, logger: logging.Logger | None = None):
    """The encoder ``identity`` describes, loaded once per process on ``device``. ModelUnavailable when it cannot be
    loaded, or when its weights are no longer those of ``identity`` (the checkpoint changed during the run)."""
    logger = logger or log
    try:
        now = encoder_identity(spec)
        if now["digest"] != identity["digest"]:
            raise ValueError(f"its weights changed during the run ({identity['digest']} -> {now['digest']})")
        model = load_clip_model(parse_model_spec(spec), device, logger)
    except ModelUnavailable:
        raise
    except Exception as exc:  # hub, network, missing file, device: not the slides' fault
        raise ModelUnavailable(
            redact_urls(
                f"the encoder {identity['spec']} could not be loaded ({short_error(exc)}); make its weights reachable "
                "from this worker, then run again: the slides stay pending"
            )
        ) from exc
    if model.image_size != identity["image_size"]:
        raise ModelUnavailable(
            f"the encoder {identity['spec']} takes {model.image_size} px inputs, not the {identity['image_size']} px "
            "its identity says; run again so that the features hash is computed anew: the slides stay pending"
        )
    if identity["random_weights"]:
        logger.warning(RANDOM_WEIGHTS_WARNING.format(model=identity["spec"]))
    return FeatureEncoder(identity, model)
