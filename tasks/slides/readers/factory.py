"""``open_slide``: the backend for a slide, chosen from where it is and what it is (as TIAToolbox's
``WSIReader.open``): a remote URL -> tiffslide; a DICOM series -> wsidicom; a local file -> openslide, else tiffslide
for a TIFF openslide refuses. A slide no backend reads is a SlideError saying why, in one sentence."""

from __future__ import annotations

import os
from typing import Any

from pathgen.errors import SlideError, is_transient
from tasks.slides.dicom import is_dicom_series
from tasks.slides.readers.backends import DicomReader, OpenSlideReader, TiffSlideReader
from tasks.slides.readers.base import SlideReader
from tasks.slides.readers.tiles import TILE_CACHE_BYTES
from tasks.store.objects import is_remote, local_path, storage_options

TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def open_slide(
    uri: str | os.PathLike,
    *,
    mpp_override: float | None = None,
    storage_opts: dict[str, Any] | None = None,
    tile_cache_bytes: int = TILE_CACHE_BYTES,
    fast_tiles: bool = True,
) -> SlideReader:
    """A reader of the slide at ``uri`` (a local path, ``file://`` or a remote URL); close it (or use ``with``).

    ``mpp_override`` replaces the scanner's MPP (both axes); ``storage_opts`` are fsspec's options for a remote URL
    (default: ``storage_options(uri)``); ``fast_tiles`` False reads through the backend alone."""
    uri = str(uri)
    options: dict[str, Any] = {
        "mpp_override": mpp_override,
        "tile_cache_bytes": tile_cache_bytes,
        "fast_tiles": fast_tiles,
    }
    if is_remote(uri):
        return _open_remote(uri, storage_opts if storage_opts is not None else storage_options(uri), options)
    return _open_local(uri, options)


def _open_remote(uri: str, storage_opts: dict[str, Any], options: dict[str, Any]) -> SlideReader:
    try:
        return TiffSlideReader.open(uri, storage_opts, **options)
    except FileNotFoundError:
        raise SlideError(f"slide {uri} does not exist; check the URL or the source list") from None
    except SlideError:
        raise
    except Exception as exc:
        if is_transient(exc):
            raise
        raise SlideError(
            f"{uri} is not a readable whole-slide image ({type(exc).__name__}: {exc}); "
            "check that the object is a complete SVS or pyramidal TIFF"
        ) from None


def _open_local(uri: str, options: dict[str, Any]) -> SlideReader:
    import openslide

    path = local_path(uri)
    if not os.path.exists(path):
        raise SlideError(f"slide {path} does not exist; check the path or the source list")
    if is_dicom_series(path):  # a DICOM series folder, or one of its .dcm files
        return DicomReader.open(uri, **options)
    if os.path.isdir(path):
        raise SlideError(f"{path} is a folder, not a slide; pass the folder as a source to extract its slides")
    if os.path.getsize(path) == 0:
        raise SlideError(f"slide {path} is an empty (zero-byte) file; download it again")
    try:
        return OpenSlideReader.open(uri, **options)
    except (openslide.OpenSlideUnsupportedFormatError, openslide.OpenSlideError) as first:
        try:
            return TiffSlideReader.open(uri, **options)
        except SlideError:
            raise  # tiffslide reads it, and the slide's own problem is the news (a strip too large to decode)
        except Exception as second:  # noqa: BLE001 - both readers refused: say why, in one sentence
            raise SlideError(_unreadable_message(path, first, second)) from None


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
