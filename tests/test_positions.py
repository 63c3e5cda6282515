"""PathGen-1.6M positions are level-0 boxes of 672 px whatever the scanner: on a 40x (0.25 µm/px) slide a patch
re-extracted from a PathGen JSON source is exactly that box, not patch_px at target_mpp (1,344 level-0 px)."""

import io
import json

import cv2
import imagecodecs
import numpy as np
import openslide
import pytest
from PIL import Image

from pathgen.settings import load_settings
from tasks.slides.extract import extract_slide, shard_key, slide_json_key
from tasks.slides.hashing import slide_extraction_hash
from tasks.slides.shard import patch_id_for, read_shard
from tasks.slides.sources import resolve_sources
from tasks.store.objects import Store

from .conftest import write_tiff_slide

MPP = 0.25
BOX = 672
# On tissue, not tile-aligned, inside the 4000 x 3000 slide (a 2x box too, for the wrong read), and one on glass.
POSITIONS = [(1700, 150), (2011, 1237), (1763, 601), (300, 900)]
SLIDE = "forty-x"


@pytest.fixture(scope="module")
def slide_40x(tmp_path_factory, cmu_rgb) -> tuple:
    """A 4000 x 3000 pyramidal TIFF at 0.25 µm/px of real tissue (CMU-1 at 0.5 µm/px, upsampled 2x), and a
    PathGen JSON file naming boxes on it, positions as strings as in the paper's file."""
    folder = tmp_path_factory.mktemp("forty")
    rgb = cv2.resize(cmu_rgb, None, fx=2, fy=2, interpolation=cv2.INTER_CUBIC)
    rgb = np.ascontiguousarray(rgb[1000:4000, 200:4200])
    assert rgb.shape == (3000, 4000, 3)
    path = write_tiff_slide(folder / f"{SLIDE}.tif", rgb, mpp=MPP)
    records = [
        {"wsi_id": SLIDE, "position": [str(x), str(y)], "caption": f"caption {i}"} for i, (x, y) in enumerate(POSITIONS)
    ]
    source = folder / "pathgen.json"
    source.write_text(json.dumps(records))
    return path, source


def _settings(tmp_path, folder, resample: bool | None = None, **overrides):
    base = {"store": str(tmp_path / "store"), "retries.io_retries": 0, "slides.roots": [str(folder)]}
    settings = load_settings(overrides={**base, **overrides}, environ={})
    if resample is not None:  # works before and after PatchSettings has the field
        settings = settings.model_copy(
            update={"patch": settings.patch.model_copy(update={"positions_resample": resample})}
        )
    return settings


def _extract(source, settings):
    (ref,) = resolve_sources([str(source)], settings)
    assert ref.positions == POSITIONS
    store = Store(settings.store)
    outcome = extract_slide(ref, settings, store)
    assert outcome.status == "ok", outcome.error
    with store.open(shard_key(ref.slide_id)) as handle:
        rows = read_shard(handle).to_pylist()
    return ref, store, sorted(rows, key=lambda r: (r["x"], r["y"]))


def _box(path, x, y, side) -> np.ndarray:
    with openslide.OpenSlide(str(path)) as slide:
        return np.asarray(slide.read_region((x, y), 0, (side, side)).convert("RGB")).astype(np.float32)


def _mad(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a.astype(np.float32) - b.astype(np.float32)).mean())


def _jpeg(rgb: np.ndarray) -> np.ndarray:
    """What the factory's encoder (q90) makes of these pixels, decoded."""
    return imagecodecs.jpeg8_decode(imagecodecs.jpeg8_encode(rgb.astype(np.uint8), level=90))


def _decoded(row) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(row["image"])).convert("RGB"))


