"""Settings of the features stage (patch features for MIL)."""

from __future__ import annotations

from pydantic import Field

from pathgen.settings.base import (
    MIN_TARGET_MPP,
    ModelName,
    Section,
)


class FeaturesSettings(Section):
    encoder: ModelName = Field(
        None,
        description="open_clip NAME:PRETRAINED, a PathGen-CLIP run or checkpoint in the store; unset: the newest "
        "PathGen-CLIP in the store, else tiny-random (RANDOM WEIGHTS)",
    )
    target_mpp: float = Field(
        0.5, ge=MIN_TARGET_MPP, le=64.0, description="microns per pixel of the encoded patches (0.5: the paper's 20x)"
    )
    batch_size: int = Field(128, ge=1, le=8192, description="patches per encoder forward pass")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$")
    prefetch_batches: int = Field(
        2, ge=1, le=64, description="batches read and preprocessed ahead while the encoder runs"
    )
    concurrency: int = Field(1, ge=1, le=256, description="slide groups featured at once (one encoder per process)")
    group_size: int = Field(4, ge=1, le=10_000, description="slides per Prefect task")
