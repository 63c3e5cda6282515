"""Slide features from the store as CLAM/TRIDENT h5 files: one ``<slide_id>.h5`` per slide in a folder.

Each file holds ``features`` (N x D float32, as stored) and ``coords`` (N x 2, the patches' level-0 top-left
corners). The patches were resampled from level 0, so ``coords`` says ``patch_level`` 0 and ``patch_size`` the
level-0 side of a patch (also as ``patch_size_level0``): CLAM's patch bag and TRIDENT's slide encoders then both find
the right area of the slide (tasks/mil/h5.py).
"""

from __future__ import annotations

import json
from pathlib import Path

from tasks.features.store import featured_slides, features_hashes, read_features
from tasks.mil.h5 import write_slide_h5
from tasks.store.objects import Store


class FeaturesNotFound(ValueError):
    """No features, or not the ones asked for, in the store; the message lists what there is."""


def choose_features_hash(store: Store, features_hash: str | None) -> str:
    """``features_hash`` when the store holds it; None: the store's only one. Otherwise an error listing them."""
    found = features_hashes(store)
    listed = ", ".join(found)
    if features_hash is None:
        if len(found) == 1:
            return found[0]
        if not found:
            raise FeaturesNotFound(f"{store.url} holds no slide features; make them with `pathgen features SOURCE...`")
        raise FeaturesNotFound(f"{store.url} holds several features ({listed}); choose one with --features-hash")
    if features_hash not in found:
        raise FeaturesNotFound(
            f"{store.url} holds no features {features_hash}; it holds: {listed or 'none'} (pathgen features makes them)"
        )
    return features_hash


def export_h5(store: Store, features_hash: str | None, out_dir: str) -> list[Path]:
    """Write every featured slide of ``features_hash`` (None: the store's only one) as ``<out_dir>/<slide_id>.h5``;
    returns the paths written, sorted by slide id."""
    chosen = choose_features_hash(store, features_hash)
    slides = featured_slides(store, chosen)
    if not slides:
        raise FeaturesNotFound(f"features {chosen} in {store.url} hold no slide yet; run `pathgen features` first")
    written = []
    for slide_id in slides:
        table = read_features(store, chosen, slide_id)
        meta = table.meta
        identity = meta.get("encoder") or {}
        written.append(
            write_slide_h5(
                Path(out_dir) / f"{slide_id}.h5",
                table.features,
                table.coords,
                patch_size=int(meta["patch_size_level0"]),
                patch_level=0,
                mpp=float(meta["mpp"]),
                encoder=f"{identity.get('spec')} ({identity.get('digest')})",
                patch_size_level0=int(meta["patch_size_level0"]),
                extra_attrs={
                    "features_hash": chosen,
                    "encoder_identity": json.dumps(identity, sort_keys=True),
                    "random_weights": bool(meta.get("random_weights")),
                    "patch_px": int(meta["patch_px"]),
                    "slide_mpp": float(meta["slide_mpp"]),
                    "level0_width": int(meta["width"]),
                    "level0_height": int(meta["height"]),
                },
            )
        )
    return written
