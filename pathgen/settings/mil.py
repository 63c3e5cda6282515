"""Settings of attention-MIL training (train-mil)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from pathgen.settings.base import (
    Section,
)


class MilSettings(Section):
    task: str | None = Field(None, description="task CSV (slide_id,label[,case_id][,split]) of the factory's train-mil")
    model: Literal["abmil", "acmil", "mean"] = Field("abmil", description="attention MIL model of train-mil")
    features: str | None = Field(
        None, description="features_hash in the store or a CLAM/TRIDENT h5 folder; unset: these settings' features"
    )
    epochs: int = Field(50, ge=1, le=10_000)
    learning_rates: list[float] = Field(
        default_factory=lambda: [1e-4, 2e-4, 5e-4], description="grid, chosen on the validation split"
    )
    weight_decay: float = Field(1e-4, ge=0.0, le=10.0, description="Adam weight decay")
    seeds: int = Field(3, ge=1, le=100, description="repeats with seeds 0..N-1; mean and std reported")
    selection_metric: Literal["auc", "balanced_accuracy"] = Field("auc", description="validation metric for the lr")
    acmil_branches: int = Field(5, ge=1, le=64, description="ACMIL M: attention branches")
    acmil_top_k: int = Field(10, ge=1, le=100_000, description="ACMIL K: top-attended instances that may be masked")
    acmil_mask_prob: float = Field(0.6, ge=0.0, le=1.0, description="ACMIL p: masking probability of the top K")
    heatmaps: bool = Field(True, description="draw eval/mil/<run>/heatmaps/<slide_id>.png for each test slide")
    heatmap_top_k: int = Field(6, ge=1, le=64, description="top-attended patches shown beside the heatmap")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$")
    work_dir: str | None = Field(
        None, description="local folder of MIL runs in training (mirrored to models/mil/); unset: ~/.cache/pathgen/mil"
    )
