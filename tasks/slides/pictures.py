"""Pictures a person checks at a glance: the tissue and kept grid (thumbnail.png) and the selection
(selection.png: kept patches outlined in their cluster's colour, retrieval picks marked with a filled corner).

When the patches were picked with random-weight embeddings (``random_weights``), both pictures get a red
"RANDOM WEIGHTS" band above the slide: the picks they show are noise, and the picture says so where it is looked at.
"""

from __future__ import annotations

import colorsys

import cv2
import numpy as np

from tasks.slides.passes import KeptPatch

BANNER_RGB = (210, 0, 0)
BANNER_TEXT = "RANDOM WEIGHTS"


def _fit(image: np.ndarray, max_px: int) -> tuple[np.ndarray, float]:
    scale = min(1.0, max_px / max(image.shape[:2]))
    if scale < 1.0:
        size = (max(1, int(image.shape[1] * scale)), max(1, int(image.shape[0] * scale)))
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    return image.copy(), scale  # never draw on the caller's array


def random_weights_banner(image: np.ndarray, detail: str = "picks are noise") -> np.ndarray:
    """The RGB image with a red band reading RANDOM WEIGHTS (and ``detail`` where it fits) added above it."""
    width = image.shape[1]
    band = max(14, min(36, width // 10))
    banner = np.empty((band, width, 3), np.uint8)
    banner[:] = BANNER_RGB
    font, thickness = cv2.FONT_HERSHEY_SIMPLEX, 1
    for text in (f"{BANNER_TEXT}: {detail}" if detail else BANNER_TEXT, BANNER_TEXT):
        (w, h), _ = cv2.getTextSize(text, font, 1.0, thickness)
        scale = min((band * 0.6) / h, (width - 8) / w)
        if scale >= 0.3 or text == BANNER_TEXT:
            break
    (w, h), _ = cv2.getTextSize(text, font, scale, thickness)
    origin = (max(2, (width - w) // 2), (band + h) // 2)
    cv2.putText(banner, text, origin, font, scale, (255, 255, 255), thickness, cv2.LINE_AA)
    return np.concatenate([banner, image.astype(np.uint8, copy=False)], axis=0)


def draw_thumbnail(
    overview_rgb: np.ndarray,
    mask: np.ndarray | None,
    downsample: float,
    kept_boxes: list[tuple[int, int, int, int]],
    max_px: int,
    random_weights: bool = False,
) -> np.ndarray:
    """The overview with the tissue outline (green) and the kept patch grid (blue) drawn on it; with
    ``random_weights`` (the patches were picked with random-weight embeddings) a RANDOM WEIGHTS band above it."""
    image, scale = _fit(overview_rgb, max_px)
    if mask is not None:
        small = cv2.resize(mask.astype(np.uint8), (image.shape[1], image.shape[0]), interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours(small, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(image, contours, -1, (0, 170, 0), 2)
    factor = scale / downsample
    for x, y, w, h in kept_boxes:
        cv2.rectangle(
            image, (int(x * factor), int(y * factor)), (int((x + w) * factor), int((y + h) * factor)), (30, 60, 220), 1
        )
    return random_weights_banner(image) if random_weights else image


def cluster_colour(cluster: int) -> tuple[int, int, int]:
    # Golden-ratio hue steps keep neighbouring cluster ids far apart in colour.
    r, g, b = colorsys.hsv_to_rgb((cluster * 0.618034) % 1.0, 0.9, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def draw_selection(
    overview_rgb: np.ndarray, downsample: float, kept: list[KeptPatch], max_px: int, random_weights: bool = False
) -> np.ndarray:
    """Selected patches outlined in their cluster's colour; retrieval picks get a filled white-edged corner; with
    ``random_weights`` (clusters and picks from random-weight embeddings) a RANDOM WEIGHTS band above it."""
    image, scale = _fit(overview_rgb, max_px)
    image = (image.astype(np.float32) * 0.75 + 255 * 0.25).astype(np.uint8)  # fade so outlines stand out
    factor = scale / downsample
    for patch in kept:
        x, y, w, h = patch.box
        p0 = (int(x * factor), int(y * factor))
        p1 = (int((x + w) * factor), int((y + h) * factor))
        colour = cluster_colour(patch.cluster) if patch.cluster is not None else (30, 60, 220)
        cv2.rectangle(image, p0, p1, colour, 2)
        if any(reason.startswith("retrieval:") for reason in patch.selected_by):
            side = max(4, (p1[0] - p0[0]) // 3)
            corner = np.array([p0, (p0[0] + side, p0[1]), (p0[0], p0[1] + side)], np.int32)
            cv2.fillPoly(image, [corner], colour)
            cv2.polylines(image, [corner], True, (255, 255, 255), 1)
    return random_weights_banner(image) if random_weights else image
