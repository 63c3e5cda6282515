"""One ``SlideReader`` per backend: what each opens, and which TIFF (if any) the tile reader decodes for it.

- openslide: local files in any format it supports (SVS, NDPI, MRXS, generic pyramidal TIFF...).
- tiffslide: remote URLs (ranged reads through fsspec, no download) and local TIFFs openslide refuses.
- wsidicom: a DICOM series folder (``tasks.slides.dicom.DicomSlide``, behind the openslide interface).
"""

from __future__ import annotations

from typing import Any

from tasks.slides.dicom import DicomSlide
from tasks.slides.readers.base import SlideReader
from tasks.store.objects import is_remote, local_path


class OpenSlideReader(SlideReader):
    backend = "openslide"

    @classmethod
    def open(cls, uri: str, **options: Any) -> OpenSlideReader:
        """Raises openslide's own errors for a file it does not read (the factory then tries tiffslide)."""
        import openslide

        return cls(uri, openslide.OpenSlide(local_path(uri)), **options)

    def _tiff_for_tiles(self) -> Any:
        import tifffile

        self._tiff = tifffile.TiffFile(local_path(self.uri))  # a handle of our own: openslide's is not reachable
        return self._tiff


class TiffSlideReader(SlideReader):
    backend = "tiffslide"

    @classmethod
    def open(cls, uri: str, storage_opts: dict[str, Any] | None = None, **options: Any) -> TiffSlideReader:
        """A local path or a remote URL; tiffslide reads a remote TIFF's structure and tiles with ranged requests."""
        import tiffslide

        source = uri if is_remote(uri) else local_path(uri)
        return cls(uri, tiffslide.TiffSlide(source, storage_options=storage_opts), **options)

    def _tiff_for_tiles(self) -> Any:
        return self._slide.ts_tifffile  # tiffslide's own: its file handle makes the same ranged reads


class DicomReader(SlideReader):
    backend = "wsidicom"

    @classmethod
    def open(cls, uri: str, **options: Any) -> DicomReader:
        return cls(uri, DicomSlide(local_path(uri)), **options)
