"""Small pyramidal slides built at test time from the shared real Kather 2016 tiles, for the MIL learnability test.

Each slide is a 1024 x 1024 px Aperio-style tiled JPEG TIFF at 0.5 µm/px (two levels, 1x and 4x) on noisy white
glass, holding one irregular blob of tissue on a 6 x 6 grid of 148 px cells (a 150 px Kather tile at 0.495 µm/px
is 148.5 px at 0.5 µm/px). The blob is a patchwork of normal tissue classes (stroma, lymphocytes, debris, mucosa),
each cell an augmented view of a real tile (quarter turn, flip, per-tile colour and brightness jitter, and a
per-slide stain tint). A positive ("tumor") slide also holds one contiguous region of TUMOR tiles covering 20-40 %
of its tissue cells; a negative ("normal") slide holds none. Slide ids and their order say nothing of the label.
Everything is a function of the seed; about 90 tissue patches of 64 px at 0.5 µm/px per slide.

COMPLEX stroma is left out of the normal classes: Kather's "complex" tiles hold single tumour cells, so a normal
slide built from them would not be tumour-free. ADIPOSE and EMPTY are left out: fat is mostly bright, unstained
space that the tissue mask and the background filter drop (a small slide of it has no tissue), EMPTY is glass.
"""

from __future__ import annotations

import csv
import random
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from tests.conftest import write_tiff_slide
from tests.kather import KATHER

MPP = 0.5
CELL = 148  # level-0 px of one Kather tile at MPP
GRID = 6  # cells per side
SIDE = 1024  # level-0 px of the slide
MARGIN = (SIDE - GRID * CELL) // 2
TUMOR_CLASS = "01_TUMOR"
NORMAL_CLASSES = ("02_STROMA", "04_LYMPHO", "05_DEBRIS", "06_MUCOSA")
TUMOR_SHARE = (0.2, 0.4)  # of the tissue cells, on positive slides (10-30 % left ABMIL at AUC 0.88-0.89 on some seeds)
Box = tuple[int, int, int, int]  # level-0 x, y, w, h


@dataclass(frozen=True)
class MilSlide:
    slide_id: str
    path: Path
    label: str  # "tumor" or "normal"
    split: str  # train / val / test
    tumour_boxes: tuple[Box, ...]  # level-0 boxes of the TUMOR cells; empty on normal slides


def _tiles(folder: str) -> list[np.ndarray]:
    """The class's Kather tiles at MPP (150 px at 0.495 µm/px -> 148 px)."""
    tiles = []
    for path in sorted((KATHER / folder).glob("*.tif")):
        rgb = cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        tiles.append(cv2.resize(rgb, (CELL, CELL), interpolation=cv2.INTER_AREA))
    return tiles


def _augment(tile: np.ndarray, rng: random.Random, tint: np.ndarray) -> np.ndarray:
    """Another look at the same tissue: a quarter turn, a flip, and mild colour, brightness and stain jitter."""
    view = np.rot90(tile, rng.randrange(4))
    if rng.random() < 0.5:
        view = view[:, ::-1]
    view = view.astype(np.float32)
    grey = view.mean(axis=2, keepdims=True)
    view = grey + (view - grey) * rng.uniform(0.85, 1.15)  # saturation
    view = view * rng.uniform(0.92, 1.08) * tint  # brightness, then the slide's stain tint
    return np.clip(view, 0, 255).astype(np.uint8)


def _tissue_cells(rng: random.Random) -> list[tuple[int, int]]:
    """An irregular blob: the grid cells inside a jittered ellipse (rows, cols)."""
    cy, cx = GRID / 2 + rng.uniform(-0.5, 0.5), GRID / 2 + rng.uniform(-0.5, 0.5)
    ry, rx = GRID * rng.uniform(0.36, 0.48), GRID * rng.uniform(0.36, 0.48)
    cells = []
    for row in range(GRID):
        for col in range(GRID):
            if ((row + 0.5 - cy) / ry) ** 2 + ((col + 0.5 - cx) / rx) ** 2 <= rng.uniform(0.8, 1.1):
                cells.append((row, col))
    return cells


def _normal_classes(cells: list[tuple[int, int]], rng: random.Random) -> dict[tuple[int, int], str]:
    """A patchwork of normal tissue: each cell takes the class of its nearest of a few seeds (Voronoi regions)."""
    seeds = [(rng.uniform(0, GRID), rng.uniform(0, GRID), rng.choice(NORMAL_CLASSES)) for _ in range(4)]
    return {(row, col): min(seeds, key=lambda s: (s[0] - row) ** 2 + (s[1] - col) ** 2)[2] for row, col in cells}


def _tumour_region(cells: list[tuple[int, int]], rng: random.Random) -> set[tuple[int, int]]:
    """A contiguous region of the blob (grown cell by cell from a random start) of 20-40 % of its cells."""
    size = max(2, round(rng.uniform(*TUMOR_SHARE) * len(cells)))
    inside = set(cells)
    region = {rng.choice(cells)}
    while len(region) < size:
        frontier = sorted(
            {(r + dr, c + dc) for r, c in region for dr, dc in ((1, 0), (-1, 0), (0, 1), (0, -1))} & inside - region
        )
        region.add(rng.choice(frontier))
    return region


