"""Units-aware whole-slide reading: read a level-0 box at a target MPP, whatever the file.

Backends: openslide for local files it supports; tiffslide for remote URLs (ranged reads, no download) and for
TIFFs that openslide refuses. Where a level is a tiled TIFF page (Aperio SVS, generic pyramidal TIFF), a tile
reader decodes each touched tile once and serves overlapping patches from an LRU tile cache, which is what makes
extraction several times faster than per-patch ``read_region``. Neither library is safe to share across threads
in all cases: open one reader per worker (thread or process) and close it when done.

Memory budget of one slide's reader: the tile cache (``TILE_CACHE_BYTES``, 512 MiB, lowered to one band of patches
while extracting; ``read_boxes`` keeps only the tiles that boxes still to come share, about one row of tiles across
the slide in raster order), the overview (slide area / mask_downsample², x3 bytes) and one band of rows while the
overview is built (``OVERVIEW_BAND_BYTES``). A stripped (non-tiled) TIFF page is read the same way: an uncompressed
one in bands of full-width rows (``STRIP_BAND_BYTES``), never whole; a compressed one strip by strip, and a strip that
would decode to more than ``MAX_STRIP_BYTES`` is refused with the fix (convert the slide to a tiled pyramidal TIFF).
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict, deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from pathgen.errors import SlideError, is_transient
from tasks.slides.dicom import DicomSlide, is_dicom_series
from tasks.store.objects import is_remote, local_path, storage_options

# Levels whose MPP is within this relative tolerance of the target are read without resampling.
MPP_TOLERANCE = 0.02
MAX_PLAUSIBLE_MPP = 50.0  # µm/px: coarser than any microscope scan's level 0 (a 1x objective is ~10)
TILE_CACHE_BYTES = 512 * 2**20
STRIP_BAND_BYTES = 16 * 2**20  # rows of an uncompressed stripped page are read in bands of about this size
MAX_STRIP_BYTES = 256 * 2**20  # a compressed strip is decoded whole: larger than this decoded, the slide is refused
OVERVIEW_BAND_BYTES = 64 * 2**20  # the overview of a large level is read and shrunk in bands of about this size


@dataclass
class SlideInfo:
    uri: str
    vendor: str
    backend: str
    width: int
    height: int
    level_dimensions: list[tuple[int, int]]
    level_downsamples: list[float]
    mpp: float | None
    objective_power: float | None
    fast_tiles: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def level_mpp(self, level: int) -> float:
        assert self.mpp is not None
        return self.mpp * self.level_downsamples[level]


def _float_or_none(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and number > 0 else None


class _TileLevel:
    """Decodes tiles of one tiled TIFF page on demand, with an LRU cache shared by the reader."""

    def __init__(self, page, filehandle, cache: _TileCache, key: int) -> None:
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


class _StripLevel(_TileLevel):
    """A stripped (non-tiled) TIFF page read as full-width bands of rows, cached like tiles.

    Uncompressed: a band is ``STRIP_BAND_BYTES`` of rows read straight from the file, whatever the strip size (a
    20,000 x 20,000 single-strip page is never decoded whole). Compressed: a band is one strip, decoded whole, so a
    strip larger than ``MAX_STRIP_BYTES`` decoded is refused with a SlideError naming the slide and the fix.
    """

    def __init__(self, page, filehandle, cache: _TileCache, key: int, name: str) -> None:
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


class _TileCache:
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


class SlideReader:
    """Reads boxes of a slide at a physical resolution. Not thread-safe: one per worker."""

    def __init__(
        self,
        uri: str,
        *,
        mpp_override: float | None = None,
        storage_opts: dict[str, Any] | None = None,
        tile_cache_bytes: int = TILE_CACHE_BYTES,
        fast_tiles: bool = True,
    ) -> None:
        self.uri = str(uri)
        self._slide: Any = None
        self._tiff: Any = None
        self._fh: Any = None
        self._levels: list[_TileLevel] | None = None
        self._cache = _TileCache(tile_cache_bytes)
        self._max_cache = tile_cache_bytes
        remote = is_remote(self.uri)
        opts = storage_opts if storage_opts is not None else storage_options(self.uri)
        if remote:
            self._open_remote(opts)
        else:
            self._open_local()
        if fast_tiles:
            self._levels = self._tile_levels()
        self.info.fast_tiles = self._levels is not None
        if mpp_override is not None:
            self.info.mpp = float(mpp_override)
            self.info.extra["mpp_source"] = "override"

    # -- opening -------------------------------------------------------------------------------------------

    def _open_local(self) -> None:
        import openslide

        path = local_path(self.uri)
        if not os.path.exists(path):
            raise SlideError(f"slide {path} does not exist; check the path or the source list")
        if is_dicom_series(path):  # a DICOM series folder, or one of its .dcm files
            self._path = path
            self._slide = DicomSlide(path)
            self._backend = "wsidicom"
            self._read_metadata()
            return
        if os.path.isdir(path):
            raise SlideError(f"{path} is a folder, not a slide; pass the folder as a source to extract its slides")
        if os.path.getsize(path) == 0:
            raise SlideError(f"slide {path} is an empty (zero-byte) file; download it again")
        self._path = path
        try:
            self._slide = openslide.OpenSlide(path)
            self._backend = "openslide"
        except (openslide.OpenSlideUnsupportedFormatError, openslide.OpenSlideError) as first:
            try:
                import tiffslide

                self._slide = tiffslide.TiffSlide(path)
                self._backend = "tiffslide"
                self._read_metadata()
                return
            except Exception as second:  # noqa: BLE001 - both readers refused: say why, in one sentence
                raise SlideError(_unreadable_message(path, first, second)) from None
        self._read_metadata()

    def _open_remote(self, opts: dict[str, Any]) -> None:
        import tiffslide

        # tiffslide reads the TIFF structure and tiles with ranged requests through fsspec: no full download.
        try:
            self._slide = tiffslide.TiffSlide(self.uri, storage_options=opts)
        except FileNotFoundError:
            raise SlideError(f"slide {self.uri} does not exist; check the URL or the source list") from None
        except Exception as exc:
            if is_transient(exc):
                raise
            raise SlideError(
                f"{self.uri} is not a readable whole-slide image ({type(exc).__name__}: {exc}); "
                "check that the object is a complete SVS or pyramidal TIFF"
            ) from None
        self._backend = "tiffslide"
        self._read_metadata()

    def _read_metadata(self) -> None:
        props = dict(self._slide.properties)
        prefix = self._backend  # openslide | tiffslide | wsidicom: each names its properties after itself
        mpp_x = _float_or_none(props.get(f"{prefix}.mpp-x"))
        mpp_y = _float_or_none(props.get(f"{prefix}.mpp-y"))
        mpp = (mpp_x + mpp_y) / 2 if mpp_x and mpp_y else (mpp_x or mpp_y)
        if mpp and mpp > MAX_PLAUSIBLE_MPP:
            # A screen resolution tag (72 dpi reads as 352.8 µm/px), not a microscope's: no pixel size is known.
            mpp = None
        vendor = props.get(f"{prefix}.vendor") or "unknown"
        dims = [tuple(int(v) for v in d) for d in self._slide.level_dimensions]
        self.info = SlideInfo(
            uri=self.uri,
            vendor=str(vendor),
            backend=self._backend,
            width=dims[0][0],
            height=dims[0][1],
            level_dimensions=dims,
            level_downsamples=[float(d) for d in self._slide.level_downsamples],
            mpp=mpp,
            objective_power=_float_or_none(props.get(f"{prefix}.objective-power")),
            extra={"mpp_source": "metadata" if mpp else None},
        )

    def _tile_levels(self) -> list[_TileLevel] | None:
        """Tile-level access where every pyramid level is a tiled TIFF page that tifffile decodes."""
        if self.info.vendor in ("hamamatsu", "mirax", "ventana", "philips", "leica", "zeiss"):
            return None
        import tifffile

        try:
            if self._backend == "tiffslide":
                tiff = self._slide.ts_tifffile
            else:
                tiff = self._tiff = tifffile.TiffFile(self._path)
            levels = tiff.series[0].levels
            pages = [lvl.keyframe for lvl in levels]
            if len(pages) != len(self.info.level_dimensions):
                return None
            for page in pages:
                _refuse_whole_page(page, self.uri)
            for page, (w, h) in zip(pages, self.info.level_dimensions, strict=True):
                if (page.imagewidth, page.imagelength) != (w, h):
                    return None
                if page.planarconfig != 1 or page.samplesperpixel < 3 or page.dtype != np.uint8:
                    return None
                if getattr(page, "is_ndpi", False) or page.imagedepth != 1:
                    return None
            fh = tiff.filehandle
            name = os.path.basename(self.uri.rstrip("/"))
            return [
                _TileLevel(page, fh, self._cache, i) if page.is_tiled else _StripLevel(page, fh, self._cache, i, name)
                for i, page in enumerate(pages)
            ]
        except SlideError:
            raise
        except Exception:  # noqa: BLE001 - the fast path is optional; the backend still reads everything
            return None

    # -- reading -------------------------------------------------------------------------------------------

    def best_level(self, mpp: float) -> int:
        """The coarsest level that is still at least as fine as ``mpp`` (never upsample when avoidable)."""
        best = 0
        for level in range(len(self.info.level_downsamples)):
            if self.info.level_mpp(level) <= mpp * (1 + MPP_TOLERANCE):
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
        self, location: tuple[int, int], size: tuple[int, int], resolution: float, units: str = "mpp"
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
        self, location: tuple[int, int], size: tuple[int, int], resolution: float
    ) -> tuple[int, int, int, int, int]:
        """(level, x, y, w, h): the box ``read_rect`` reads, in the coordinates of the level it reads it from."""
        if self.info.mpp is None:
            raise SlideError(missing_mpp_message(self.uri))
        level = self.best_level(resolution)
        ds = self.info.level_downsamples[level]
        scale = resolution / self.info.level_mpp(level)
        read_w = max(1, int(round(size[0] * scale)))
        read_h = max(1, int(round(size[1] * scale)))
        return level, int(location[0] // ds), int(location[1] // ds), read_w, read_h

    def read_boxes(
        self, boxes: Iterable[tuple[int, int, int, int]], resolution: float, size_px: int, read_ahead: int = 0
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
                return
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
        finally:
            self._cache.last_use = None  # other reads cache by recency alone

    def _read_box(self, index: int, location: tuple[int, int], size: tuple[int, int], resolution: float) -> np.ndarray:
        self._cache.now = index
        return self.read_rect(location, size, resolution)

    def _last_uses(
        self, locations: list[tuple[int, int]], size: tuple[int, int], resolution: float
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

    def _band_cache_bytes(self, resolution: float, size_px: int) -> int:
        """Enough tiles for one band of patches across the slide plus the next: raster order then decodes each
        tile once, and memory stays bounded by the slide's width, not its area."""
        level = self._levels[self.best_level(resolution)]
        read_h = size_px * resolution / self.info.level_mpp(self.best_level(resolution))
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
            # A large level (a single-level or stripped slide) is read and shrunk in bands of rows: the level is
            # never held whole, only one band of it and the overview.
            pixels = np.empty((out_h, out_w, 3), np.uint8)
            step = max(1, int(OVERVIEW_BAND_BYTES / (w * 3 * h / out_h)))  # overview rows per band
            for o0 in range(0, out_h, step):
                o1 = min(out_h, o0 + step)
                y0, y1 = round(o0 * h / out_h), (h if o1 == out_h else round(o1 * h / out_h))
                band = self.read_level(level, 0, y0, w, max(1, y1 - y0))
                pixels[o0:o1] = cv2.resize(band, (out_w, o1 - o0), interpolation=cv2.INTER_AREA)
                self._cache.clear()
        self._cache.clear()
        return pixels, self.info.width / out_w

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


TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def _unreadable_message(path: str, first: BaseException, second: BaseException) -> str:
    name = os.path.basename(path)
    with open(path, "rb") as handle:
        head = handle.read(4)
    size = os.path.getsize(path)
    if head in TIFF_MAGIC:
        return (
            f"{name} starts like a TIFF but its structure cannot be read ({size} bytes; openslide: {first}; "
            f"tiffslide: {type(second).__name__}): it is probably truncated or corrupt; download it again"
        )
    return (
        f"{name} is not a readable whole-slide image (openslide: {first}; tiffslide: {type(second).__name__}); "
        "check that the file is a complete SVS, NDPI or pyramidal TIFF"
    )


def _refuse_whole_page(page, uri: str) -> None:
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


def missing_mpp_message(uri: str) -> str:
    name = os.path.basename(str(uri).rstrip("/"))
    return (
        f"{name} records no microns-per-pixel (MPP), so patches cannot be cut at a physical scale; "
        f"set slides.mpp_overrides.{name.rsplit('.', 1)[0]}=<mpp> for this slide or slides.default_mpp=<mpp> "
        "for all such slides"
    )
