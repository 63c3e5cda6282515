"""DICOM whole-slide images (VL Whole Slide Microscopy), read with wsidicom behind the openslide interface the
reader uses (``properties``, ``level_dimensions``, ``level_downsamples``, ``read_region`` in level-0 coordinates).

A DICOM slide is a series: one folder of ``.dcm`` instances (one per pyramid level, plus label and overview
images). A folder holding ``.dcm`` files is one slide; a ``.dcm`` file stands for the series in its folder. MPP comes
from the DICOM pixel spacing of the base level.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pathgen.errors import SlideError, cut

DICOM_SUFFIX = ".dcm"


def dicom_files(folder: str | os.PathLike) -> list[Path]:
    root = Path(folder)
    return sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() == DICOM_SUFFIX)


def is_dicom_series(path: str | os.PathLike) -> bool:
    """A folder with .dcm files in it (a series folder), or a .dcm file."""
    path = Path(path)
    if path.is_dir():
        return bool(dicom_files(path))
    return path.suffix.lower() == DICOM_SUFFIX


class DicomSlide:
    """One DICOM WSI series, read through wsidicom."""

    def __init__(self, path: str | os.PathLike) -> None:
        from wsidicom import WsiDicom

        folder = Path(path) if Path(path).is_dir() else Path(path).parent
        files = dicom_files(folder)
        try:
            self._wsi = WsiDicom.open(files)
            levels = list(self._wsi.levels)
        except Exception as exc:  # noqa: BLE001 - a non-conforming file is the slide's content: one clear record
            raise SlideError(
                f"{folder} is not a readable DICOM whole-slide image ({type(exc).__name__}: {cut(str(exc), 200)}); "
                "check that every .dcm file of the series is a VL Whole Slide Microscopy instance"
            ) from None
        base = levels[0].size
        self._levels = [level.level for level in levels]
        self.level_dimensions = [(level.size.width, level.size.height) for level in levels]
        self.level_downsamples = [base.width / level.size.width for level in levels]
        spacing = self._wsi.mpp  # µm per pixel of the base level, from its pixel spacing
        self.properties: dict[str, Any] = {"wsidicom.vendor": "dicom"}
        if spacing is not None:
            self.properties |= {"wsidicom.mpp-x": str(spacing.width), "wsidicom.mpp-y": str(spacing.height)}

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> Image.Image:
        """RGBA like openslide: ``location`` at level 0, outside the image transparent (the reader makes it glass)."""
        width, height = self.level_dimensions[level]
        ds = self.level_downsamples[level]
        x, y = int(round(location[0] / ds)), int(round(location[1] / ds))
        out = np.zeros((size[1], size[0], 4), np.uint8)
        x0, y0, x1, y1 = max(0, x), max(0, y), min(width, x + size[0]), min(height, y + size[1])
        if x1 > x0 and y1 > y0:
            region = self._wsi.read_region((x0, y0), self._levels[level], (x1 - x0, y1 - y0))
            out[y0 - y : y1 - y, x0 - x : x1 - x, :3] = np.asarray(region.convert("RGB"))
            out[y0 - y : y1 - y, x0 - x : x1 - x, 3] = 255
        return Image.fromarray(out, "RGBA")

    def close(self) -> None:
        self._wsi.close()
