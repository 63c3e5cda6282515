"""Large benchmark slides built at benchmark time from the real tissue of CMU-1-Small-Region.svs.

The slide is an Aperio-style SVS (tiled JPEG, pyramid 1x/4x/16x plus a thumbnail page) of real H&E tissue islands
(the CMU region, flipped four ways) laid on a grid over slightly noisy white glass, so that tissue detection,
tile caching and JPEG codecs see realistic content. Nothing here is committed: slides go under ``bench/_work``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import cv2
import numpy as np
import openslide
import tifffile

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CMU = SHARED / "slides" / "CMU-1-Small-Region.svs"
TILE = 256
DOWNSAMPLES = (1, 4, 16)


def _islands(source: Path) -> list[np.ndarray]:
    with openslide.OpenSlide(str(source)) as slide:
        rgb = np.asarray(slide.read_region((0, 0), 0, slide.dimensions).convert("RGB"))
    return [rgb, rgb[:, ::-1], rgb[::-1, :], rgb[::-1, ::-1]]


class _Layout:
    """Island placement in level-0 pixels: a jittered grid with some cells left empty as glass."""

    def __init__(self, width: int, height: int, island_hw: tuple[int, int], seed: int) -> None:
        ih, iw = island_hw
        self.cell_w, self.cell_h = iw + 400, ih + 400
        rng = np.random.default_rng(seed)
        self.placements: dict[tuple[int, int], tuple[int, int, int]] = {}
        for row in range(height // self.cell_h):
            for col in range(width // self.cell_w):
                if rng.random() < 0.2:
                    continue  # glass
                jx, jy = rng.integers(0, 400, size=2)
                self.placements[(col, row)] = (
                    col * self.cell_w + int(jx),
                    row * self.cell_h + int(jy),
                    int(rng.integers(0, 4)),
                )


def _level_tiles(layout: _Layout, islands: list[np.ndarray], width: int, height: int, ds: int, noise: np.ndarray):
    scaled = [
        cv2.resize(im, (max(1, im.shape[1] // ds), max(1, im.shape[0] // ds)), interpolation=cv2.INTER_AREA)
        if ds > 1
        else im
        for im in islands
    ]
    lw, lh = math.ceil(width / ds), math.ceil(height / ds)
    for ty in range(math.ceil(lh / TILE)):
        for tx in range(math.ceil(lw / TILE)):
            x0, y0 = tx * TILE, ty * TILE
            tile = noise.copy()
            # Level-0 cells this tile overlaps.
            c0, c1 = (x0 * ds) // layout.cell_w, ((x0 + TILE) * ds) // layout.cell_w
            r0, r1 = (y0 * ds) // layout.cell_h, ((y0 + TILE) * ds) // layout.cell_h
            for row in range(r0, r1 + 1):
                for col in range(c0, c1 + 1):
                    placed = layout.placements.get((col, row))
                    if placed is None:
                        continue
                    px, py, variant = placed[0] // ds, placed[1] // ds, placed[2]
                    island = scaled[variant]
                    ih, iw = island.shape[:2]
                    ax0, ay0 = max(x0, px), max(y0, py)
                    ax1, ay1 = min(x0 + TILE, px + iw, lw), min(y0 + TILE, py + ih, lh)
                    if ax0 < ax1 and ay0 < ay1:
                        tile[ay0 - y0 : ay1 - y0, ax0 - x0 : ax1 - x0] = island[
                            ay0 - py : ay1 - py, ax0 - px : ax1 - px
                        ]
            yield tile


def _thumbnail(layout: _Layout, islands: list[np.ndarray], width: int, height: int, noise: np.ndarray) -> np.ndarray:
    ds = max(1, max(width, height) // 1024)
    lw, lh = math.ceil(width / ds), math.ceil(height / ds)
    cols = math.ceil(lw / TILE)
    tiles = list(_level_tiles(layout, islands, width, height, ds, noise))
    rows = [np.concatenate(tiles[r : r + cols], axis=1) for r in range(0, len(tiles), cols)]
    return np.ascontiguousarray(np.concatenate(rows, axis=0)[:lh, :lw])


def build_slide(
    path: str | os.PathLike,
    width: int = 40_000,
    height: int = 30_000,
    mpp: float = 0.25,
    quality: int = 85,
    seed: int = 0,
    source: Path = CMU,
) -> Path:
    """Write the benchmark slide (skipped when an identical one exists) and return its path."""
    path = Path(path)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    islands = _islands(source)
    layout = _Layout(width, height, islands[0].shape[:2], seed)
    rng = np.random.default_rng(seed)
    noise = np.clip(rng.normal(238, 3, (TILE, TILE, 3)), 0, 255).astype(np.uint8)
    description = (
        f"Aperio Image Library v10.0.0\r\n{width}x{height} [0,0 {width}x{height}] ({TILE}x{TILE}) "
        f"JPEG/RGB Q={quality}|AppMag = {round(10 / mpp)}|MPP = {mpp}|Source = {source.name} (real tissue mosaic)"
    )
    common = {"photometric": "rgb", "description": description, "metadata": None}
    tmp = path.with_suffix(".partial")
    with tifffile.TiffWriter(tmp, bigtiff=True) as tif:
        for index, ds in enumerate(DOWNSAMPLES):
            lw, lh = math.ceil(width / ds), math.ceil(height / ds)
            tif.write(
                _level_tiles(layout, islands, width, height, ds, noise),
                shape=(lh, lw, 3),
                dtype=np.uint8,
                tile=(TILE, TILE),
                compression="jpeg",
                compressionargs={"level": quality},
                **common,
            )
            if index == 0:  # Aperio puts a stripped thumbnail right after the base level
                tif.write(_thumbnail(layout, islands, width, height, noise), compression="jpeg", **common)
    os.replace(tmp, path)
    return path
