"""Settings of the slide stages: patch geometry, tissue detection, quality, patch selection and its embedding, the
slide records and extraction."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator

from pathgen.settings.base import (
    MAX_SEED,
    MAX_SLIDE_MPP,
    MIN_TARGET_MPP,
    ModelName,
    Section,
)


class PatchSettings(Section):
    target_mpp: float = Field(
        0.5,
        ge=MIN_TARGET_MPP,
        le=64.0,
        description="microns per pixel of the saved patches; at least 0.05: scanners stop near 0.1 µm/px, a finer "
        "target only upsamples and multiplies the grid (and the time) by (0.5 / target_mpp)²",
    )
    patch_px: int = Field(672, ge=32, le=4096, description="side of a saved patch in pixels")
    jpeg_quality: int = Field(90, ge=50, le=100)
    positions_box_px: int = Field(
        672,
        ge=16,
        le=8192,
        description="level-0 side of the boxes named by a PathGen JSON source (the paper read 672 px)",
    )
    positions_resample: bool = Field(
        False,
        description="resample the level-0 boxes of a PathGen JSON source to patch_px (mpp = slide MPP x "
        "positions_box_px / patch_px); off keeps them as the level-0 pixels, positions_box_px wide",
    )


class TissueSettings(Section):
    threshold: float = Field(0.5, ge=0.0, le=1.0, description="minimum tissue fraction of a grid cell")
    mask_downsample: float = Field(32.0, ge=1.0, le=1024.0, description="mask resolution relative to level 0")
    min_saturation: int = Field(
        20, ge=0, le=255, description="Otsu's threshold never goes below this (plain glass has only noise)"
    )
    median_px: int = Field(7, ge=1, le=255, description="median blur kernel on the mask image (odd)")
    closing_px: int = Field(5, ge=1, le=255, description="morphological closing kernel on the mask")
    min_area_um2: float = Field(50_000.0, ge=0.0, le=1e10, description="tissue pieces smaller than this are dropped")
    min_background_value: int = Field(
        150,
        ge=0,
        le=255,
        description="bright-field glass is bright: a slide whose background is darker is not bright-field",
    )

    @field_validator("median_px")
    @classmethod
    def _odd(cls, value: int) -> int:
        if value % 2 == 0:
            raise ValueError("must be odd (a median kernel has a centre)")
        return value


class QualitySettings(Section):
    enabled: bool = True
    analysis_px: int = Field(224, ge=32, le=4096, description="patches are scored at this size to keep scoring cheap")
    max_background_fraction: float = Field(0.6, ge=0.0, le=1.0)
    min_sharpness: float = Field(
        25.0, ge=0.0, le=1e6, description="minimum variance of the Laplacian (at analysis_px); lower is blurred"
    )
    max_pen_fraction: float = Field(0.05, ge=0.0, le=1.0, description="maximum share of pen-mark coloured pixels")


class SelectionSettings(Section):
    method: Literal["representative", "random", "all"] = Field(
        "representative", description="representative (CLIP clusters + prompt retrieval), seeded random, or all"
    )
    max_per_slide: int = Field(256, ge=1, le=100_000, description="cap on patches kept per slide")
    seed: int = Field(0, ge=0, le=MAX_SEED)
    clusters: int | None = Field(None, ge=1, le=100_000, description="fixed k for k-means; unset uses the paper's rule")
    cluster_rule_factor: float = Field(
        1.6, gt=0.0, le=1000.0, description="k = ceil(sqrt(factor * N / 128)) for N candidates (PathGen-1.6M)"
    )
    retrieval_top_k: int = Field(
        16, ge=0, le=100_000, description="K: top patches by attribute prompts, and by findings"
    )
    prompts_file: str | None = Field(None, description="YAML of extra or replacement attribute prompts per project")
    findings_file: str | None = Field(None, description="JSON map slide_id -> report finding sentences")
    duplicate_threshold: float = Field(
        0.88, gt=0.0, le=1.0, description="a patch this similar (cosine) to a kept one is dropped"
    )


class EmbeddingSettings(Section):
    model: ModelName = Field(None, description="open_clip model name; unset builds the tiny-random model")
    pretrained: ModelName = Field(None, description="open_clip pretrained tag or a local checkpoint path")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$")
    batch_size: int = Field(64, ge=1, le=4096)


class SlideSettings(Section):
    default_mpp: float | None = Field(
        None,
        gt=0.0,
        le=MAX_SLIDE_MPP,
        description="MPP assumed for slides that carry none; unset means such slides fail",
    )
    mpp_overrides: dict[str, Annotated[float, Field(gt=0.0, le=MAX_SLIDE_MPP)]] = Field(
        default_factory=dict, description="slide_id (or file name) -> MPP, wins over the slide's own metadata"
    )
    project: str | None = Field(
        None,
        description="TCGA project of every slide not in slides.projects (e.g. TCGA-BRCA), over the source's GDC "
        "metadata and the slide's barcode (tasks/slides/projects.py)",
    )
    projects: dict[str, str] = Field(default_factory=dict, description="slide_id -> TCGA project")
    roots: list[str] = Field(
        default_factory=list,
        description="folders or URLs searched for slides named by a GDC manifest or a PathGen JSON file",
    )
    verify_md5_remote: bool = Field(
        False, description="check a GDC manifest's md5 for remote slides too (reads each object once more)"
    )


class ExtractSettings(Section):
    concurrency: int = Field(2, ge=1, le=256, description="slide groups processed at once")
    group_size: int = Field(4, ge=1, le=10_000, description="slides per Prefect task")
    thumbnail_px: int = Field(1024, ge=64, le=16384, description="longest side of thumbnail.png")
    read_ahead: int = Field(
        4, ge=0, le=64, description="patches one reader thread decodes ahead while the worker encodes (0: off)"
    )
