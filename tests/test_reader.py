import numpy as np
import openslide
import pytest

from pathgen.errors import SlideError
from tasks.slides.reader import SlideReader

from .conftest import CMU, DAPI


def test_tile_reader_matches_openslide_pixel_for_pixel():
    with SlideReader(str(CMU)) as reader, openslide.OpenSlide(str(CMU)) as reference:
        assert reader.info.fast_tiles and reader.info.vendor == "aperio"
        assert reader.info.mpp == pytest.approx(0.499)
        for x, y in [(0, 0), (117, 333), (1800, 2500), (2000, 2800)]:
            ours = reader.read_level(0, x, y, 300, 200)
            theirs = np.asarray(reference.read_region((x, y), 0, (300, 200)).convert("RGB"))
            # Outside the image openslide is transparent (converted to black); we return glass (white).
            inside = (slice(0, max(0, min(200, 2967 - y))), slice(0, max(0, min(300, 2220 - x))))
            assert np.array_equal(ours[inside], theirs[inside])


def test_boxes_read_in_raster_order_decode_each_tile_once():
    with SlideReader(str(CMU)) as reader:
        boxes = [(x, y, 480, 480) for y in range(0, 2400, 480) for x in range(0, 1920, 480)]
        patches = list(reader.read_boxes(boxes, reader.info.mpp, 480))
        assert len(patches) == len(boxes) and patches[0].shape == (480, 480, 3)
        tiles_touched = 8 * 10  # 240 px tiles under a 1920 x 2400 area
        assert reader._cache.misses == tiles_touched


def test_read_ahead_thread_gives_the_same_patches():
    boxes = [(x, y, 300, 300) for y in range(0, 2400, 300) for x in range(0, 1800, 300)]
    with SlideReader(str(CMU)) as a, SlideReader(str(CMU)) as b:
        serial = list(a.read_boxes(boxes, 0.499, 300, read_ahead=0))
        ahead = list(b.read_boxes(boxes, 0.499, 300, read_ahead=3))
    assert all(np.array_equal(p, q) for p, q in zip(serial, ahead, strict=True))


def test_read_rect_at_a_coarser_mpp_resamples():
    with SlideReader(str(CMU)) as reader:
        patch = reader.read_rect((0, 0), (224, 224), resolution=1.0)
        assert patch.shape == (224, 224, 3)
        # 224 px at 1.0 µm/px covers ~449 level-0 px: compare with a direct downscale
        full = reader.read_level(0, 0, 0, 449, 449)
        import cv2

        expected = cv2.resize(full, (224, 224), interpolation=cv2.INTER_AREA)
        assert np.abs(patch.astype(int) - expected.astype(int)).mean() < 2.0


def test_ndpi_uses_openslide_and_its_pyramid():
    with SlideReader(str(DAPI)) as reader:
        assert reader.info.vendor == "hamamatsu" and not reader.info.fast_tiles
        assert len(reader.info.level_dimensions) > 1
        assert reader.best_level(0.85) == 1  # level 2 (0.913 µm/px) is too coarse: read level 1, downscale
        assert reader.best_level(0.9) == 2  # within 2%: read level 2 as it is
        assert reader.read_rect((1000, 1000), (64, 64), 0.5).shape == (64, 64, 3)


def test_missing_mpp_names_both_fixes(bad_slides):
    with SlideReader(str(bad_slides["no_mpp"])) as reader:
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
        SlideReader(str(bad_slides[kind]))
