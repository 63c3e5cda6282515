"""DeepZoom tiles of a slide, for OpenSeadragon: ``openslide.deepzoom.DeepZoomGenerator`` over our slide reader.

The generator asks its slide for ``level_dimensions``, ``level_downsamples``, ``get_best_level_for_downsample`` and
``read_region``; ``ReaderSlide`` answers them from ``tasks.slides.readers.SlideReader``, the reader the extractor uses,
so every slide the factory extracted is served the same way: files OpenSlide opens (through OpenSlide), the TIFFs it
refuses and slides on S3 (through tiffslide's ranged reads), DICOM series (wsidicom). The DeepZoom format (a ``.dzi``
XML descriptor, tiles at ``<name>_files/<level>/<col>_<row>.<format>``) is what OpenSeadragon's ``DziTileSource``
reads (https://openseadragon.github.io/examples/tilesource-dzi/ ; the generator's own docs at
https://openslide.org/api/python/#module-openslide.deepzoom).

The tissue outline is computed as extraction computes it (``reader.overview`` at ``tissue.mask_downsample``, then
``tasks.slides.tissue.tissue_mask``), traced into polygons in level-0 pixels.
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from dataclasses import dataclass

import cv2
import numpy as np
from openslide.deepzoom import DeepZoomGenerator
from PIL import Image

from pathgen.errors import SlideError
from pathgen.settings import S3Settings, TissueSettings
from tasks.slides.readers import SlideReader, open_slide
from tasks.slides.tissue import tissue_mask
from tasks.store.objects import storage_options

TILE_PX = 254  # + 1 px overlap each side: 256 px tiles, the size OpenSeadragon's DZI examples use
OVERLAP_PX = 1
TILE_QUALITY = 80
READER_CACHE_BYTES = 64 * 2**20  # decoded slide tiles kept per open slide
MAX_OUTLINE_POINTS = 400  # per polygon, after simplification: a light overlay


class ReaderSlide:
    """The part of ``openslide.OpenSlide`` that ``DeepZoomGenerator`` uses, answered by a ``SlideReader``."""

    def __init__(self, reader: SlideReader) -> None:
        self.reader = reader
        self.properties: dict[str, str] = {}  # no bounds: the whole level is tiled
        self.level_dimensions = tuple(tuple(d) for d in reader.info.level_dimensions)
        self.level_downsamples = tuple(reader.info.level_downsamples)
        self.level_count = len(self.level_dimensions)
        self.dimensions = self.level_dimensions[0]

    def get_best_level_for_downsample(self, downsample: float) -> int:
        best = 0
        for level, ds in enumerate(self.level_downsamples):
            if ds <= downsample * 1.0001:
                best = level
        return best

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> Image.Image:
        """RGBA pixels of ``size`` at ``level`` whose corner is ``location`` in level-0 pixels; outside: clear."""
        ds = self.level_downsamples[level]
        width, height = self.level_dimensions[level]
        x, y = int(location[0] / ds), int(location[1] / ds)
        w, h = min(size[0], width - x), min(size[1], height - y)
        out = np.zeros((size[1], size[0], 4), np.uint8)
        if w > 0 and h > 0:
            out[:h, :w, :3] = self.reader.read_level(level, x, y, w, h)
            out[:h, :w, 3] = 255
        return Image.fromarray(out, "RGBA")


@dataclass
class OpenSlide:
    reader: SlideReader
    deepzoom: DeepZoomGenerator
    lock: threading.Lock  # a reader is not thread-safe: one tile at a time per slide
    outline: list[list[list[int]]] | None = None
    outline_note: str | None = None


class SlideTiles:
    """Open slides (an LRU of ``capacity``) and their DeepZoom tiles; safe to call from several threads."""

    def __init__(self, capacity: int, s3: S3Settings | None = None, tissue: TissueSettings | None = None) -> None:
        self._open: OrderedDict[str, OpenSlide] = OrderedDict()
        self._capacity = capacity
        self._s3 = s3 or S3Settings()
        self._tissue = tissue or TissueSettings()
        self._lock = threading.Lock()

    def _slide(self, uri: str) -> OpenSlide:
        with self._lock:
            found = self._open.get(uri)
            if found is not None:
                self._open.move_to_end(uri)
                return found
        reader = open_slide(uri, storage_opts=storage_options(uri, self._s3), tile_cache_bytes=READER_CACHE_BYTES)
        opened = OpenSlide(reader, DeepZoomGenerator(ReaderSlide(reader), TILE_PX, OVERLAP_PX), threading.Lock())
        with self._lock:
            raced = self._open.get(uri)
            if raced is not None:  # another request opened it meanwhile: keep one
                reader.close()
                return raced
            self._open[uri] = opened
            while len(self._open) > self._capacity:
                _, old = self._open.popitem(last=False)
                with old.lock:
                    old.reader.close()
        return opened

    def dzi(self, uri: str) -> str:
        return self._slide(uri).deepzoom.get_dzi("jpeg")

    def tile(self, uri: str, level: int, col: int, row: int) -> bytes:
        """One JPEG tile; ValueError for an address outside the pyramid."""
        slide = self._slide(uri)
        deepzoom = slide.deepzoom
        if not 0 <= level < deepzoom.level_count:
            raise ValueError(f"DeepZoom level {level} is outside 0..{deepzoom.level_count - 1}")
        cols, rows = deepzoom.level_tiles[level]
        if not (0 <= col < cols and 0 <= row < rows):
            raise ValueError(f"tile {col}_{row} is outside level {level}'s {cols} x {rows} tiles")
        with slide.lock:
            image = deepzoom.get_tile(level, (col, row))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=TILE_QUALITY)
        return buffer.getvalue()

    def outline(self, uri: str, mpp: float | None) -> tuple[list[list[list[int]]], str | None]:
        """The tissue outline as polygons of [x, y] level-0 points, and a note when there is none."""
        slide = self._slide(uri)
        with slide.lock:
            if slide.outline is None:
                slide.outline, slide.outline_note = _trace_tissue(slide.reader, mpp, self._tissue)
        return slide.outline, slide.outline_note

    def close(self) -> None:
        with self._lock:
            while self._open:
                _, old = self._open.popitem(last=False)
                old.reader.close()


def _trace_tissue(reader: SlideReader, mpp: float | None, cfg: TissueSettings) -> tuple[list, str | None]:
    overview, downsample = reader.overview(cfg.mask_downsample)
    try:
        mask = tissue_mask(overview, downsample, mpp or reader.info.mpp, cfg)
    except SlideError as exc:
        return [], str(exc)
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    polygons: list[list[list[int]]] = []
    for contour in contours:
        epsilon = max(1.0, cv2.arcLength(contour, True) / MAX_OUTLINE_POINTS)
        points = cv2.approxPolyDP(contour, epsilon, True).reshape(-1, 2)
        if len(points) >= 3:
            polygons.append([[int(round(x * downsample)), int(round(y * downsample))] for x, y in points])
    return polygons, None
