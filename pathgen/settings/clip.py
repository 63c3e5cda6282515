"""Settings of PathGen-CLIP training."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pathgen.settings.base import (
    MAX_SEED,
    ModelName,
    Section,
    SettingsError,
    multiples_near,
)


class PairSetSettings(Section):
    """One stage's training pairs: generated pairs of an agents_hash in the store, or an external folder of images
    with a CSV/JSONL of captions (how users bring Quilt-1M or ARCH)."""

    agents_hash: str | None = Field(
        None, description="pairs/<agents_hash>/ in the store; unset: the only agents_hash there (an error if several)"
    )
    folder: str | None = Field(None, description="external set: a local folder of images (instead of agents_hash)")
    captions: str | None = Field(
        None, description="external set: CSV or JSONL beside the images with an image path and a caption per row"
    )
    image_key: str = Field("image", description="column of the captions file naming the image, relative to folder")
    caption_key: str = Field("caption", description="column of the captions file holding the caption")
    epochs: int = Field(1, ge=1, le=1000)

    @property
    def external(self) -> bool:
        return self.folder is not None


class ClipSettings(Section):
    """PathGen-CLIP training with open_clip's own trainer (open_clip_train)."""

    model: ModelName = Field(
        None,
        description="open_clip model name; unset: ViT-B-16 with clip.pretrained, else the tiny-random model. Named "
        "without clip.pretrained, that architecture trains from random initialisation (RANDOM WEIGHTS). A tag "
        "trained with QuickGELU (openai) trains the name's -quickgelu twin (ViT-B-16-quickgelu)",
    )
    pretrained: ModelName = Field(
        None, description="open_clip pretrained tag (openai) or checkpoint path; unset trains from random weights"
    )
    run: str | None = Field(None, description="run name under models/clip/; unset: a hash of the training inputs")
    lr: float = Field(3e-5, gt=0.0, le=1.0)
    weight_decay: float = Field(0.1, ge=0.0, le=10.0)
    batch_size: int = Field(
        384,
        ge=2,
        le=65536,
        description="global batch: pairs per optimizer step over all clip.devices (the paper's 384); each device "
        "takes batch_size / devices, which must divide; lowered to the pairs available",
    )
    warmup: int = Field(100, ge=0, le=10_000_000, description="warmup steps of the cosine schedule")
    precision: str = Field("auto", pattern=r"^(auto|amp|amp_bf16|bf16|fp16|fp32)$", description="auto: amp on GPU")
    grad_checkpointing: bool = False
    devices: int = Field(1, ge=1, le=64, description="GPUs; more than one runs torchrun --nproc-per-node")
    launcher: Literal["auto", "in-process", "torchrun"] = Field(
        "auto", description="auto: the trainer in this process for one device, under torchrun for more"
    )
    workers: int = Field(
        4, ge=0, le=64, description="data loader workers per device; lowered so each worker's tars fill a batch"
    )
    seed: int = Field(0, ge=0, le=MAX_SEED)
    pairs_per_tar: int = Field(1000, ge=1, le=1_000_000, description="external sets: pairs per exported tar")
    work_dir: str | None = Field(
        None, description="local folder for exported tars and trainer logs; unset: ~/.cache/pathgen/clip"
    )
    holdout_fraction: float = Field(
        0.05, ge=0.0, lt=1.0, description="cases (TCGA barcode) or slides held out whole, for retrieval evaluation"
    )
    stage1: PairSetSettings = Field(default_factory=PairSetSettings)
    stage2: PairSetSettings | None = Field(None, description="optional second stage, e.g. curated or external pairs")
    evaluate: list[dict[str, str]] = Field(
        default_factory=list,
        description="after each stage: [{dataset: DIR, classes: FILE} (one folder per class) or {dataset: DIR[, "
        "format: NAME]} (a dataset as downloaded)] to evaluate on",
    )

    @model_validator(mode="after")
    def _batch_divides(self) -> ClipSettings:
        clip_batch_per_device(self.batch_size, self.devices)  # one that does not divide fails here, before any work
        return self


def clip_batch_per_device(batch_size: int, devices: int) -> int:
    """The batch each device trains on: the global ``clip.batch_size`` shared evenly by ``clip.devices``."""
    if batch_size % devices:
        raise SettingsError(
            f"clip.batch_size {batch_size} is the global batch, shared evenly by clip.devices {devices}: set it to a "
            f"multiple of {devices} ({multiples_near(batch_size, devices)}) or change clip.devices"
        )
    return batch_size // devices
