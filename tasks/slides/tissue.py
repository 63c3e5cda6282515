"""Tissue detection on a low-resolution overview and the patch grid at a physical scale.

The mask follows the usual bright-field recipe (and the paper's): Otsu on HSV saturation of a ~32x downsampled
overview, median blur, morphological closing, small pieces removed, holes filled. Glass in bright-field is bright
and unsaturated; a dark background means fluorescence or dark-field, which this factory does not caption, unless the
image is stained tissue edge to edge (a tile cut from inside a section, e.g. Kather's H&E tiles): then there is no
glass to see and the stain colours decide (see ``stained_share``).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from pathgen.errors import SlideError
from pathgen.settings import TissueSettings

# Bright-field without glass. Transmitted light through H&E or IHC keeps every channel lit: a stain absorbs some
# wavelengths more than others (haematoxylin B > R ~ G, eosin R > B > G, DAB R > G > B), so a stained pixel is a
# coloured mixture whose green is never well above its red. Fluorescence is emitted light on black: near-black
# background and signal in one or a few pure channels (DAPI blue with R = G = 0, FITC green, Cy3 red). Measured on the
# 32x overviews the extractor uses (shared data; "full" = the 150 px Kather tile at full resolution):
#   - darkest channels: max(R, G, B) >= 40 in every pixel of the 24 Kather overviews (lowest 10th percentile 53,
#     LYMPHO 1BA; at full resolution 18% of that tile is below 40); the DAPI NDPI: median 16, 69% of pixels below 40.
#   - mixture: min >= 0.15 * max; 10th percentile of min/max over Kather overviews >= 0.23 (0.18 full); DAPI 0.00.
#   - green: G <= R + 10; 95th percentile of G - R is <= 2 on every Kather overview (tissue tiles 01-06: -11..-92).
#   - colour: HSV saturation >= tissue.min_saturation (20); Kather tissue tiles 01-06, median >= 54.
# Every pixel of the six Kather tiles that fail the brightness check (75th percentile 74..140 < 150) passes all four
# (share 1.00; >= 0.81 at full resolution); the DAPI NDPI has 0.00, the synthetic fluorescence composites in
# tests/test_tissue_quality.py 0.00..0.27. Half is the line. A pathgen setting for it would be
# tissue.min_stained_share (0..1, default 0.5).
STAINED_SHARE_MIN = 0.5
DARK_MAX_CHANNEL = 40
MIXTURE_MIN_RATIO = 0.15
GREEN_OVER_RED_MAX = 10


@dataclass(frozen=True)
class GridCell:
    """A candidate patch: its level-0 box and the share of it the mask calls tissue."""

    x: int
    y: int
    w0: int
    h0: int
    tissue_fraction: float

    @property
    def box(self) -> tuple[int, int, int, int]:
        return (self.x, self.y, self.w0, self.h0)


def tissue_mask(overview_rgb: np.ndarray, downsample: float, mpp: float | None, cfg: TissueSettings) -> np.ndarray:
    """Boolean tissue mask of an overview image; raises SlideError when there is no bright-field tissue."""
    hsv = cv2.cvtColor(overview_rgb, cv2.COLOR_RGB2HSV)
    saturation, value = hsv[..., 1], hsv[..., 2]
    background_value = float(np.percentile(value, 75))
    if background_value < cfg.min_background_value:
        # No bright glass: bright-field only if the image is stained tissue edge to edge.
        stained = stained_share(overview_rgb, cfg.min_saturation)
        if stained < STAINED_SHARE_MIN:
            raise SlideError(
                "no bright-field tissue found: the slide's background is dark (brightness "
                f"{background_value:.0f}/255) and only {stained:.0%} of it has H&E or IHC stain colours, as in a "
                "fluorescence or dark-field scan; PathGen extracts bright-field (H&E) slides only, so leave this "
                "slide out (or lower tissue.min_background_value if it is bright-field)"
            )
    blurred = cv2.medianBlur(saturation, cfg.median_px)
    # H&E has two stained populations, pale eosin-only stroma and dense hematoxylin-rich tissue, so a single Otsu
    # on saturation often splits stroma from nuclei instead of tissue from glass. Otsu again on the lower class
    # separates glass from pale stroma; the floor keeps glass noise out when there is no pale class.
    otsu, _ = cv2.threshold(blurred, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    lower = blurred[blurred <= otsu]
    if lower.size > 16:
        otsu, _ = cv2.threshold(lower.reshape(1, -1), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    threshold = max(float(otsu), float(cfg.min_saturation))
    mask = (blurred > threshold).astype(np.uint8)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (cfg.closing_px, cfg.closing_px))
    mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, kernel)
    # A piece is never required to be larger than a tenth of the whole image: a single patch (a 150 px Kather tile
    # is 0.0055 mm^2) would otherwise lose all its tissue to a minimum meant for specks on a whole slide.
    smallest = min(_min_area_px(downsample, mpp, cfg.min_area_um2), int(mask.size * MAX_MIN_AREA_SHARE))
    mask = _drop_small_pieces(mask, smallest)
    mask = _fill_holes(mask)
    if not mask.any():
        raise SlideError(
            "no tissue found: the slide looks like empty glass (no stained region above saturation "
            f"{threshold:.0f}); check the slide, or lower tissue.min_saturation for very faint stains"
        )
    return mask.astype(bool)


def stained_share(rgb: np.ndarray, min_saturation: int) -> float:
    """Share of pixels coloured like white light through H&E or IHC stains (thresholds: see the module constants)."""
    pixels = rgb.reshape(-1, 3).astype(np.float32)
    red, green = pixels[:, 0], pixels[:, 1]
    high, low = pixels.max(axis=1), pixels.min(axis=1)
    stained = (
        (high >= DARK_MAX_CHANNEL)  # lit, not the black of a fluorescence background
        & (low >= MIXTURE_MIN_RATIO * high)  # a mixture, not one pure emission channel
        & (green <= red + GREEN_OVER_RED_MAX)  # no stain leaves green well above red; green/cyan is emission
        & ((high - low) * 255 >= min_saturation * high)  # HSV saturation: some colour, not grey or white
    )
    return float(stained.mean()) if stained.size else 0.0


MAX_MIN_AREA_SHARE = 0.1


def _min_area_px(downsample: float, mpp: float | None, min_area_um2: float) -> int:
    if not mpp:
        return 0
    mask_um_per_px = mpp * downsample
    return int(min_area_um2 / (mask_um_per_px**2))


def _drop_small_pieces(mask: np.ndarray, min_area_px: int) -> np.ndarray:
    if min_area_px <= 1:
        return mask
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    keep = np.zeros(count, np.uint8)
    keep[1:] = stats[1:, cv2.CC_STAT_AREA] >= min_area_px
    return keep[labels]


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    # Flood the background from a padded border: whatever the flood cannot reach is a hole inside tissue.
    padded = np.pad(mask, 1, constant_values=0).astype(np.uint8)
    flood = padded.copy()
    ff_mask = np.zeros((padded.shape[0] + 2, padded.shape[1] + 2), np.uint8)
    cv2.floodFill(flood, ff_mask, (0, 0), 1)
    holes = (flood == 0)[1:-1, 1:-1]
    return (mask.astype(bool) | holes).astype(np.uint8)


def grid_shape(slide_size: tuple[int, int], cell_level0: float | tuple[float, float]) -> tuple[int, int]:
    """(columns, rows) of full cells of ``cell_level0`` level-0 px (one side, or (across, down) where the slide's
    pixels are not square) that fit on the slide."""
    cell_x, cell_y = _cell_axes(cell_level0)
    return int(slide_size[0] // cell_x), int(slide_size[1] // cell_y)


def _cell_axes(cell_level0: float | tuple[float, float]) -> tuple[float, float]:
    return cell_level0 if isinstance(cell_level0, tuple) else (cell_level0, cell_level0)


def grid_cells(
    mask: np.ndarray,
    mask_downsample: float,
    slide_size: tuple[int, int],
    cell_level0: float | tuple[float, float],
    threshold: float,
) -> list[GridCell]:
    """Full cells of ``cell_level0`` level-0 px (one side, or (across, down) where the slide's pixels are not
    square) in raster order whose tissue fraction reaches threshold."""
    cols, rows = grid_shape(slide_size, cell_level0)
    if cols == 0 or rows == 0:
        return []
    cell_x, cell_y = _cell_axes(cell_level0)
    integral = cv2.integral(mask.astype(np.uint8))  # (h+1, w+1) running sums: any box sum in O(1)
    mh, mw = mask.shape
    side_x, side_y = int(round(cell_x)), int(round(cell_y))
    cells: list[GridCell] = []
    for row in range(rows):
        y = int(round(row * cell_y))
        my0 = min(mh, int(y / mask_downsample))
        my1 = min(mh, max(my0 + 1, int(round((y + side_y) / mask_downsample))))
        for col in range(cols):
            x = int(round(col * cell_x))
            mx0 = min(mw, int(x / mask_downsample))
            mx1 = min(mw, max(mx0 + 1, int(round((x + side_x) / mask_downsample))))
            area = (my1 - my0) * (mx1 - mx0)
            if area <= 0:
                continue
            inside = integral[my1, mx1] - integral[my0, mx1] - integral[my1, mx0] + integral[my0, mx0]
            fraction = float(inside) / area
            if fraction >= threshold and fraction > 0:
                cells.append(GridCell(x, y, side_x, side_y, round(fraction, 4)))
    return cells


def mask_fraction(mask: np.ndarray, mask_downsample: float, box: tuple[int, int, int, int]) -> float:
    """Tissue fraction of an arbitrary level-0 box (for boxes named by a source rather than the grid)."""
    x, y, w, h = box
    mh, mw = mask.shape
    x0, y0 = max(0, int(x / mask_downsample)), max(0, int(y / mask_downsample))
    x1 = min(mw, max(x0 + 1, int(round((x + w) / mask_downsample))))
    y1 = min(mh, max(y0 + 1, int(round((y + h) / mask_downsample))))
    if x1 <= x0 or y1 <= y0:
        return 0.0
    return float(mask[y0:y1, x0:x1].mean())
