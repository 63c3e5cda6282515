"""Slide features as h5 files in the layout CLAM and TRIDENT read, both ways.

One ``<slide_id>.h5`` per slide holds two datasets:

- ``features``: N x D float32, one row per patch;
- ``coords``: N x 2 integers, the patch's top-left corner ``(x, y)`` in LEVEL-0 pixels.

Readers and the attributes they use (the sources we followed):

- CLAM's MIL dataset (mahmoodlab/CLAM ``dataset_modules/dataset_generic.py``, ``Generic_MIL_Dataset``) opens
  ``<data_dir>/h5_files/<slide_id>.h5`` and reads ``f['features'][:]`` and ``f['coords'][:]``; its feature writer
  (``extract_features_fp.py`` with ``utils/file_utils.py:save_hdf5``) stores float32 features and int32 coords and NO
  attributes. Its patch bag (``dataset_modules/dataset_h5.py``, ``Whole_Slide_Bag_FP``) reads
  ``f['coords'].attrs['patch_level']`` and ``['patch_size']`` (the patch's side in pixels of that level).
- TRIDENT (mahmoodlab/TRIDENT ``trident/IO.py``: ``coords_to_h5``, ``save_h5``, ``read_coords``;
  ``trident/wsi_objects/WSI.py``) writes ``features`` with attrs ``name``/``encoder`` and ``coords`` with attrs
  ``patch_size`` (at the target magnification), ``patch_size_level0``, ``level0_magnification``,
  ``target_magnification``, ``overlap``, ``name``, ``level0_width``/``level0_height``; its slide encoders read
  ``coords.attrs['patch_size_level0']``.

So ``write_slide_h5`` puts ``patch_size``, ``patch_level`` (and ``patch_size_level0`` when known) on ``coords``,
``name``/``encoder`` on ``features``, and our own description (format tag, encoder identity, mpp, dimension,
count, plus the caller's extra attributes) on the file. ``read_slide_h5`` needs none of the attributes, so a file
written by CLAM reads as well as ours. Every write is atomic: a temporary file in the target folder, renamed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from tasks.files import write_atomic

FORMAT = "pathgen-slide-features/1"
FEATURES, COORDS = "features", "coords"
CLAM_SUBFOLDER = "h5_files"  # CLAM keeps its feature files under <feat_dir>/h5_files/


class FeaturesFileError(ValueError):
    """A features h5 file or folder that cannot be used; the message names the file and the fix."""


@dataclass(frozen=True)
class SlideFeatures:
    """One slide's patch features: ``features`` N x D float32, ``coords`` N x 2 level-0 (x, y), merged attributes."""

    slide_id: str
    features: torch.Tensor
    coords: np.ndarray
    attrs: dict[str, Any] = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    @property
    def patch_size(self) -> int | None:
        return _maybe_int(self.attrs.get("patch_size"))

    @property
    def patch_level(self) -> int | None:
        return _maybe_int(self.attrs.get("patch_level"))

    @property
    def mpp(self) -> float | None:
        value = self.attrs.get("mpp")
        return None if value is None else float(value)

    @property
    def encoder(self) -> str | None:
        value = self.attrs.get("encoder")
        return None if value in (None, "None") else str(value)


def write_slide_h5(
    path: str | os.PathLike[str],
    features: np.ndarray | torch.Tensor,
    coords: np.ndarray | torch.Tensor,
    *,
    patch_size: int,
    patch_level: int,
    mpp: float,
    encoder: str,
    patch_size_level0: int | None = None,
    extra_attrs: Mapping[str, Any] | None = None,
) -> Path:
    """Write one slide's features atomically (temporary file, then rename) and return the final path.

    ``patch_size`` is the patch's side in pixels of ``patch_level`` (CLAM's meaning: its patch bag reads
    ``read_region(xy, patch_level, (patch_size, patch_size))``); ``mpp`` the microns per pixel the features were
    taken at; ``encoder`` the encoder's identity (name and content digest). When the features were resampled from
    level 0, pass ``patch_level=0`` and the level-0 side as both ``patch_size`` and ``patch_size_level0``, so CLAM
    and TRIDENT each find the right area of the slide.
    """
    path = Path(path)
    feats, xy = _checked_arrays(path, features, coords)
    file_attrs = _file_attrs(path, feats, patch_size, patch_level, mpp, encoder, extra_attrs)
    coords_attrs = {"patch_size": int(patch_size), "patch_level": int(patch_level), "name": path.stem}
    if patch_size_level0 is not None:
        coords_attrs["patch_size_level0"] = int(patch_size_level0)

    def write(partial: Path) -> None:
        with h5py.File(partial, "w") as f:
            f.attrs.update(file_attrs)
            f.create_dataset(FEATURES, data=feats).attrs.update({"name": path.stem, "encoder": str(encoder)})
            f.create_dataset(COORDS, data=xy).attrs.update(coords_attrs)

    return write_atomic(path, write)


def read_slide_h5(path: str | os.PathLike[str]) -> SlideFeatures:
    """Read one slide's features, from our files or CLAM/TRIDENT ones (attributes optional)."""
    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            missing = [name for name in (FEATURES, COORDS) if not isinstance(f.get(name), h5py.Dataset)]
            if missing:
                raise FeaturesFileError(
                    f"{path}: no {' or '.join(repr(m) for m in missing)} dataset (it has: {', '.join(f) or 'nothing'});"
                    " a slide's features file needs 'features' (N x D) and 'coords' (N x 2), as CLAM and TRIDENT"
                    " write them"
                )
            feats, xy = f[FEATURES][()], f[COORDS][()]
            attrs = {**_attrs(f.attrs), **_attrs(f[FEATURES].attrs), **_attrs(f[COORDS].attrs)}
    except FileNotFoundError:
        raise FeaturesFileError(f"{path}: no such features file; check the path or export the features") from None
    except OSError as exc:
        raise FeaturesFileError(f"{path}: not a readable h5 file ({exc}); re-export or re-copy it") from None
    feats, xy = _checked_arrays(path, feats, xy)
    return SlideFeatures(slide_id=path.stem, features=torch.from_numpy(feats), coords=xy, attrs=attrs)


