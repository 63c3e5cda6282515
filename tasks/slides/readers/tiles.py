"""The fast path of a TIFF slide: its pyramid's pages decoded tile by tile (or in bands of rows, for a stripped page)
straight from the file, with an LRU cache of decoded tiles shared by the levels of one reader.

This is what makes extraction several times faster than per-patch ``read_region``: a tile is decoded once and every
patch that overlaps it is served from the cache. A stripped (non-tiled) page is read the same way: an uncompressed
one in bands of full-width rows (``STRIP_BAND_BYTES``), never whole; a compressed one strip by strip, and a strip
that would decode to more than ``MAX_STRIP_BYTES`` is refused with the fix (convert the slide to a tiled pyramidal
TIFF).
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import numpy as np

from pathgen.errors import SlideError

TILE_CACHE_BYTES = 512 * 2**20
STRIP_BAND_BYTES = 16 * 2**20  # rows of an uncompressed stripped page are read in bands of about this size
MAX_STRIP_BYTES = 256 * 2**20  # a compressed strip is decoded whole: larger than this decoded, the slide is refused
# Formats whose pyramid is not a series of TIFF pages tifffile can decode tile by tile.
NOT_TILED_TIFF_VENDORS = ("hamamatsu", "mirax", "ventana", "philips", "leica", "zeiss")


class TileLevel:
    """Decodes tiles of one tiled TIFF page on demand, with an LRU cache shared by the reader."""

    def __init__(self, page, filehandle, cache: TileCache, key: int) -> None:
        self.page = page
        self.fh = filehandle
        self.cache = cache
        self.key = key
        self.tile_w = int(page.tilewidth)
        self.tile_h = int(page.tilelength)
        self.width = int(page.imagewidth)
        self.height = int(page.imagelength)
        self.tiles_across = math.ceil(self.width / self.tile_w)
        self.jpegtables = getattr(page, "jpegtables", None)

    def _tile(self, tx: int, ty: int) -> np.ndarray:
        cache_key = (self.key, tx, ty)
        tile = self.cache.get(cache_key)
        if tile is not None:
            return tile
        index = ty * self.tiles_across + tx
        offset = self.page.dataoffsets[index]
        count = self.page.databytecounts[index]
        if count == 0:  # sparse tile: the writer left it empty, it is background
            tile = np.full((self.tile_h, self.tile_w, 3), 255, np.uint8)
        else:
            self.fh.seek(offset)
            data = self.fh.read(count)
            if len(data) != count:
                raise SlideError(
                    f"tile {index} ends past the end of the file: the slide is truncated; download it again"
                )
            try:
                decoded, _, _ = self.page.decode(data, index, jpegtables=self.jpegtables)
            except Exception as exc:  # noqa: BLE001 - any codec failure means corrupt data
                raise SlideError(
                    f"tile {index} cannot be decoded ({exc}); the slide is corrupt: download it again"
                ) from None
            tile = decoded[0, :, :, :3]
        self.cache.put(cache_key, tile)
        return tile

    def tiles_under(self, x: int, y: int, w: int, h: int) -> Iterator[tuple[int, int]]:
        """(tx, ty) of every tile a box in this level's coordinates overlaps, row by row."""
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + w, self.width), min(y + h, self.height)
        if x0 >= x1 or y0 >= y1:
            return
        for ty in range(y0 // self.tile_h, (y1 - 1) // self.tile_h + 1):
            for tx in range(x0 // self.tile_w, (x1 - 1) // self.tile_w + 1):
                yield tx, ty

    def read(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        """RGB pixels of a box in this level's coordinates; outside the image is white."""
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + w, self.width), min(y + h, self.height)
        # Fresh pages cost as much as a tile decode: fill with white only when the box leaves the image.
        inside = x0 == x and y0 == y and x1 == x + w and y1 == y + h
        out = np.empty((h, w, 3), np.uint8) if inside else np.full((h, w, 3), 255, np.uint8)
        for tx, ty in self.tiles_under(x, y, w, h):
            tile = self._tile(tx, ty)
            gx, gy = tx * self.tile_w, ty * self.tile_h
            sx0, sy0 = max(x0, gx), max(y0, gy)
            sx1, sy1 = min(x1, gx + self.tile_w), min(y1, gy + self.tile_h)
            out[sy0 - y : sy1 - y, sx0 - x : sx1 - x] = tile[sy0 - gy : sy1 - gy, sx0 - gx : sx1 - gx]
        return out


class StripLevel(TileLevel):
    """A stripped (non-tiled) TIFF page read as full-width bands of rows, cached like tiles.

    Uncompressed: a band is ``STRIP_BAND_BYTES`` of rows read straight from the file, whatever the strip size (a
    20,000 x 20,000 single-strip page is never decoded whole). Compressed: a band is one strip, decoded whole, so a
    strip larger than ``MAX_STRIP_BYTES`` decoded is refused with a SlideError naming the slide and the fix.
    """

    def __init__(self, page, filehandle, cache: TileCache, key: int, name: str) -> None:
        self.page = page
        self.fh = filehandle
        self.cache = cache
        self.key = key
        self.width = int(page.imagewidth)
        self.height = int(page.imagelength)
        self.samples = int(page.samplesperpixel)
        self.row_bytes = self.width * self.samples
        self.rows_per_strip = max(1, min(int(page.rowsperstrip or self.height), self.height))
        self.raw = page.compression == 1 and page.fillorder == 1 and page.photometric == 2  # plain RGB(A) bytes
        self.tile_w, self.tiles_across = self.width, 1
        self.jpegtables = getattr(page, "jpegtables", None)
        if self.raw:
            self.tile_h = max(1, min(self.height, STRIP_BAND_BYTES // self.row_bytes))
            return
        strip_bytes = self.rows_per_strip * self.row_bytes
        if strip_bytes > MAX_STRIP_BYTES:
            raise SlideError(oversized_strip_message(name, self.width, self.height, strip_bytes))
        self.tile_h = self.rows_per_strip

    def _tile(self, tx: int, ty: int) -> np.ndarray:
        if not self.raw:
            return super()._tile(tx, ty)  # one compressed strip, decoded by tifffile
        cache_key = (self.key, tx, ty)
        band = self.cache.get(cache_key)
        if band is not None:
            return band
        r0, r1 = ty * self.tile_h, min(self.height, (ty + 1) * self.tile_h)
        band = np.full((r1 - r0, self.width, 3), 255, np.uint8)
        rps = self.rows_per_strip
        for strip in range(r0 // rps, (r1 - 1) // rps + 1):
            a, b = max(r0, strip * rps), min(r1, (strip + 1) * rps)
            count = self.page.databytecounts[strip]
            if count == 0:  # sparse strip: background
                continue
            start = (a - strip * rps) * self.row_bytes
            need = (b - a) * self.row_bytes
            if start + need > count:
                raise SlideError(
                    f"strip {strip} holds {count} bytes, fewer than its rows need: the slide is corrupt; "
                    "download it again"
                )
            self.fh.seek(self.page.dataoffsets[strip] + start)
            data = self.fh.read(need)
            if len(data) != need:
                raise SlideError(
                    f"strip {strip} ends past the end of the file: the slide is truncated; download it again"
                )
            rows = np.frombuffer(data, np.uint8).reshape(b - a, self.width, self.samples)
            band[a - r0 : b - r0] = rows[:, :, :3]
        self.cache.put(cache_key, band)
        return band


class TileCache:
    """LRU of decoded tiles by (level, tx, ty), bounded in bytes.

    While ``read_boxes`` reads a known list of boxes, ``last_use`` holds, for every tile they touch, the index of
    the last box that needs it, and ``now`` the box being read: a tile no later box needs is never kept, and a kept
    one is dropped as soon as its last box has it. Only tiles shared with boxes still to come stay in memory (in
    raster order, one row of tiles across the slide), and a decoded tile that is used once is copied while it is
    still in the CPU's cache and its memory serves the next decode, instead of ageing out of a cache of bands.
    """

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity = capacity_bytes
        self.used = 0
        self.items: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self.hits = 0
        self.misses = 0
        self.last_use: dict[tuple, int] | None = None
        self.now = 0

    def _needed_later(self, key: tuple) -> bool:
        return self.last_use is None or self.last_use.get(key, self.now + 1) > self.now

    def get(self, key: tuple) -> np.ndarray | None:
        tile = self.items.get(key)
        if tile is None:
            self.misses += 1
            return None
        self.hits += 1
        if self._needed_later(key):
            self.items.move_to_end(key)
        else:
            del self.items[key]
            self.used -= tile.nbytes
        return tile

    def put(self, key: tuple, tile: np.ndarray) -> None:
        if not self._needed_later(key):
            return
        self.items[key] = tile
        self.used += tile.nbytes
        while self.used > self.capacity and len(self.items) > 1:
            _, old = self.items.popitem(last=False)
            self.used -= old.nbytes

    def clear(self) -> None:
        self.items.clear()
        self.used = 0


def refuse_whole_page(page, uri: str) -> None:
    """SlideError for a stripped page that is not read in bands (compressed, or not 8-bit interleaved RGB) and whose
    strips decode to more than MAX_STRIP_BYTES each: every read of it would decode a whole strip."""
    if page.is_tiled:
        return
    eligible = page.planarconfig == 1 and page.samplesperpixel >= 3 and page.dtype == np.uint8
    rows = max(1, min(int(page.rowsperstrip or page.imagelength), int(page.imagelength)))
    strip_bytes = rows * int(page.imagewidth) * int(page.samplesperpixel) * np.dtype(page.dtype).itemsize
    if eligible and page.compression == 1:
        return  # read in bands of rows
    if strip_bytes > MAX_STRIP_BYTES:  # each read decodes at least one whole strip
        name = os.path.basename(str(uri).rstrip("/"))
        raise SlideError(oversized_strip_message(name, int(page.imagewidth), int(page.imagelength), strip_bytes))


def oversized_strip_message(name: str, width: int, height: int, strip_bytes: int) -> str:
    return (
        f"{name} is a {width} x {height} stripped (non-tiled) TIFF whose strips decode to {strip_bytes / 2**20:.0f} "
        f"MiB each, more than the {MAX_STRIP_BYTES / 2**20:g} MiB a slide may hold decoded at once; convert it to a "
        f"tiled pyramidal TIFF (e.g. `vips tiffsave {name} tiled.tif --tile --pyramid --compression jpeg`) and "
        "extract that"
    )


def tile_levels(
    tiff: Any, level_dimensions: list[tuple[int, int]], cache: TileCache, uri: str
) -> list[TileLevel] | None:
    """Tile-level access to every pyramid level of ``tiff``, or None when a level is not a page tifffile decodes as
    8-bit interleaved RGB of the level's size (the backend then reads everything). A SlideError for a stripped page
    too large to read in pieces."""
    pages = [level.keyframe for level in tiff.series[0].levels]
    if len(pages) != len(level_dimensions):
        return None
    for page in pages:
        refuse_whole_page(page, uri)
    for page, size in zip(pages, level_dimensions, strict=True):
        if not _decodable(page, size):
            return None
    name = os.path.basename(uri.rstrip("/"))
    fh = tiff.filehandle
    return [
        TileLevel(page, fh, cache, i) if page.is_tiled else StripLevel(page, fh, cache, i, name)
        for i, page in enumerate(pages)
    ]


def _decodable(page: Any, size: tuple[int, int]) -> bool:
    if (page.imagewidth, page.imagelength) != size:
        return False
    if page.planarconfig != 1 or page.samplesperpixel < 3 or page.dtype != np.uint8:
        return False
    return not getattr(page, "is_ndpi", False) and page.imagedepth == 1
