"""Labelled pairs from the shared Kather 2016 samples, for the learnability test: captions that name the class that
is visible, on augmented views of two tiles per class; the third tile of each class is held out for testing."""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageEnhance

KATHER = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "patches" / "kather2016-samples"
CLASSES = Path(__file__).resolve().parents[1] / "tasks" / "clip" / "data" / "kather2016-classes.json"
TEMPLATES = ["An H&E image of {}.", "a histopathology image showing {}.", "{} in a colorectal tissue section."]


def _view(tile: Image.Image, rng: random.Random, size: int = 112) -> Image.Image:
    """A random crop, flip, quarter turn and mild stain jitter: another look at the same tissue."""
    x, y = rng.randrange(tile.width - size + 1), rng.randrange(tile.height - size + 1)
    view = tile.crop((x, y, x + size, y + size)).rotate(90 * rng.randrange(4))
    if rng.random() < 0.5:
        view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    view = ImageEnhance.Color(view).enhance(rng.uniform(0.85, 1.15))
    return ImageEnhance.Brightness(view).enhance(rng.uniform(0.9, 1.1))


def build(root: Path, views_per_tile: int = 40, seed: int = 0) -> dict[str, Path]:
    """train/ images + captions.jsonl, and test/<class>/ views of each class's held-out tile."""
    rng = random.Random(seed)
    names = json.loads(CLASSES.read_text())
    rows = []
    for folder in sorted(names):
        tiles = sorted((KATHER / folder).glob("*.tif"))
        for index, tile_path in enumerate(tiles):
            tile = Image.open(tile_path).convert("RGB")
            if index == len(tiles) - 1:  # held out: never seen in training
                target = root / "kather2016-heldout" / folder
                target.mkdir(parents=True, exist_ok=True)
                for turn in range(8):
                    view = tile.rotate(90 * (turn % 4)).crop((19, 19, 131, 131))
                    view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if turn >= 4 else view
                    view.save(target / f"{tile_path.stem}-{turn}.png")
                continue
            for n in range(views_per_tile):
                name = f"{folder}-{tile_path.stem}-{n:03d}.jpg"
                (root / "train").mkdir(parents=True, exist_ok=True)
                _view(tile, rng).save(root / "train" / name, quality=92)
                caption = rng.choice(TEMPLATES).format(rng.choice(names[folder]))
                rows.append({"image": name, "caption": caption})
    captions = root / "train" / "captions.jsonl"
    captions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"folder": root / "train", "captions": captions, "test": root / "kather2016-heldout", "classes": CLASSES}