def read_features_folder(folder: str | os.PathLike[str]) -> dict[str, SlideFeatures]:
    """Read every ``<slide_id>.h5`` of a folder (or of its CLAM ``h5_files/`` subfolder), keyed by slide id.

    All slides must share one feature dimension: features from two encoders cannot train one model.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FeaturesFileError(f"{folder}: not a folder; pass the folder holding the <slide_id>.h5 files")
    files = _h5_files(folder)
    if not files and (folder / CLAM_SUBFOLDER).is_dir():
        files = _h5_files(folder / CLAM_SUBFOLDER)
    if not files:
        raise FeaturesFileError(
            f"{folder}: no <slide_id>.h5 files here or in {CLAM_SUBFOLDER}/; export them with"
            " `pathgen export features --format h5 --out DIR` or point at CLAM's feature folder"
        )
    slides: dict[str, SlideFeatures] = {}
    first: SlideFeatures | None = None
    for file in files:
        slide = read_slide_h5(file)
        if first is not None and slide.dim != first.dim:
            raise FeaturesFileError(
                f"{file}: features have {slide.dim} dimensions but {first.slide_id}.h5 has {first.dim}; all slides"
                " of a folder must come from the same encoder, so re-extract the odd ones or split the folder"
            )
        first = first or slide
        slides[slide.slide_id] = slide
    return slides


def _h5_files(folder: Path) -> list[Path]:
    # Hidden names are our own unfinished temporary files (and editors' droppings), never a slide.
    return sorted(p for p in folder.glob("*.h5") if p.is_file() and not p.name.startswith("."))


def _checked_arrays(path: Path, features: Any, coords: Any) -> tuple[np.ndarray, np.ndarray]:
    feats = features.detach().cpu().numpy() if isinstance(features, torch.Tensor) else np.asarray(features)
    xy = coords.detach().cpu().numpy() if isinstance(coords, torch.Tensor) else np.asarray(coords)
    if feats.ndim != 2:
        raise FeaturesFileError(
            f"{path}: 'features' has shape {feats.shape}; it must be 2-D, one row per patch (N x D)"
        )
    if feats.dtype.kind not in "fiu":
        raise FeaturesFileError(f"{path}: 'features' has dtype {feats.dtype}; it must hold numbers")
    if xy.ndim != 2 or xy.shape[1] != 2:
        raise FeaturesFileError(f"{path}: 'coords' has shape {xy.shape}; it must be N x 2 level-0 (x, y)")
    if len(feats) != len(xy):
        raise FeaturesFileError(
            f"{path}: {len(feats)} feature rows but {len(xy)} coords; each patch needs one of each, re-export it"
        )
    if len(feats) == 0:
        raise FeaturesFileError(f"{path}: no patches; a slide with no tissue patches has no features to use")
    return feats.astype(np.float32, copy=False), _integer_coords(path, xy)


def _integer_coords(path: Path, xy: np.ndarray) -> np.ndarray:
    if xy.dtype.kind in "iu":
        return xy.astype(np.int64, copy=False)
    if xy.dtype.kind == "f" and np.isfinite(xy).all() and (xy == np.round(xy)).all():
        return xy.astype(np.int64)  # some tools store whole pixel positions as floats
    raise FeaturesFileError(f"{path}: 'coords' are not whole level-0 pixel positions (dtype {xy.dtype})")


def _file_attrs(
    path: Path,
    feats: np.ndarray,
    patch_size: int,
    patch_level: int,
    mpp: float,
    encoder: str,
    extra: Mapping[str, Any] | None,
) -> dict[str, Any]:
    if patch_size <= 0 or patch_level < 0 or not mpp > 0:
        raise FeaturesFileError(
            f"{path}: patch_size {patch_size}, patch_level {patch_level}, mpp {mpp}; need patch_size >= 1,"
            " patch_level >= 0 and mpp > 0"
        )
    ours = {
        "format": FORMAT,
        "encoder": str(encoder),
        "mpp": float(mpp),
        "patch_size": int(patch_size),
        "patch_level": int(patch_level),
        "feature_dim": int(feats.shape[1]),
        "num_patches": int(feats.shape[0]),
    }
    clash = sorted(set(extra or {}) & set(ours))
    if clash:
        raise FeaturesFileError(f"{path}: extra attribute(s) {', '.join(clash)} would overwrite the file's own")
    return {**ours, **{str(k): _attr_value(path, str(k), v) for k, v in (extra or {}).items()}}


def _attr_value(path: Path, key: str, value: Any) -> Any:
    if isinstance(value, (str, bool, int, float, np.generic)):
        return value
    if isinstance(value, (Mapping, list, tuple)):
        return json.dumps(value, sort_keys=True)  # TRIDENT's convention for structured attributes
    raise FeaturesFileError(
        f"{path}: attribute {key!r} is a {type(value).__name__}; give a string, number, bool, list or dict"
    )


def _attrs(attrs: h5py.AttributeManager) -> dict[str, Any]:
    return {key: _plain(attrs[key]) for key in attrs}


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _maybe_int(value: Any) -> int | None:
    return None if value is None else int(value)
