"""The reader interface: read a level-0 box of a slide at a physical resolution, whatever the backend.

``SlideReader`` holds everything that does not depend on the file format (choosing the level, scaling a box to it,
reading boxes in raster order through the tile cache, the overview); a subclass per backend opens the file and says
which TIFF, if any, the tile reader may decode (``tasks.slides.readers.backends``). ``open_slide`` chooses the
backend (``tasks.slides.readers.factory``).

MPP is kept per axis (``SlideInfo.mpp_x``, ``mpp_y``): a scanner whose pixels are not square is read with each axis
at its own scale, so a patch at 0.5 µm/px covers the same microns across and down. ``SlideInfo.mpp`` is their mean,
the one figure records and tables carry; setting it (an override or a default, which are one figure) sets both axes.

Memory budget of one slide's reader: the tile cache (``TILE_CACHE_BYTES``, 512 MiB, lowered to one band of patches
while extracting; ``read_boxes`` keeps only the tiles that boxes still to come share, about one row of tiles across
the slide in raster order), the overview (slide area / mask_downsample², x3 bytes) and one band of rows while the
overview is built (``OVERVIEW_BAND_BYTES``). Neither openslide nor tiffslide is safe to share across threads in all
cases: open one reader per worker (thread or process) and close it when done.
"""

from __future__ import annotations

import math
import os
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, ClassVar

import cv2
import numpy as np

from pathgen.errors import SlideError, is_transient
from tasks.slides.readers.tiles import NOT_TILED_TIFF_VENDORS, TILE_CACHE_BYTES, TileCache, TileLevel, tile_levels

# Levels whose MPP is within this relative tolerance of the target are read without resampling.
MPP_TOLERANCE = 0.02
MAX_PLAUSIBLE_MPP = 50.0  # µm/px: coarser than any microscope scan's level 0 (a 1x objective is ~10)
OVERVIEW_BAND_BYTES = 64 * 2**20  # the overview of a large level is read and shrunk in bands of about this size

# A resolution in µm/px: one figure for both axes, or (x, y).
Resolution = float | tuple[float, float]


def axes(resolution: Resolution) -> tuple[float, float]:
    """(x, y) µm/px of a resolution given as one figure or per axis."""
    if isinstance(resolution, tuple):
        return float(resolution[0]), float(resolution[1])
    return float(resolution), float(resolution)


@dataclass
class SlideInfo:
    uri: str
    vendor: str
    backend: str
    width: int
    height: int
    level_dimensions: list[tuple[int, int]]
    level_downsamples: list[float]
    mpp_x: float | None
    mpp_y: float | None
    objective_power: float | None
    fast_tiles: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def mpp(self) -> float | None:
        """The mean of the two axes' MPP: the one figure records and tables carry (reads use each axis)."""
        if self.mpp_x is None or self.mpp_y is None:
            return None
        return (self.mpp_x + self.mpp_y) / 2

    @mpp.setter
    def mpp(self, value: float | None) -> None:
        # An override or a default is one figure: the pixels are taken to be square.
        self.mpp_x = self.mpp_y = None if value is None else float(value)

    def level_mpp(self, level: int) -> tuple[float, float]:
        """(x, y) µm/px of a pyramid level."""
        assert self.mpp_x is not None and self.mpp_y is not None
        return self.mpp_x * self.level_downsamples[level], self.mpp_y * self.level_downsamples[level]

    def upsampled_at(self, resolution: Resolution) -> bool:
        """Whether reading at ``resolution`` is finer than the scan on either axis: the patches are upsampled and
        hold no more detail than the slide."""
        assert self.mpp_x is not None and self.mpp_y is not None
        target_x, target_y = axes(resolution)
        return target_x < self.mpp_x * (1 - MPP_TOLERANCE) or target_y < self.mpp_y * (1 - MPP_TOLERANCE)

    def level0_px(self, microns: float) -> tuple[float, float]:
        """How many level-0 pixels span ``microns`` across (x) and down (y)."""
        assert self.mpp_x is not None and self.mpp_y is not None
        return microns / self.mpp_x, microns / self.mpp_y


