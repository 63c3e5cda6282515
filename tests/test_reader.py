import dataclasses

import cv2
import imagecodecs
import numpy as np
import openslide
import pytest
import tifffile

from pathgen.errors import SlideError
from pathgen.settings import load_settings
from tasks.slides import extract
from tasks.slides.extract import committed_extraction, extract_slide, shard_key
from tasks.slides.hashing import slide_extraction_hash
from tasks.slides.readers import open_slide
from tasks.slides.shard import read_shard
from tasks.slides.sources import resolve_sources
from tasks.store.objects import Store

from .conftest import CMU, DAPI


def test_tile_reader_matches_openslide_pixel_for_pixel():
    with open_slide(str(CMU)) as reader, openslide.OpenSlide(str(CMU)) as reference:
        assert reader.info.fast_tiles and reader.info.vendor == "aperio"
        assert reader.info.mpp == pytest.approx(0.499)
        for x, y in [(0, 0), (117, 333), (1800, 2500), (2000, 2800)]:
            ours = reader.read_level(0, x, y, 300, 200)
            theirs = np.asarray(reference.read_region((x, y), 0, (300, 200)).convert("RGB"))
            # Outside the image openslide is transparent (converted to black); we return glass (white).
            inside = (slice(0, max(0, min(200, 2967 - y))), slice(0, max(0, min(300, 2220 - x))))
            assert np.array_equal(ours[inside], theirs[inside])


def test_boxes_read_in_raster_order_decode_each_tile_once():
    with open_slide(str(CMU)) as reader:
        boxes = [(x, y, 480, 480) for y in range(0, 2400, 480) for x in range(0, 1920, 480)]
        patches = list(reader.read_boxes(boxes, reader.info.mpp, 480))
        assert len(patches) == len(boxes) and patches[0].shape == (480, 480, 3)
        tiles_touched = 8 * 10  # 240 px tiles under a 1920 x 2400 area
        assert reader._cache.misses == tiles_touched


def test_read_ahead_thread_gives_the_same_patches():
    boxes = [(x, y, 300, 300) for y in range(0, 2400, 300) for x in range(0, 1800, 300)]
    with open_slide(str(CMU)) as a, open_slide(str(CMU)) as b:
        serial = list(a.read_boxes(boxes, 0.499, 300, read_ahead=0))
        ahead = list(b.read_boxes(boxes, 0.499, 300, read_ahead=3))
    assert all(np.array_equal(p, q) for p, q in zip(serial, ahead, strict=True))


def test_read_rect_at_a_coarser_mpp_resamples():
    with open_slide(str(CMU)) as reader:
        patch = reader.read_rect((0, 0), (224, 224), resolution=1.0)
        assert patch.shape == (224, 224, 3)
        # 224 px at 1.0 µm/px covers ~449 level-0 px: compare with a direct downscale
        full = reader.read_level(0, 0, 0, 449, 449)
        expected = cv2.resize(full, (224, 224), interpolation=cv2.INTER_AREA)
        assert np.abs(patch.astype(int) - expected.astype(int)).mean() < 2.0


def test_ndpi_uses_openslide_and_its_pyramid():
    with open_slide(str(DAPI)) as reader:
        assert reader.info.vendor == "hamamatsu" and not reader.info.fast_tiles
        assert len(reader.info.level_dimensions) > 1
        assert reader.best_level(0.85) == 1  # level 2 (0.913 µm/px) is too coarse: read level 1, downscale
        assert reader.best_level(0.9) == 2  # within 2%: read level 2 as it is
        assert reader.read_rect((1000, 1000), (64, 64), 0.5).shape == (64, 64, 3)


def test_missing_mpp_names_both_fixes(bad_slides):
    with open_slide(str(bad_slides["no_mpp"])) as reader:
        assert reader.info.mpp is None
        with pytest.raises(SlideError, match=r"mpp_overrides.*default_mpp"):
            reader.read_rect((0, 0), (10, 10), 0.5)


@pytest.mark.parametrize(
    "kind, message",
    [
        ("zero", "zero-byte"),
        ("text", "not a readable whole-slide image"),
        ("missing", "does not exist"),
    ],
)
def test_unreadable_files_raise_slide_errors(bad_slides, kind, message):
    with pytest.raises(SlideError, match=message):
        open_slide(str(bad_slides[kind]))


