"""PathGen Factory: whole-slide images to pathology image-text pairs, and the models trained on them."""

__version__ = "0.1.0"
