"""Pictures people look at: box lines that stay visible on purple tissue, a selection legend, and a contact sheet
with patches large enough to see cells and, for pairs, their captions."""

import numpy as np
from PIL import Image

from tasks.slides.passes import KeptPatch
from tasks.slides.pictures import cluster_colour, draw_selection, draw_thumbnail

PURPLE = (120, 60, 150)


def _purple_overview(size: int = 4000) -> np.ndarray:
    return np.full((size, size, 3), PURPLE, np.uint8)


def test_box_lines_grow_with_the_picture_and_keep_a_white_edge_on_purple():
    picture = draw_thumbnail(_purple_overview(), None, 1.0, [(800, 800, 1200, 1200)], 1024)
    row = picture[int(1400 * 1024 / 4000)]  # a row crossing the box's left and right edges
    blue = np.all(np.abs(row.astype(int) - (30, 60, 220)) < 30, axis=-1)
    white = np.all(row > 240, axis=-1)
    assert blue.sum() >= 2 * 3 and white.sum() >= 2 * 2  # each edge: >= 3 px of colour, >= 2 px of white


def test_the_selection_picture_has_a_legend_of_clusters_and_retrieval_picks():
    kept = [
        KeptPatch((400, 400, 600, 600), ("cluster:3",), 3),
        KeptPatch((1600, 1600, 600, 600), ("retrieval:attributes",), 5),
    ]
    overview = _purple_overview()
    picture = draw_selection(overview, 1.0, kept, 1024)
    assert picture.shape[0] > 1024 and picture.shape[1] == 1024  # the legend is a strip below the slide
    legend = picture[1024:]
    for cluster in (3, 5):
        swatch = np.all(np.abs(legend.astype(int) - cluster_colour(cluster)) < 8, axis=-1)
        assert swatch.sum() >= 100, cluster  # a filled swatch per cluster
    assert (legend < 60).all(axis=-1).sum() > 200  # and dark writing


def test_a_pair_shards_contact_sheet_shows_large_patches_and_their_captions(captioned_store, tmp_path):
    from pathgen.cli.inspect import inspect_url
    from tasks.contact_sheet import TILE_PX

    (pair_shard,) = list((captioned_store / "pairs").glob("*/*.parquet"))
    out = tmp_path / "pairs.png"
    assert inspect_url(str(pair_shard), out=str(out), samples=4) == 0
    sheet = np.asarray(Image.open(out).convert("RGB"))
    assert TILE_PX >= 320 and sheet.shape[1] == 4 * TILE_PX
    below = sheet[-(sheet.shape[0] - TILE_PX) :] if sheet.shape[0] > TILE_PX else sheet[:0]
    text_rows = (below < 100).all(axis=-1).any(axis=1).sum()
    assert text_rows >= 3 * 10  # a label line and caption lines under the tiles, not a single 14 px label