def _anisotropic_slide(path, rgb: np.ndarray, mpp_xy: tuple[float, float]):
    """A generic tiled TIFF (two levels) whose pixels are ``mpp_xy`` µm across and down, in its resolution tags."""
    resolution = {"resolution": (1e4 / mpp_xy[0], 1e4 / mpp_xy[1]), "resolutionunit": "CENTIMETER"}
    with tifffile.TiffWriter(path) as tif:
        tif.write(rgb, tile=(256, 256), photometric="rgb", compression="zlib", metadata=None, **resolution)
        half = np.ascontiguousarray(rgb[::2, ::2])
        tif.write(
            half, tile=(256, 256), photometric="rgb", compression="zlib", metadata=None, subfiletype=1, **resolution
        )
    return path


def test_anisotropic_pixels_are_read_with_each_axis_at_its_own_scale(tmp_path, cmu_rgb):
    level0 = np.ascontiguousarray(cmu_rgb[:768, :1024])
    path = _anisotropic_slide(tmp_path / "aniso.tif", level0, (0.5, 1.0))
    with open_slide(str(path)) as reader:
        assert (reader.info.mpp_x, reader.info.mpp_y) == (0.5, 1.0) and reader.info.mpp == 0.75
        assert reader.info.fast_tiles and reader.info.level_mpp(1) == (1.0, 2.0)
        # Level 1 is 1.5 µm/px on average but 2.0 down: reading it for 1.6 µm/px would upsample down the slide.
        assert reader.best_level(1.6) == 0 and reader.best_level(2.0) == 1
        # 0.75 µm/px is the mean, but down the slide it is finer than the scan: those patches are upsampled.
        assert reader.info.upsampled_at(0.75) and not reader.info.upsampled_at(1.0)
        # 100 px at 1.0 µm/px span 200 level-0 px across and 100 down.
        patch = reader.read_rect((64, 32), (100, 100), 1.0)
        expected = cv2.resize(level0[32:132, 64:264], (100, 100), interpolation=cv2.INTER_AREA)
        assert np.array_equal(patch, expected)
        assert np.array_equal(reader.read_rect((64, 32), (50, 40), (0.5, 1.0)), level0[32:72, 64:114])


