"""Pictures a person checks at a glance: the tissue and kept grid (thumbnail.png) and the selection
(selection.png: kept patches outlined in their cluster's colour, retrieval picks marked with a filled corner, and a
legend below saying so). Box lines grow with the picture and carry a white edge, so they stay visible on purple.

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


def fit_picture(image: np.ndarray, max_px: int) -> tuple[np.ndarray, float]:
    """A uint8 copy no longer than ``max_px`` on its long side (area-averaged), and its scale (never above 1)."""
    scale = min(1.0, max_px / max(image.shape[:2]))
    if scale < 1.0:
        size = (max(1, int(image.shape[1] * scale)), max(1, int(image.shape[0] * scale)))
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    return image.astype(np.uint8, copy=True), scale  # never draw on the caller's array


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
    image, scale = fit_picture(overview_rgb, max_px)
    if mask is not None:
        small = cv2.resize(mask.astype(np.uint8), (image.shape[1], image.shape[0]), interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours(small, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(image, contours, -1, (0, 170, 0), 2)
    factor = scale / downsample
    line = line_px(image)
    for x, y, w, h in kept_boxes:
        p0, p1 = (int(x * factor), int(y * factor)), (int((x + w) * factor), int((y + h) * factor))
        outlined_box(image, p0, p1, (30, 60, 220), line)
    return random_weights_banner(image) if random_weights else image


def line_px(image: np.ndarray) -> int:
    """Box lines scale with the picture: 1 px vanishes on purple tissue in a 1024 px thumbnail."""
    return max(2, round(max(image.shape[:2]) / 400))


def outlined_box(image: np.ndarray, p0: tuple[int, int], p1: tuple[int, int], colour, line: int) -> None:
    """A coloured box with a white edge around it, visible on purple, pink and white alike."""
    cv2.rectangle(image, p0, p1, (255, 255, 255), line + 2)
    cv2.rectangle(image, p0, p1, colour, line)


def cluster_colour(cluster: int) -> tuple[int, int, int]:
    # Golden-ratio hue steps keep neighbouring cluster ids far apart in colour.
    r, g, b = colorsys.hsv_to_rgb((cluster * 0.618034) % 1.0, 0.9, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def draw_selection(
    overview_rgb: np.ndarray, downsample: float, kept: list[KeptPatch], max_px: int, random_weights: bool = False
) -> np.ndarray:
    """Selected patches outlined in their cluster's colour; retrieval picks get a filled white-edged corner; with
    ``random_weights`` (clusters and picks from random-weight embeddings) a RANDOM WEIGHTS band above it."""
    image, scale = fit_picture(overview_rgb, max_px)
    image = (image.astype(np.float32) * 0.75 + 255 * 0.25).astype(np.uint8)  # fade so outlines stand out
    factor = scale / downsample
    line = line_px(image)
    for patch in kept:
        x, y, w, h = patch.box
        p0 = (int(x * factor), int(y * factor))
        p1 = (int((x + w) * factor), int((y + h) * factor))
        colour = cluster_colour(patch.cluster) if patch.cluster is not None else (30, 60, 220)
        outlined_box(image, p0, p1, colour, line)
        if any(reason.startswith("retrieval:") for reason in patch.selected_by):
            _corner(image, p0, max(4, (p1[0] - p0[0]) // 3), colour)
    image = np.concatenate([image, selection_legend(kept, image.shape[1])], axis=0)
    return random_weights_banner(image) if random_weights else image


def _corner(image: np.ndarray, p0: tuple[int, int], side: int, colour) -> None:
    corner = np.array([p0, (p0[0] + side, p0[1]), (p0[0], p0[1] + side)], np.int32)
    cv2.fillPoly(image, [corner], colour)
    cv2.polylines(image, [corner], True, (255, 255, 255), 1)


def selection_legend(kept: list[KeptPatch], width: int) -> np.ndarray:
    """A white strip below the picture: what a box colour and a filled corner mean, with a swatch per cluster."""
    clusters = sorted({p.cluster for p in kept if p.cluster is not None})
    retrieval = sum(any(r.startswith("retrieval:") for r in p.selected_by) for p in kept)
    row_h, font, scale = 18, cv2.FONT_HERSHEY_SIMPLEX, 0.42
    entries = [(cluster_colour(c), f"cluster {c}", False) for c in clusters[:12]]
    entries.append(((90, 90, 90), f"filled corner: retrieval pick ({retrieval})", True))
    per_row = max(1, width // 150)
    rows = [entries[i : i + per_row] for i in range(0, len(entries), per_row)]
    strip = np.full((8 + row_h * (len(rows) + 1), width, 3), 255, np.uint8)
    title = f"{len(kept)} selected; box colour = k-means cluster ({len(clusters)} clusters" + (
        ", first 12 shown)" if len(clusters) > 12 else ")"
    )
    cv2.putText(strip, title, (4, row_h - 4), font, scale, (0, 0, 0), 1, cv2.LINE_AA)
    for r, row in enumerate(rows, start=1):
        for c, (colour, label, corner) in enumerate(row):
            x, y = 4 + c * (width // per_row), 4 + r * row_h
            cv2.rectangle(strip, (x, y), (x + 12, y + 12), colour, -1 if not corner else 2)
            if corner:
                _corner(strip, (x, y), 8, colour)
            cv2.putText(strip, label, (x + 16, y + 11), font, scale, (0, 0, 0), 1, cv2.LINE_AA)
    return strip
