"""Per-patch quality scores and the filter that uses them.

Scores are computed on a small copy of the patch (``analysis_px``) so that scoring costs a fraction of
decoding and encoding: background (bright, unsaturated pixels), sharpness (variance of the Laplacian) and pen marks
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
        # Nearest-neighbour subsampling keeps scoring far cheaper than decoding; scores are relative anyway.
        rgb = cv2.resize(rgb, (analysis_px, analysis_px), interpolation=cv2.INTER_NEAREST)
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    pixels = float(rgb.shape[0] * rgb.shape[1])
    # cv2.inRange over HSV is an order of magnitude cheaper than the same tests as numpy boolean algebra.
    background = cv2.countNonZero(cv2.inRange(hsv, (0, 0, 211), (180, 24, 255))) / pixels
    # OpenCV hue runs 0-180: green ink 35-85, blue ink 95-125 (deeper and more saturated than hematoxylin),
    # black ink is very dark whatever its hue.
    pen_mask = cv2.inRange(hsv, (35, 61, 41), (85, 255, 255))
    pen_mask |= cv2.inRange(hsv, (95, 121, 0), (125, 255, 199))
    pen_mask |= cv2.inRange(hsv, (0, 0, 0), (180, 255, 34))
    pen = cv2.countNonZero(pen_mask) / pixels
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    _, std = cv2.meanStdDev(cv2.Laplacian(gray, cv2.CV_32F))
    sharpness = float(std[0, 0]) ** 2
    return QualityScores(
        background_fraction=round(background, 4),
        sharpness=round(sharpness, 2),
        pen_fraction=round(pen, 4),
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