def test_an_anisotropic_slide_is_extracted_in_physically_square_patches(tmp_path, cmu_rgb):
    level0 = np.ascontiguousarray(cmu_rgb[:1536, :2048])
    path = _anisotropic_slide(tmp_path / "aniso.tif", level0, (0.25, 0.5))
    overrides = {"store": str(tmp_path / "store"), "patch.patch_px": 128, "patch.target_mpp": 1.0}
    settings = load_settings(overrides={**overrides, "selection.method": "all", "retries.io_retries": 0}, environ={})
    (ref,) = resolve_sources([str(path)], settings)
    store = Store(settings.store)
    outcome = extract_slide(ref, settings, store)
    assert outcome.status == "ok", outcome.error
    record = outcome.record
    assert (record.mpp_x, record.mpp_y, record.mpp) == (0.25, 0.5, 0.375)
    assert record.counts["grid_cells"] == (2048 // 512) * (1536 // 256)
    with store.open(shard_key(ref.slide_id)) as handle:
        table = read_shard(handle)
    row = table.slice(0, 1).to_pylist()[0]
    assert (row["w0"], row["h0"]) == (512, 256)  # 128 µm across and down
    assert row["level"] == 1  # (0.5, 1.0) µm/px: fine enough on both axes for 1.0 µm/px
    x, y = row["x"] // 2, row["y"] // 2
    box = np.ascontiguousarray(level0[::2, ::2])[y : y + 128, x : x + 256]
    patch = imagecodecs.jpeg8_decode(row["image"])
    resized = cv2.resize(box, (128, 128), interpolation=cv2.INTER_AREA)
    expected = imagecodecs.jpeg8_decode(imagecodecs.jpeg8_encode(resized, level=settings.patch.jpeg_quality))
    assert np.array_equal(patch, expected)


def test_an_earlier_mean_mpp_extraction_of_an_anisotropic_slide_is_not_current(tmp_path, cmu_rgb, monkeypatch):
    level0 = np.ascontiguousarray(cmu_rgb[:1536, :2048])
    aniso = _anisotropic_slide(tmp_path / "aniso.tif", level0, (0.25, 0.5))
    square = _anisotropic_slide(tmp_path / "square.tif", level0, (0.5, 0.5))
    overrides = {"store": str(tmp_path / "store"), "patch.patch_px": 128, "patch.target_mpp": 1.0}
    settings = load_settings(overrides={**overrides, "selection.method": "random", "retries.io_retries": 0}, environ={})
    aniso_ref, square_ref = resolve_sources([str(aniso), str(square)], settings)
    store = Store(settings.store)
    record = extract_slide(aniso_ref, settings, store).record
    assert record.status == "ok", record.error
    plain = slide_extraction_hash(aniso_ref, settings, record.source)
    assert record.extraction_hash != plain  # its non-square pixels are in its hash
    assert extract_slide(aniso_ref, settings, store).status == "skipped"  # and it stays current
    # Records written before the axes were kept apart (no mpp_x, mpp_y) under the hash without the key:
    earlier = record.model_copy(update={"mpp_x": None, "mpp_y": None, "extraction_hash": plain})
    monkeypatch.setattr(extract, "_good_record", lambda store, slide_id: earlier)
    assert committed_extraction(aniso_ref, settings, store)[2] is None  # read at the mean MPP: extracted again
    with_axes = earlier.model_copy(update={"mpp_x": 0.25, "mpp_y": 0.5})
    monkeypatch.setattr(extract, "_good_record", lambda store, slide_id: with_axes)
    assert committed_extraction(aniso_ref, settings, store)[2] is None
    square_hash, source, _ = committed_extraction(square_ref, settings, store)
    square_record = earlier.model_copy(
        update={"slide_id": square_ref.slide_id, "extraction_hash": square_hash, "source": source}
    )
    monkeypatch.setattr(extract, "_good_record", lambda store, slide_id: square_record)
    assert committed_extraction(square_ref, settings, store)[2] is not None  # square pixels: still current
    # and its axes are recorded, so that later plans need not open the slide's header again
    upgraded = store.read_json(extract.slide_json_key(square_ref.slide_id))
    assert (upgraded["mpp_x"], upgraded["mpp_y"], upgraded["extraction_hash"]) == (0.5, 0.5, square_hash)


def test_positions_on_an_anisotropic_slide_are_saved_as_exactly_their_level0_box(tmp_path, cmu_rgb):
    """A PathGen JSON position is a square level-0 box: with non-square pixels it is read at each axis's own scale,
    so the saved patch is those level-0 pixels and nothing resampled."""
    level0 = np.ascontiguousarray(cmu_rgb[:1536, :2048])
    path = _anisotropic_slide(tmp_path / "aniso.tif", level0, (0.25, 0.5))
    overrides = {"store": str(tmp_path / "store"), "patch.positions_box_px": 256, "selection.method": "all"}
    settings = load_settings(overrides={**overrides, "retries.io_retries": 0, "quality.min_sharpness": 0}, environ={})
    (ref,) = resolve_sources([str(path)], settings)
    ref = dataclasses.replace(ref, positions=[(128, 256), (512, 512)])
    outcome = extract_slide(ref, settings, Store(settings.store))
    assert outcome.status == "ok", outcome.error
    with Store(settings.store).open(shard_key(ref.slide_id)) as handle:
        rows = read_shard(handle).to_pylist()
    assert rows, "no patch kept"
    for row in rows:
        assert (row["w0"], row["h0"], row["patch_px"], row["level"]) == (256, 256, 256, 0)
        x, y = row["x"], row["y"]
        expected = level0[y : y + 256, x : x + 256]
        patch = imagecodecs.jpeg8_decode(row["image"])
        encoded = imagecodecs.jpeg8_encode(expected, level=settings.patch.jpeg_quality)
        assert np.array_equal(patch, imagecodecs.jpeg8_decode(encoded))
