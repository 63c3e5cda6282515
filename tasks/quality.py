"""Per-patch quality scores and the filter that uses them.

Scores are computed on a small copy of the patch (``analysis_px``) so that scoring costs a fraction of decoding
and encoding: background (bright, unsaturated pixels), sharpness (variance of the Laplacian) and pen marks
(saturated green, blue or black ink, colours that H&E does not produce).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from pathgen.settings import QualitySettings


@dataclass(frozen=True)
class QualityScores:
    background_fraction: float
    sharpness: float
    pen_fraction: float


def score_patch(rgb: np.ndarray, analysis_px: int) -> QualityScores:
    if max(rgb.shape[:2]) > analysis_px:
        rgb = cv2.resize(rgb, (analysis_px, analysis_px), interpolation=cv2.INTER_AREA)
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    hue, sat, val = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    background = (val > 210) & (sat < 25)
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    sharpness = float(cv2.Laplacian(gray, cv2.CV_32F).var())
    # OpenCV hue runs 0-180: green ink 35-85, blue ink 95-125 (deeper and more saturated than hematoxylin),
    # black ink is very dark whatever its hue.
    green = (hue >= 35) & (hue <= 85) & (sat > 60) & (val > 40)
    blue = (hue >= 95) & (hue <= 125) & (sat > 120) & (val < 200)
    black = val < 35
    pen = green | blue | black
    return QualityScores(
        background_fraction=round(float(background.mean()), 4),
        sharpness=round(sharpness, 2),
        pen_fraction=round(float(pen.mean()), 4),
    )


def rejection_reason(scores: QualityScores, cfg: QualitySettings) -> str | None:
    """Why a patch fails the filters, or None when it passes."""
    if not cfg.enabled:
        return None
    if scores.background_fraction > cfg.max_background_fraction:
        return "background"
    if scores.pen_fraction > cfg.max_pen_fraction:
        return "pen"
    if scores.sharpness < cfg.min_sharpness:
        return "blur"
    return None
