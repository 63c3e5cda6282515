"""Which grid cells become patches. A selector plans the reads; extraction reads, filters and writes.

``all`` keeps every cell that passes the quality filters. ``random`` keeps at most ``max_per_slide``: cells are
ranked by a permutation seeded from the settings seed and the slide id, read in batches of that rank (each batch
in raster order, so every tile still decodes once), and the best-ranked survivors are kept. Only the last batch
can overshoot the cap, so kept patches stream straight to the shard. ``representative`` plans no batches: it reads
every candidate itself, in two passes (tasks/patch_passes.py), and chooses with tasks/representative.py.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from pathgen.settings import SelectionSettings
from tasks.slides.tissue import GridCell

ALL_BATCH = 512


@dataclass(frozen=True)
class ReadBatch:
    cells: list[GridCell]  # raster order
    ranks: list[int]  # lower rank is preferred when the cap cuts a batch


@dataclass(frozen=True)
class SelectionPlan:
    name: str
    cap: int | None
    batches: Iterator[ReadBatch]


def slide_seed(seed: int, slide_id: str) -> int:
    digest = hashlib.sha256(f"{seed}|{slide_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def _raster(cells: list[GridCell], ranks: list[int]) -> ReadBatch:
    order = sorted(range(len(cells)), key=lambda i: (cells[i].y, cells[i].x))
    return ReadBatch([cells[i] for i in order], [ranks[i] for i in order])


def plan_selection(cells: list[GridCell], cfg: SelectionSettings, slide_id: str) -> SelectionPlan:
    if cfg.method == "all":
        batches = (
            _raster(cells[i : i + ALL_BATCH], list(range(i, i + len(cells[i : i + ALL_BATCH]))))
            for i in range(0, len(cells), ALL_BATCH)
        )
        return SelectionPlan("all", None, batches)
    if cfg.method == "random":
        rng = np.random.default_rng(slide_seed(cfg.seed, slide_id))
        order = rng.permutation(len(cells)).tolist()
        # Read a little more than the cap at first: some cells fail the quality filters.
        size = max(16, math.ceil(cfg.max_per_slide * 1.25))
        batches = (
            _raster([cells[j] for j in order[i : i + size]], list(range(i, i + len(order[i : i + size]))))
            for i in range(0, len(order), size)
        )
        return SelectionPlan("random", cfg.max_per_slide, batches)
    if cfg.method == "representative":
        # Every candidate is read and embedded; write_representative makes its own two passes over them.
        return SelectionPlan("representative", cfg.max_per_slide, iter(()))
    raise ValueError(f"unknown selection method {cfg.method!r}")