def _cell_box(row: int, col: int) -> Box:
    return (MARGIN + col * CELL, MARGIN + row * CELL, CELL, CELL)


def _slide_pixels(
    tumour: bool, pool: dict[str, list[np.ndarray]], rng: random.Random
) -> tuple[np.ndarray, tuple[Box, ...]]:
    noise = np.random.default_rng(rng.randrange(2**32)).normal(238, 3, (SIDE, SIDE, 3))
    rgb = np.clip(noise, 0, 255).astype(np.uint8)
    cells = _tissue_cells(rng)
    classes = _normal_classes(cells, rng)
    region = _tumour_region(cells, rng) if tumour else set()
    tint = np.array([rng.uniform(0.95, 1.05) for _ in range(3)], np.float32)
    for row, col in cells:
        folder = TUMOR_CLASS if (row, col) in region else classes[(row, col)]
        x, y, w, h = _cell_box(row, col)
        rgb[y : y + h, x : x + w] = _augment(rng.choice(pool[folder]), rng, tint)
    return rgb, tuple(_cell_box(row, col) for row, col in sorted(region))


def build_slides(root: Path, counts: dict[str, int], seed: int = 0) -> list[MilSlide]:
    """``counts[split]`` slides per split (half tumour, half normal, in random order), written under ``root``. The
    three tiles of each class serve every split: the test slides are new arrangements and views of seen tissue."""
    root.mkdir(parents=True, exist_ok=True)
    pool = {folder: _tiles(folder) for folder in (TUMOR_CLASS, *NORMAL_CLASSES)}
    rng = random.Random(seed)
    slides = []
    for split, count in counts.items():
        tumours = [index < count // 2 for index in range(count)]
        rng.shuffle(tumours)  # slide ids and their order say nothing of the label
        for index, tumour in enumerate(tumours):
            slide_id = f"{split}-{index:02d}"
            rgb, boxes = _slide_pixels(tumour, pool, random.Random(rng.randrange(2**32)))
            path = write_tiff_slide(root / f"{slide_id}.svs", rgb, mpp=MPP)
            slides.append(MilSlide(slide_id, path, "tumor" if tumour else "normal", split, boxes))
    return slides


def write_task(slides: list[MilSlide], path: Path, relabel: str | None = None, seed: int = 0) -> Path:
    """The task CSV (slide_id,label,split), test labels always true. ``relabel`` changes the train and val labels:
    ``"swapped"``: tumour slides labelled "normal" and normal ones "tumor" (a model that learns from the labels then
    ranks the test slides upside down); ``"uninformative"``: within each split, half of the tumour slides and half of
    the normal ones (chosen with ``seed``) labelled "tumor", the rest "normal", so the label is independent of the
    tissue by construction (a plain permutation keeps a chance correlation with the truth)."""
    labels = {s.slide_id: s.label for s in slides}
    rng = random.Random(seed)
    for split in ("train", "val"):
        for truth in ("tumor", "normal"):
            ids = [s.slide_id for s in slides if s.split == split and s.label == truth]
            if relabel == "swapped":
                labels.update({slide_id: "normal" if truth == "tumor" else "tumor" for slide_id in ids})
            elif relabel == "uninformative":
                rng.shuffle(ids)
                labels.update({slide_id: "tumor" if i < len(ids) // 2 else "normal" for i, slide_id in enumerate(ids)})
            elif relabel is not None:
                raise ValueError(f"relabel must be None, 'swapped' or 'uninformative'; got {relabel!r}")
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["slide_id", "label", "split"])
        writer.writerows([s.slide_id, labels[s.slide_id], s.split] for s in slides)
    return path


def tumour_fraction(patch: Box, tumour_boxes: tuple[Box, ...]) -> float:
    """The share of a patch's level-0 area inside the tumour region (its boxes do not overlap)."""
    x, y, w, h = patch
    covered = 0
    for bx, by, bw, bh in tumour_boxes:
        covered += max(0, min(x + w, bx + bw) - max(x, bx)) * max(0, min(y + h, by + bh) - max(y, by))
    return covered / float(w * h)


def attention_on_tumour(
    attention: np.ndarray, patches: list[Box], tumour_boxes: tuple[Box, ...]
) -> tuple[float, float]:
    """(attention mass on the tumour region, the region's share of the slide's patch area): with attention
    normalised to 1 over the patches, the mass is sum(a_i * f_i) and the share mean(f_i), f_i the tumour fraction
    of patch i; an attention blind to tumour has mass equal to share."""
    fractions = np.array([tumour_fraction(p, tumour_boxes) for p in patches])
    weights = np.asarray(attention, np.float64)
    return float((weights / weights.sum() * fractions).sum()), float(fractions.mean())