def test_positions_on_a_40x_slide_are_the_papers_level0_box(tmp_path, slide_40x):
    path, source = slide_40x
    # The defaults (target_mpp 0.5, patch_px 672) would read 1,344 level-0 px on this slide: they must not apply.
    settings = _settings(tmp_path, path.parent)
    assert settings.patch.target_mpp == 0.5 and settings.patch.patch_px == BOX
    ref, store, rows = _extract(source, settings)
    assert [(r["x"], r["y"]) for r in rows] == sorted(POSITIONS)
    for row in rows:
        x, y = row["x"], row["y"]
        assert (row["w0"], row["h0"]) == (BOX, BOX)
        got = _decoded(row)
        assert got.shape == (BOX, BOX, 3) and row["patch_px"] == BOX
        exact = _box(path, x, y, BOX)
        # JPEG q90 of the very same pixels: small differences only, and what our encoder makes of them
        per_channel = np.abs(got.astype(np.float32) - exact).mean(axis=(0, 1))
        assert per_channel.mean() < 3 and per_channel.max() < 5, per_channel
        assert _mad(got, _jpeg(exact)) < 0.5  # (tile decoders may differ by a level here and there)
        # What the old code produced: patch_px at target_mpp, 1,344 level-0 px downsampled. The test sees it.
        wrong = cv2.resize(_box(path, x, y, 2 * BOX), (BOX, BOX), interpolation=cv2.INTER_AREA)
        assert _mad(got, wrong) > 5 * max(_mad(got, exact), 1.0), (_mad(got, wrong), _mad(got, exact))
        if row["tissue_fraction"] > 0.5:  # on tissue a box 8 px off is far too: the offset is right, not just the scale
            assert _mad(got, _box(path, x + 8, y + 8, BOX)) > 3 * _mad(got, exact)
        # recorded as what it is: the box, at the slide's own scale, and an id of that box at that scale
        assert row["mpp"] == pytest.approx(MPP) and row["slide_mpp"] == pytest.approx(MPP) and row["level"] == 0
        assert row["patch_id"] == patch_id_for(SLIDE, (x, y, BOX, BOX), MPP, BOX)
    assert sorted(r["source_caption"] for r in rows) == [f"caption {i}" for i in range(len(POSITIONS))]
    record = store.read_json(slide_json_key(SLIDE))
    assert record["target_mpp"] == pytest.approx(MPP) and record["patch_px"] == BOX
    assert record["upsampled"] is False and record["read_level"] == 0
    assert record["selection"] == {"method": "positions", "box_px": BOX, "resample": False}


def test_positions_resampled_to_patch_px_when_asked(tmp_path, slide_40x):
    path, source = slide_40x
    settings = _settings(tmp_path, path.parent, resample=True, **{"patch.patch_px": 224})
    ref, store, rows = _extract(source, settings)
    scale = MPP * BOX / 224  # 0.75 µm/px: the same 672 px box, three times coarser
    for row in rows:
        x, y = row["x"], row["y"]
        assert (row["w0"], row["h0"]) == (BOX, BOX) and row["patch_px"] == 224
        assert row["mpp"] == pytest.approx(scale) and row["slide_mpp"] == pytest.approx(MPP)
        assert row["patch_id"] == patch_id_for(SLIDE, (x, y, BOX, BOX), scale, 224)
        got = _decoded(row)
        assert got.shape == (224, 224, 3)
        exact = cv2.resize(_box(path, x, y, BOX).astype(np.uint8), (224, 224), interpolation=cv2.INTER_AREA)
        assert _mad(got, _jpeg(exact)) < 0.5  # the box, resampled, then encoded
        assert _mad(got, exact) < 8  # JPEG q90 of a 3x reduction keeps more edges than of the 2x-upsampled slide
        wrong = cv2.resize(_box(path, x, y, 2 * BOX), (224, 224), interpolation=cv2.INTER_AREA)
        assert _mad(got, wrong) > 5 * max(_mad(got, exact), 1.0)
    record = store.read_json(slide_json_key(SLIDE))
    assert record["target_mpp"] == pytest.approx(scale) and record["patch_px"] == 224
    assert record["selection"]["resample"] is True


def test_positions_hash_follows_what_changes_their_patches(tmp_path, slide_40x):
    path, source = slide_40x
    folder = path.parent

    def positions_hash(resample=None, **overrides):
        settings = _settings(tmp_path, folder, resample, **overrides)
        (ref,) = resolve_sources([str(source)], settings)
        return slide_extraction_hash(ref, settings)

    def grid_hash(resample=None, **overrides):
        settings = _settings(tmp_path, folder, resample, **overrides)
        (ref,) = resolve_sources([str(path)], settings)
        assert ref.positions is None
        return slide_extraction_hash(ref, settings)

    native = positions_hash()
    assert positions_hash(False) == native
    # target_mpp never applies to the boxes, patch_px only when they are resampled
    assert positions_hash(**{"patch.target_mpp": 0.25}) == native
    assert positions_hash(**{"patch.patch_px": 224}) == native
    resampled = positions_hash(True)
    assert resampled != native
    assert positions_hash(True, **{"patch.patch_px": 224}) != resampled
    assert positions_hash(**{"patch.positions_box_px": 512}) != native
    assert positions_hash(**{"patch.jpeg_quality": 80}) != native
    # a grid slide's hash ignores the positions settings and still follows target_mpp
    grid = grid_hash()
    assert grid_hash(True) == grid and grid_hash(**{"patch.positions_box_px": 512}) == grid
    assert grid_hash(**{"patch.target_mpp": 0.25}) != grid