def _float_or_none(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and number > 0 else None


def _scanner_mpp(props: dict[str, Any], prefix: str) -> tuple[float | None, float | None]:
    """(x, y) MPP from the slide's properties; an axis the file leaves out is taken to be the other's."""
    mpp_x = _float_or_none(props.get(f"{prefix}.mpp-x"))
    mpp_y = _float_or_none(props.get(f"{prefix}.mpp-y"))
    mpp_x, mpp_y = mpp_x or mpp_y, mpp_y or mpp_x
    if mpp_x is None or mpp_y is None or max(mpp_x, mpp_y) > MAX_PLAUSIBLE_MPP:
        # None, or a screen resolution tag (72 dpi reads as 352.8 µm/px), not a microscope's: no pixel size is known.
        return None, None
    return mpp_x, mpp_y


def slide_info(uri: str, backend: str, handle: Any) -> SlideInfo:
    """What an openslide-like ``handle`` (properties, level_dimensions, level_downsamples) says about the slide."""
    props = dict(handle.properties)
    prefix = backend  # openslide | tiffslide | wsidicom: each names its properties after itself
    mpp_x, mpp_y = _scanner_mpp(props, prefix)
    dims = [(int(w), int(h)) for w, h in handle.level_dimensions]
    return SlideInfo(
        uri=uri,
        vendor=str(props.get(f"{prefix}.vendor") or "unknown"),
        backend=backend,
        width=dims[0][0],
        height=dims[0][1],
        level_dimensions=dims,
        level_downsamples=[float(d) for d in handle.level_downsamples],
        mpp_x=mpp_x,
        mpp_y=mpp_y,
        objective_power=_float_or_none(props.get(f"{prefix}.objective-power")),
        extra={"mpp_source": "metadata" if mpp_x else None},
    )


class SlideReader:
    """Reads boxes of a slide at a physical resolution. Not thread-safe: one per worker.

    A subclass per backend sets ``backend`` (which also prefixes its properties) and, where the slide is a TIFF the
    tile reader can decode, ``_tiff_for_tiles``. Open one with ``open_slide``."""

    backend: ClassVar[str]

    def __init__(
        self,
        uri: str,
        handle: Any,
        *,
        mpp_override: float | None = None,
        tile_cache_bytes: int = TILE_CACHE_BYTES,
        fast_tiles: bool = True,
    ) -> None:
        self.uri = str(uri)
        self._slide = handle
        self._tiff: Any = None  # a TIFF handle of the reader's own, closed with it
        self._cache = TileCache(tile_cache_bytes)
        self._max_cache = tile_cache_bytes
        self.info = slide_info(self.uri, self.backend, handle)
        self._levels = self._tile_levels() if fast_tiles else None
        self.info.fast_tiles = self._levels is not None
        if mpp_override is not None:
            self.info.mpp = float(mpp_override)
            self.info.extra["mpp_source"] = "override"

    def _tiff_for_tiles(self) -> Any:
        """The tifffile.TiffFile whose pages are this slide's levels, or None: no tile reader for this backend."""
        return None

    def _tile_levels(self) -> list[TileLevel] | None:
        """Tile-level access where every pyramid level is a tiled TIFF page that tifffile decodes."""
        if self.info.vendor in NOT_TILED_TIFF_VENDORS:
            return None
        try:
            tiff = self._tiff_for_tiles()
            return None if tiff is None else tile_levels(tiff, self.info.level_dimensions, self._cache, self.uri)
        except SlideError:
            raise
        except Exception:  # noqa: BLE001 - the fast path is optional; the backend still reads everything
            return None

    # -- reading -------------------------------------------------------------------------------------------

    def best_level(self, mpp: Resolution) -> int:
        """The coarsest level that is still at least as fine as ``mpp`` on both axes (never upsample when
        avoidable)."""
        target_x, target_y = axes(mpp)
        best = 0
        for level in range(len(self.info.level_downsamples)):
            level_x, level_y = self.info.level_mpp(level)
            if level_x <= target_x * (1 + MPP_TOLERANCE) and level_y <= target_y * (1 + MPP_TOLERANCE):
                best = level
        return best

    def read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """RGB pixels of a box given in the coordinates of ``level``."""
        if self._levels is not None:
            return self._levels[level].read(x, y, w, h)
        ds = self.info.level_downsamples[level]
        try:
            region = self._slide.read_region((int(round(x * ds)), int(round(y * ds))), level, (w, h))
        except Exception as exc:
            if is_transient(exc):
                raise
            raise SlideError(f"reading {self.uri} failed ({exc}); the slide is corrupt or truncated") from None
        rgba = np.asarray(region)
        if rgba.shape[-1] == 4:
            # Transparent pixels (outside the scanned area) are glass: white.
            rgb = rgba[..., :3].copy()
            rgb[rgba[..., 3] == 0] = 255
            return rgb
        return np.ascontiguousarray(rgba[..., :3])

    def read_rect(
        self, location: tuple[int, int], size: tuple[int, int], resolution: Resolution, units: str = "mpp"
    ) -> np.ndarray:
        """RGB image of ``size`` pixels at ``resolution`` whose top-left corner is ``location`` at level 0."""
        if units != "mpp":
            raise ValueError(f"units={units!r} is not supported; use units='mpp'")
        level, x, y, read_w, read_h = self._level_box(location, size, resolution)
        pixels = self.read_level(level, x, y, read_w, read_h)
        if (read_w, read_h) == tuple(size):
            return pixels
        interp = cv2.INTER_AREA if read_w > size[0] else cv2.INTER_LINEAR
        return cv2.resize(pixels, tuple(size), interpolation=interp)

    def _level_box(
        self, location: tuple[int, int], size: tuple[int, int], resolution: Resolution
    ) -> tuple[int, int, int, int, int]:
        """(level, x, y, w, h): the box ``read_rect`` reads, in the coordinates of the level it reads it from."""
        if self.info.mpp is None:
            raise SlideError(missing_mpp_message(self.uri))
        level = self.best_level(resolution)
        ds = self.info.level_downsamples[level]
        (target_x, target_y), (level_x, level_y) = axes(resolution), self.info.level_mpp(level)
        read_w = max(1, int(round(size[0] * target_x / level_x)))
        read_h = max(1, int(round(size[1] * target_y / level_y)))
        return level, int(location[0] // ds), int(location[1] // ds), read_w, read_h

    def read_boxes(
        self, boxes: Iterable[tuple[int, int, int, int]], resolution: Resolution, size_px: int, read_ahead: int = 0
    ) -> Iterator[np.ndarray]:
        """Patches for level-0 boxes ``(x, y, w0, h0)``; raster-ordered boxes make every tile decode once.

        With ``read_ahead > 0`` one helper thread reads up to that many patches ahead while the caller scores and
        encodes; the reader is then used by that thread alone, so it is never shared. The codecs release the GIL.
        """
        locations = [(x, y) for x, y, _w0, _h0 in boxes]
        size = (size_px, size_px)
        if self._levels is not None:
            self._cache.capacity = self._band_cache_bytes(resolution, size_px)
            self._cache.last_use = self._last_uses(locations, size, resolution)
        try:
            if read_ahead <= 0:
                for index, location in enumerate(locations):
                    yield self._read_box(index, location, size, resolution)
            else:
                yield from self._read_boxes_ahead(locations, size, resolution, read_ahead)
        finally:
            self._cache.last_use = None  # other reads cache by recency alone

    def _read_boxes_ahead(
        self, locations: list[tuple[int, int]], size: tuple[int, int], resolution: Resolution, read_ahead: int
    ) -> Iterator[np.ndarray]:
        pending: deque[Future] = deque()
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="pathgen-read") as pool:
            try:
                for index, location in enumerate(locations):
                    pending.append(pool.submit(self._read_box, index, location, size, resolution))
                    if len(pending) > read_ahead:
                        yield pending.popleft().result()
                while pending:
                    yield pending.popleft().result()
            finally:
                for future in pending:
                    future.cancel()

    def _read_box(
        self, index: int, location: tuple[int, int], size: tuple[int, int], resolution: Resolution
    ) -> np.ndarray:
        self._cache.now = index
        return self.read_rect(location, size, resolution)

    def _last_uses(
        self, locations: list[tuple[int, int]], size: tuple[int, int], resolution: Resolution
    ) -> dict[tuple, int] | None:
        """For each tile the boxes touch, the index of the last box that touches it (None without an MPP: then
        every read raises the missing-MPP error).

        Tiles on the rows of tiles under the last box are left out, so they stay by recency alone: a raster read in
        batches (extraction reads 512 cells a call) goes on along those rows in the next call, which finds them."""
        if self.info.mpp is None or not locations:
            return None
        last: dict[tuple, int] = {}
        for index, location in enumerate(locations):
            level, x, y, w, h = self._level_box(location, size, resolution)
            tiles = self._levels[level]
            for tx, ty in tiles.tiles_under(x, y, w, h):
                last[(tiles.key, tx, ty)] = index
        rows = [ty for _, ty in tiles.tiles_under(x, y, w, h)]  # the last box's
        first_row = min(rows) if rows else math.inf
        return {key: index for key, index in last.items() if key[2] < first_row}

    def _band_cache_bytes(self, resolution: Resolution, size_px: int) -> int:
        """Enough tiles for one band of patches across the slide plus the next: raster order then decodes each
        tile once, and memory stays bounded by the slide's width, not its area."""
        read_level = self.best_level(resolution)
        level = self._levels[read_level]
        read_h = size_px * axes(resolution)[1] / self.info.level_mpp(read_level)[1]
        rows = math.ceil(read_h / level.tile_h) + 2
        tile_bytes = level.tile_w * level.tile_h * 3
        return int(min(self._max_cache, max(32 * 2**20, rows * level.tiles_across * tile_bytes * 1.1)))

    def overview(self, downsample: float) -> tuple[np.ndarray, float]:
        """The whole slide at about ``downsample`` x level 0: (RGB image, its exact downsample in x)."""
        level = 0
        for i, ds in enumerate(self.info.level_downsamples):
            if ds <= downsample * (1 + MPP_TOLERANCE):
                level = i
        w, h = self.info.level_dimensions[level]
        out_w = max(1, int(round(self.info.width / downsample)))
        out_h = max(1, int(round(self.info.height / downsample)))
        if w * h * 3 <= OVERVIEW_BAND_BYTES or (out_w, out_h) == (w, h):
            pixels = self.read_level(level, 0, 0, w, h)
            if (out_w, out_h) != (w, h):
                pixels = cv2.resize(pixels, (out_w, out_h), interpolation=cv2.INTER_AREA)
        else:
            pixels = self._overview_in_bands(level, out_w, out_h)
        self._cache.clear()
        return pixels, self.info.width / out_w

    def _overview_in_bands(self, level: int, out_w: int, out_h: int) -> np.ndarray:
        """A large level (a single-level or stripped slide) read and shrunk in bands of rows: the level is never held
        whole, only one band of it and the overview."""
        w, h = self.info.level_dimensions[level]
        pixels = np.empty((out_h, out_w, 3), np.uint8)
        step = max(1, int(OVERVIEW_BAND_BYTES / (w * 3 * h / out_h)))  # overview rows per band
        for o0 in range(0, out_h, step):
            o1 = min(out_h, o0 + step)
            y0, y1 = round(o0 * h / out_h), (h if o1 == out_h else round(o1 * h / out_h))
            band = self.read_level(level, 0, y0, w, max(1, y1 - y0))
            pixels[o0:o1] = cv2.resize(band, (out_w, o1 - o0), interpolation=cv2.INTER_AREA)
            self._cache.clear()
        return pixels

    def close(self) -> None:
        for handle in (self._tiff, self._slide):
            try:
                if handle is not None:
                    handle.close()
            except Exception:  # noqa: BLE001 - closing a broken handle must not hide the real error
                pass
        self._cache.clear()

    def __enter__(self) -> SlideReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def missing_mpp_message(uri: str) -> str:
    name = os.path.basename(str(uri).rstrip("/"))
    return (
        f"{name} records no microns-per-pixel (MPP), so patches cannot be cut at a physical scale; "
        f"set slides.mpp_overrides.{name.rsplit('.', 1)[0]}=<mpp> for this slide or slides.default_mpp=<mpp> "
        "for all such slides"
    )
