"""The fast paths of extraction keep their outputs exact: patches read by the tile reader equal an independent
decode of the slide, the shard writer's background thread keeps every row in order and raises its errors, and the
``all`` pass streams patches to the shard as it reads them."""

import logging

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest
import tifffile

from pathgen.settings import load_settings
from tasks.selection.plan import ReadBatch, SelectionPlan
from tasks.slides.passes import SlidePass, write_planned
from tasks.slides.readers import open_slide
from tasks.slides.shard import ROWS_PER_GROUP, PatchRecord, PatchShardWriter
from tasks.slides.sources import resolve_sources
from tasks.slides.tissue import GridCell

from .conftest import CMU

# Boxes across tile seams (CMU's tiles are 240 px), at odd offsets, on the right and bottom edges, and one that
# leaves the image (2220 x 2967 px).
BOXES = [(0, 0), (239, 239), (117, 1333), (1500, 480), (1996, 2743), (2100, 2900)]


@pytest.fixture(scope="module")
def level0() -> np.ndarray:
    """Level 0 decoded whole by tifffile: no tile cache, no box arithmetic of ours."""
    with tifffile.TiffFile(str(CMU)) as tiff:
        return tiff.series[0].levels[0].asarray()[..., :3]


def _expected(level0: np.ndarray, x: int, y: int, side: int) -> np.ndarray:
    out = np.full((side, side, 3), 255, np.uint8)  # outside the image is glass
    crop = level0[y : y + side, x : x + side]
    out[: crop.shape[0], : crop.shape[1]] = crop
    return out


@pytest.mark.parametrize("read_ahead", [0, 2])
def test_read_boxes_equal_an_independent_decode(level0, read_ahead):
    with open_slide(str(CMU)) as reader:
        assert reader.info.fast_tiles
        patches = list(reader.read_boxes([(x, y, 224, 224) for x, y in BOXES], reader.info.mpp, 224, read_ahead))
    for (x, y), patch in zip(BOXES, patches, strict=True):
        assert np.array_equal(patch, _expected(level0, x, y, 224)), (x, y)


def test_read_boxes_at_a_coarser_scale_equal_an_area_resize_of_the_exact_box(level0):
    with open_slide(str(CMU)) as reader:
        read = int(round(224 * 1.0 / reader.info.mpp))  # 224 px at 1.0 µm/px span this many level-0 px
        patches = list(reader.read_boxes([(x, y, read, read) for x, y in BOXES[:4]], 1.0, 224, read_ahead=2))
    for (x, y), patch in zip(BOXES[:4], patches, strict=True):
        expected = cv2.resize(_expected(level0, x, y, read), (224, 224), interpolation=cv2.INTER_AREA)
        assert np.array_equal(patch, expected), (x, y)


def test_read_boxes_keep_only_the_tiles_that_boxes_still_to_come_share():
    # 300 px boxes on CMU's 240 px tiles: neighbours share a column of tiles, rows of boxes a row of tiles (8 across)
    boxes = [(x, y, 300, 300) for y in range(0, 2400, 300) for x in range(0, 1800, 300)]
    with open_slide(str(CMU)) as reader:
        held = [len(reader._cache.items) for _ in reader.read_boxes(boxes, reader.info.mpp, 300)]
        assert reader._cache.misses == 8 * 10  # every tile under the boxes decoded once
        assert max(held[:-6]) <= 8 + 2  # up to the last row of boxes: one row of tiles and the column being shared
        # the rows of tiles under the last box stay for a next call that goes on along them
        assert {ty for _, _, ty in reader._cache.items} == {2100 // 240, 2399 // 240}
        with open_slide(str(CMU)) as batched:  # read in two calls split mid-row, as extraction's batches are
            for part in (boxes[:27], boxes[27:]):
                list(batched.read_boxes(part, batched.info.mpp, 300))
            assert batched._cache.misses == 8 * 10
        order = np.random.default_rng(0).permutation(len(boxes))
        with open_slide(str(CMU)) as shuffled:
            patches = list(shuffled.read_boxes([boxes[i] for i in order], shuffled.info.mpp, 300, read_ahead=2))
            assert shuffled._cache.misses == 8 * 10  # any order: a tile stays until its last box has it
        raster = list(reader.read_boxes(boxes, reader.info.mpp, 300))
    assert all(np.array_equal(patches[k], raster[i]) for k, i in enumerate(order))


def _record(i: int) -> PatchRecord:
    return PatchRecord(
        patch_id=f"p{i:04d}",
        slide_id="s",
        source_uri="s.svs",
        project=None,
        file_id=None,
        x=i,
        y=0,
        w0=1,
        h0=1,
        level=0,
        mpp=0.5,
        slide_mpp=0.5,
        patch_px=1,
        tissue_fraction=1.0,
        background_fraction=0.0,
        sharpness=1.0,
        pen_fraction=0.0,
        image=bytes([i % 256]) * 10,
    )


def test_shard_writer_keeps_every_row_in_order_across_background_writes(tmp_path):
    path = tmp_path / "s.parquet"
    writer = PatchShardWriter(str(path), {"pathgen.slide_id": "s"})
    total = 2 * ROWS_PER_GROUP + 7
    for i in range(0, total, 5):
        writer.add([_record(j) for j in range(i, min(total, i + 5))])
    writer.close()
    shard = pq.ParquetFile(path)
    assert writer.rows == total and shard.metadata.num_row_groups == 3
    assert shard.read(columns=["patch_id"])["patch_id"].to_pylist() == [f"p{i:04d}" for i in range(total)]


def test_shard_writer_raises_a_background_write_error_and_closes_the_file(tmp_path):
    writer = PatchShardWriter(str(tmp_path / "s.parquet"), {})

    def full_disk(table):
        raise OSError(28, "No space left on device")

    writer._writer.write_table = full_disk
    writer.add([_record(i) for i in range(ROWS_PER_GROUP)])  # handed to the writing thread
    with pytest.raises(OSError, match="No space left"):
        writer.close()
    assert writer._pool._shutdown and writer._writer.is_open is False


def test_all_streams_patches_to_the_shard_while_it_reads(tmp_path):
    settings = load_settings(
        overrides={"store": str(tmp_path), "patch.patch_px": 224, "patch.target_mpp": 0.499}, environ={}
    )
    (ref,) = resolve_sources([str(CMU)], settings)
    cells = [GridCell(x, y, 224, 224, 1.0) for y in range(1120, 1792, 224) for x in range(224, 2016, 224)]
    events: list[str] = []

    class SpyWriter:
        records: list[PatchRecord] = []

        def add(self, records):
            events.append("add")
            self.records.extend(records)

    with open_slide(str(CMU)) as reader:
        slide = SlidePass(ref, settings, reader, logging.getLogger("test"))
        real_read = slide.read

        def read(batch):
            for cell, rgb in real_read(batch):
                events.append("read")
                yield cell, rgb

        slide.read = read
        plan = SelectionPlan("all", None, iter([ReadBatch(cells, list(range(len(cells))))]))
        writer = SpyWriter()
        result = write_planned(slide, plan, writer)
    assert result.counts["kept"] == len(writer.records) > 2
    # the first kept patch reaches the shard before the batch's last cell is read, not after the whole batch
    assert events.index("add") < len(events) - 1 - events[::-1].index("read")
    assert [(r.x, r.y) for r in writer.records] == sorted(((r.x, r.y) for r in writer.records), key=lambda p: p[::-1])
