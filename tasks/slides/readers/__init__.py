"""Whole-slide reading at a physical scale: ``open_slide(uri)`` gives a ``SlideReader`` for the slide's backend
(openslide, tiffslide or wsidicom), with a tile reader for TIFF pyramids. See ``base`` for the interface."""

from tasks.slides.readers.base import MPP_TOLERANCE, Resolution, SlideInfo, SlideReader, missing_mpp_message
from tasks.slides.readers.factory import open_slide

__all__ = [
    "MPP_TOLERANCE",
    "Resolution",
    "SlideInfo",
    "SlideReader",
    "missing_mpp_message",
    "open_slide",
]
