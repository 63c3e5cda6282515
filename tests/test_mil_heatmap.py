"""The attention heatmap renderer (tasks/mil/heatmap.py): on a thumbnail tiled from a real Kather H&E tile, the
overlay is hot exactly on the boxes given high attention, the top-k panel holds the most attended patches in order,
the RANDOM WEIGHTS band appears only when asked, and bad inputs are named."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
from PIL import Image

from tasks.mil.heatmap import PATCH_CELL_PX, THUMBNAIL_MAX_PX, draw_heatmap, render_heatmap, viridis
from tasks.slides.pictures import BANNER_RGB
from tests.kather import KATHER

DOWNSAMPLE = 4.0
GRID = 8  # 8 x 8 patches of 75 thumbnail px (300 level-0 px) on a 600 x 600 thumbnail
CELL = 75
HOT = {(2, 5), (2, 6), (3, 5), (3, 6)}  # (row, col) of the high-attention region


def _thumbnail() -> np.ndarray:
    tile = np.asarray(Image.open(sorted((KATHER / "02_STROMA").glob("*.tif"))[0]).convert("RGB"))
    return np.tile(tile[:150, :150], (GRID * CELL // 150, GRID * CELL // 150, 1))


def _slide(seed: int = 0):
    rng = np.random.default_rng(seed)
    cells = [(r, c) for r in range(GRID) for c in range(GRID)]
    boxes = np.array(
        [(c * CELL * DOWNSAMPLE, r * CELL * DOWNSAMPLE, CELL * DOWNSAMPLE, CELL * DOWNSAMPLE) for r, c in cells]
    )
    attention = rng.uniform(0.001, 0.003, len(cells))
    for n, cell in enumerate(cells):
        if cell in HOT:
            attention[n] = 0.2 + 0.001 * n  # distinct values so the top order is known
    attention /= attention.sum()
    # each patch a solid colour of its own, none of which the H&E thumbnail or viridis overlay produce exactly
    colours = [(n * 3, 255 - n * 2, 128 + n) for n in range(len(cells))]
    patches = [np.full((40, 40, 3), colour, np.uint8) for colour in colours]
    return cells, boxes, attention, patches, colours


def _render(random_weights: bool = False, **overrides) -> tuple[np.ndarray, object]:
    cells, boxes, attention, patches, _ = _slide()
    args = dict(
        thumbnail=_thumbnail(),
        downsample=DOWNSAMPLE,
        boxes=boxes,
        attention=attention,
        patches=patches,
        label="tumor",
        prediction="tumor",
        probability=0.93,
        slide_id="test_001",
        top_k=6,
        random_weights=random_weights,
    )
    args.update(overrides)
    png = render_heatmap(**args)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    decoded = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    figure = draw_heatmap(**args)
    assert np.array_equal(decoded, figure.image)  # the PNG is the figure, losslessly
    return decoded, figure


def _overlay_colour(image: np.ndarray, figure, thumbnail: np.ndarray, row: int, col: int) -> np.ndarray:
    """The colour laid over the centre of a grid cell: undo the 50/50 blend with the thumbnail below it."""
    ox, oy = figure.thumbnail_origin
    cy, cx = row * CELL + CELL // 2, col * CELL + CELL // 2
    shown = image[oy + cy - 8 : oy + cy + 8, ox + cx - 8 : ox + cx + 8].astype(float)
    below = thumbnail[cy - 8 : cy + 8, cx - 8 : cx + 8].astype(float)
    return np.median((2 * shown - below).reshape(-1, 3), axis=0)


def test_overlay_is_hot_exactly_on_the_high_attention_region():
    image, figure = _render()
    thumbnail = _thumbnail()
    assert figure.thumbnail_scale == 1.0
    hot, cold = viridis(np.array([1.0]))[0].astype(float), viridis(np.array([0.0]))[0].astype(float)
    for row in range(GRID):
        for col in range(GRID):
            colour = _overlay_colour(image, figure, thumbnail, row, col)
            near_hot = np.abs(colour - hot).max() < 40
            near_cold = np.abs(colour - viridis(np.array([0.1]))[0]).max() < 40 or np.abs(colour - cold).max() < 40
            if (row, col) in HOT:
                assert near_hot, f"cell {(row, col)} has high attention but overlay colour {colour}"
            else:
                assert near_cold and not near_hot, f"cell {(row, col)} has low attention but overlay colour {colour}"


def test_top_k_panel_holds_the_most_attended_patches_in_order():
    image, _ = _render()
    _, _, attention, _, colours = _slide()
    codes = (image.astype(np.int64) * [65536, 256, 1]).sum(axis=2).ravel()  # one int per RGB colour, fast to match
    top = list(np.argsort(-attention)[:6])
    positions = {}
    for n, colour in enumerate(colours):
        where = np.flatnonzero(codes == colour[0] * 65536 + colour[1] * 256 + colour[2])
        if n in top:
            assert len(where) >= 0.95 * PATCH_CELL_PX**2, f"top patch {n} is not shown at {PATCH_CELL_PX} px"
            ys, xs = np.divmod(where, image.shape[1])
            positions[n] = (int(np.median(ys)), int(np.median(xs)))
        else:
            assert len(where) < 50, f"patch {n} is not in the top 6 but is shown in the panel"
    reading_order = sorted(top, key=lambda n: (positions[n][0] // PATCH_CELL_PX, positions[n][1]))
    assert reading_order == top  # most attended first, row by row


def _has_banner(image: np.ndarray) -> bool:
    band = (np.abs(image[:10].astype(int) - BANNER_RGB).max(axis=2) < 10).mean()
    return band > 0.5


def test_random_weights_banner_only_when_random_weights():
    with_banner, figure = _render(random_weights=True)
    without, plain = _render(random_weights=False)
    assert _has_banner(with_banner) and not _has_banner(without)
    assert not (np.abs(without.astype(int) - BANNER_RGB).max(axis=2) < 10).all(axis=1).any()  # no red row anywhere
    assert figure.thumbnail_origin[1] > plain.thumbnail_origin[1]  # the band sits above, the slide moves down


def test_callable_patches_read_only_the_top_k():
    _, _, _, patches, _ = _slide()
    asked = []

    def read(index: int) -> np.ndarray:
        asked.append(index)
        return patches[index]

    _render(patches=read, top_k=3)
    assert len(asked) == 6 and len(set(asked)) == 3  # three patches, once for the PNG and once for draw_heatmap


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"attention": np.ones(10)}, "attention must have shape"),
        ({"boxes": np.zeros((64, 3))}, "boxes must be an N x 4"),
        ({"attention": np.r_[np.ones(63), np.nan]}, "attention must be finite"),
        ({"attention": np.r_[np.inf, np.ones(63)]}, "attention must be finite"),
        ({"patches": [np.zeros((4, 4, 3), np.uint8)] * 5}, "patches must hold one image per box"),
        ({"thumbnail": np.zeros((600, 600), np.uint8)}, "thumbnail must be an RGB array"),
        ({"downsample": 0.0}, "downsample must be a positive number"),
        ({"boxes": np.c_[np.zeros((64, 2)), np.full(64, 300.0), np.r_[np.full(63, 300.0), 0.0]]}, "positive width"),
        ({"probability": 1.5}, "probability must be"),
        ({"probability": float("nan")}, "probability must be"),
        ({"top_k": 0}, "top_k must be at least 1"),
    ],
)
def test_bad_inputs_name_what_is_wrong(override, message):
    with pytest.raises(ValueError, match=message):
        _render(**override)


def test_equal_attention_is_painted_mid_scale():
    image, figure = _render(attention=np.full(GRID * GRID, 1 / GRID**2))
    colour = _overlay_colour(image, figure, _thumbnail(), 0, 0)
    assert np.abs(colour - viridis(np.array([0.5]))[0]).max() < 40


def test_large_thumbnail_is_shrunk_and_the_overlay_follows_it():
    big = np.repeat(np.repeat(_thumbnail(), 2, axis=0), 2, axis=1)  # 1200 px, drawn at THUMBNAIL_MAX_PX
    image, figure = _render(thumbnail=big, downsample=DOWNSAMPLE / 2)
    assert figure.thumbnail_scale == pytest.approx(THUMBNAIL_MAX_PX / 1200)
    shown = cv2.resize(big, None, fx=figure.thumbnail_scale, fy=figure.thumbnail_scale, interpolation=cv2.INTER_AREA)
    hot, cold = viridis(np.array([1.0]))[0].astype(float), viridis(np.array([0.0]))[0].astype(float)
    ox, oy = figure.thumbnail_origin
    for (row, col), expected in (((2, 5), hot), ((3, 6), hot), ((6, 1), cold), ((0, 0), cold)):
        cy = round((row + 0.5) * CELL * 2 * figure.thumbnail_scale)
        cx = round((col + 0.5) * CELL * 2 * figure.thumbnail_scale)
        drawn = image[oy + cy - 6 : oy + cy + 6, ox + cx - 6 : ox + cx + 6].astype(float)
        below = shown[cy - 6 : cy + 6, cx - 6 : cx + 6].astype(float)
        colour = np.median((2 * drawn - below).reshape(-1, 3), axis=0)
        assert np.abs(colour - expected).max() < 40, f"cell {(row, col)} overlay {colour}, expected {expected}"
