"""Pairs to the trainer's input: the WebDataset export rate, and how efficiently open_clip_train's loader feeds it.

Run: ``python bench/loader.py [--pairs N] [--slides S] [--patch-px P] [--batch-size B] [--workers W] [--rounds R]``
(defaults 2000 pairs, 20 slides, 672 px, batch 64, 0 workers, 3 rounds; everything goes under bench/_work/loader).

- the store: S pair shards ``pairs/<agents_hash>/<slide_id>.parquet`` (PAIR_SCHEMA, ``pathgen.commit_id`` in their
  metadata, each committed atomically through ``Store.staged_file``) holding N pairs in all. Images are real tissue:
  P x P px JPEG crops (quality 90, encoded as the extractor encodes them) cut at random level-0 positions from
  ``CMU-1-Small-Region.svs`` and kept only when they pass the extractor's quality filter (mostly glass is
  re-drawn). 672 px is the factory's default ``patch.patch_px`` and the paper's patch size; at 224 px the JPEG
  decode is ~9x cheaper, so the pipeline's fixed per-sample costs (tar reading, batching) weigh more. Captions are
  the real released PathGen-1.6M captions (``PathGen-1.6M_sample.json``), cycled; they do not describe these
  patches, and every row says so in ``describe_model``/``revise_model``/``summarize_model`` (``random_weights`` False).
- export rate: ``export_pairs(store, agents_hash, out, 0.0)`` into a fresh folder (deleted before every round, so
  each round writes every tar); pairs/s as ExportSummary reports it, median of R rounds.
- loader efficiency: images/s through ``open_clip_train.data.get_wds_dataset`` (the trainer's own WebDataset
  pipeline: shard shuffle, tar reading, sample shuffle, decode, ViT-B-16's training transform, its tokenizer,
  batching) over the exported tars, one epoch of the dataloader as the trainer iterates it, against a baseline doing
  only the unavoidable work for the same number of images: JPEG bytes already in a Python list, PIL
  ``.convert('RGB')``, the same transform, the same tokenizer on the caption, in a plain loop. Efficiency =
  pipeline images/s / baseline images/s. Both run with the same worker count: 0 (the default) is the main process
  for both; W > 0 is W DataLoader workers against a multiprocessing pool of W processes (each pool task is one batch
  of B images, stacked to travel back as the DataLoader's batches do). Torch runs with 1 thread on both sides
  (torch.set_num_threads(1), in every worker too) so the comparison stays fair on a shared machine. Both are warmed
  up once (64 images, untimed); the two measurements alternate over R rounds (order swapped every round) and each
  reports its median.
"""

from __future__ import annotations

import sys

# bench/select.py would shadow the standard library's `select` module: keep this folder off the import path.
sys.path[:] = [p for p in sys.path if p not in ("", __file__.rsplit("/", 1)[0])]

import argparse
import io
import json
import multiprocessing
import shutil
import statistics
import tarfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORK = ROOT / "bench" / "_work" / "loader"
AGENTS_HASH = "b3nchl0ader0"  # a fixed 12-character hash for the bench's pairs
EXTRACTION_HASH = "b3nchcr0ps00"
NOT_OURS = "bench: released PathGen-1.6M caption, not of this patch"
CAPTIONS = ROOT.parent / "shared" / "data" / "captions" / "PathGen-1.6M_sample.json"
MODEL = "ViT-B-16"
WARMUP = 64
SEED = 0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--pairs", type=int, default=2000)
    parser.add_argument("--slides", type=int, default=20)
    parser.add_argument("--patch-px", type=int, default=672, help="crop size (the factory's default patch_px)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.pairs < args.slides or args.slides < max(1, args.workers):
        parser.error("need pairs >= slides >= max(1, workers): open_clip_train wants a shard per worker")
    return args


def tissue_crops(n: int, px: int, rng) -> tuple[list[dict], float]:
    """n crops of real tissue from CMU-1-Small-Region (the slide read once), as patch fields; and the slide's mpp."""
    import imagecodecs
    import numpy as np
    import openslide

    from bench.synthetic_slide import CMU
    from pathgen.settings import QualitySettings
    from tasks.slides.quality import rejection_reason, score_patch

    with openslide.OpenSlide(str(CMU)) as slide:
        rgb = np.ascontiguousarray(np.asarray(slide.read_region((0, 0), 0, slide.dimensions).convert("RGB")))
        mpp = float(slide.properties.get(openslide.PROPERTY_NAME_MPP_X, 0.5))
    height, width = rgb.shape[:2]
    if px > min(width, height):
        raise SystemExit(f"--patch-px {px} is larger than the slide ({width} x {height})")
    quality, crops, tries = QualitySettings(), [], 0
    while len(crops) < n:
        tries += 1
        if tries > 50 * n:
            raise SystemExit(f"only {len(crops)} of {tries} random {px} px crops passed the quality filter")
        x, y = int(rng.integers(0, width - px + 1)), int(rng.integers(0, height - px + 1))
        crop = np.ascontiguousarray(rgb[y : y + px, x : x + px])
        scores = score_patch(crop, quality.analysis_px)
        if rejection_reason(scores, quality):
            continue
        crops.append(
            {
                "x": x,
                "y": y,
                "tissue_fraction": round(1.0 - scores.background_fraction, 4),
                "background_fraction": scores.background_fraction,
                "sharpness": scores.sharpness,
                "pen_fraction": scores.pen_fraction,
                "image": imagecodecs.jpeg8_encode(crop, level=90),
            }
        )
    return crops, mpp


def released_captions() -> list[str]:
    return [entry["caption"] for entry in json.loads(CAPTIONS.read_text())]


def pair_row(slide_id: str, crop: dict, caption: str, px: int, mpp: float, now: str) -> dict:
    """A PAIR_SCHEMA row that says what it is: a real crop, a real released caption that is not of it."""
    from agents.clip_tokens import clip_token_count
    from bench.synthetic_slide import CMU
    from pathgen import __version__
    from tasks.slides.shard import patch_id_for

    return {
        "patch_id": patch_id_for(slide_id, (crop["x"], crop["y"], px, px), mpp, px),
        "slide_id": slide_id,
        "source_uri": CMU.resolve().as_uri(),
        "project": None,
        "file_id": None,
        **{k: crop[k] for k in ("x", "y")},
        "w0": px,
        "h0": px,
        "level": 0,
        "mpp": mpp,
        "slide_mpp": mpp,
        "patch_px": px,
        **{k: crop[k] for k in ("tissue_fraction", "background_fraction", "sharpness", "pen_fraction")},
        "selected_by": ["random"],
        "cluster": None,
        "attribute_score": None,
        "findings_score": None,
        "source_caption": None,
        "image": crop["image"],
        "description": caption,
        "revised_description": caption,
        "revise_changed": False,
        "revise_change": 0.0,
        "caption": caption,
        "caption_tokens": clip_token_count(caption),
        "caption_trimmed": False,
        "describe_model": NOT_OURS,
        "revise_model": NOT_OURS,
        "summarize_model": NOT_OURS,
        "prompt_versions": "{}",
        "sampling": "{}",
        "agents_hash": AGENTS_HASH,
        "extraction_hash": EXTRACTION_HASH,
        "random_weights": False,
        "factory_version": __version__,
        "created_at": now,
    }


def write_shard(store, slide_id: str, rows: list[dict]) -> None:
    """One pair shard, committed atomically, written as the caption stage writes them (JPEG bytes uncompressed)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tasks.captions.records import PAIR_SCHEMA, pair_key
    from tasks.slides.shard import shard_metadata

    meta = {
        "pathgen.slide_id": slide_id,
        "pathgen.extraction_hash": EXTRACTION_HASH,
        "pathgen.agents_hash": AGENTS_HASH,
        "pathgen.commit_id": uuid.uuid4().hex,
    }
    table = pa.Table.from_pylist(rows, PAIR_SCHEMA.with_metadata(shard_metadata("pairs", meta)))
    with store.staged_file(pair_key(AGENTS_HASH, slide_id)) as local:
        pq.write_table(table, local, compression={n: ("NONE" if n == "image" else "ZSTD") for n in PAIR_SCHEMA.names})


def build_store(root: Path, pairs: int, slides: int, px: int) -> float:
    """The store of ``slides`` pair shards holding ``pairs`` pairs; returns seconds."""
    import numpy as np

    from tasks.store.objects import Store

    start = time.perf_counter()
    shutil.rmtree(root, ignore_errors=True)
    store = Store(str(root))
    store.check()
    rng = np.random.default_rng(SEED)
    crops, mpp = tissue_crops(pairs, px, rng)
    captions, now = released_captions(), datetime.now(UTC).isoformat()
    done = 0
    for index in range(slides):
        slide_id = f"bench-loader-{index:04d}"
        count = pairs // slides + (index < pairs % slides)
        rows, seen = [], set()
        for crop in crops[done : done + count]:
            row = pair_row(slide_id, crop, captions[(done + len(rows)) % len(captions)], px, mpp, now)
            if row["patch_id"] not in seen:  # two draws of the same position would be one patch
                seen.add(row["patch_id"])
                rows.append(row)
        write_shard(store, slide_id, rows)
        done += count
    return time.perf_counter() - start


def time_exports(root: Path, out: Path, rounds: int, pairs: int, slides: int) -> list[float]:
    """export_pairs into a fresh folder each round; pairs/s of each."""
    from tasks.clip.webdataset import export_pairs
    from tasks.store.objects import Store

    rates = []
    for _ in range(rounds):
        shutil.rmtree(out, ignore_errors=True)
        summary = export_pairs(Store(str(root)), AGENTS_HASH, out, 0.0)
        if summary.written != slides or summary.tars != slides or summary.pairs + summary.holdout_pairs > pairs:
            raise SystemExit(f"export wrote {summary.written} of {slides} tars, {summary.pairs} pairs: {summary}")
        rates.append(summary.pairs_per_s)
    return rates


def tar_samples(out: Path) -> list[tuple[bytes, str]]:
    """(JPEG bytes, caption) of every exported pair, read into memory: the baseline's input."""
    from tasks.clip.webdataset import training_tars

    samples = []
    for path in training_tars(out):
        members: dict[str, dict[str, bytes]] = {}
        with tarfile.open(path) as tar:
            for info in tar:
                key, ext = info.name.rsplit(".", 1)
                members.setdefault(key, {})[ext] = tar.extractfile(info).read()
        samples.extend((m["jpg"], m["txt"].decode()) for m in members.values())
    return samples


def transform_and_tokenizer():
    """ViT-B-16's training transform (its config's image size, open_clip's defaults otherwise) and tokenizer."""
    import open_clip

    size = open_clip.get_model_config(MODEL)["vision_cfg"]["image_size"]
    return open_clip.image_transform(size, is_train=True), open_clip.get_tokenizer(MODEL)


def pipeline_loader(out: Path, batch_size: int, workers: int, transform, tokenizer):
    """open_clip_train's own WebDataset input over the exported tars, sized from their sizes.json."""
    from open_clip_train.data import get_wds_dataset

    from tasks.clip.webdataset import training_tars

    args = SimpleNamespace(
        train_data="::".join(str(t) for t in training_tars(out)),
        train_num_samples=None,
        dataset_resampled=False,
        seed=SEED,
        train_data_upsampling_factors=None,
        batch_size=batch_size,
        workers=workers,
        world_size=1,
    )
    return get_wds_dataset(args, transform, is_train=True, epoch=0, tokenizer=tokenizer)


def run_pipeline(data, epoch: int, limit: int | None = None) -> tuple[int, float]:
    """(images, seconds) over one epoch as the trainer iterates it, or until ``limit`` images."""
    data.set_epoch(epoch)
    images, start = 0, time.perf_counter()
    for batch_images, batch_texts in data.dataloader:
        assert batch_images.shape[0] == batch_texts.shape[0]
        images += batch_images.shape[0]
        if limit is not None and images >= limit:
            break
    return images, time.perf_counter() - start


_BASELINE: dict = {}


def _baseline_init(samples: list[tuple[bytes, str]], transform, tokenizer) -> None:
    import torch

    torch.set_num_threads(1)
    _BASELINE.update(samples=samples, transform=transform, tokenizer=tokenizer)


def _baseline_one(index: int):
    from PIL import Image

    jpeg, caption = _BASELINE["samples"][index % len(_BASELINE["samples"])]
    image = _BASELINE["transform"](Image.open(io.BytesIO(jpeg)).convert("RGB"))
    return image, _BASELINE["tokenizer"](caption)[0]


def _baseline_batch(span: tuple[int, int]):
    """One pool task: a batch of images, stacked to travel back to the main process as one tensor pair."""
    import torch

    images, texts = zip(*(_baseline_one(i) for i in range(*span)), strict=True)
    return torch.stack(images), torch.stack(texts)


def run_baseline(count: int, batch_size: int, pool) -> float:
    """Seconds to decode, transform and tokenize ``count`` in-memory pairs: a plain loop, or the pool."""
    start = time.perf_counter()
    if pool is None:
        for index in range(count):
            _baseline_one(index)
    else:
        spans = [(i, min(i + batch_size, count)) for i in range(0, count, batch_size)]
        for _ in pool.imap(_baseline_batch, spans):
            pass
    return time.perf_counter() - start


def compare(data, batch_size: int, pool, rounds: int) -> list[tuple[float, float, int]]:
    """Warm both up, then alternate them (order swapped every round): (pipeline img/s, baseline img/s, images)."""
    run_pipeline(data, epoch=0, limit=WARMUP)
    run_baseline(WARMUP, batch_size, pool)
    results = []
    for index in range(rounds):
        if index % 2 == 0:
            images, pipe_s = run_pipeline(data, epoch=index + 1)
            base_s = run_baseline(images, batch_size, pool)
        else:
            base_count = data.dataloader.num_samples
            base_s = run_baseline(base_count, batch_size, pool)
            images, pipe_s = run_pipeline(data, epoch=index + 1)
            if images != base_count:
                raise SystemExit(f"the pipeline gave {images} images, {base_count} expected")
        results.append((images / pipe_s, images / base_s, images))
    return results


def report(args, build_s: float, exports: list[float], loads: list[tuple[float, float, int]], samples: int) -> None:
    where = "main process for both" if args.workers == 0 else f"{args.workers} DataLoader workers vs a pool of as many"
    print(f"loader bench: {samples} pairs in {args.slides} shards of real CMU-1 tissue, {args.patch_px} px JPEG q90")
    print(f"  store built in {build_s:.1f} s under {WORK.relative_to(ROOT)}")
    print("  export: export_pairs(store, agents_hash, fresh folder, holdout 0.0), every tar written each round")
    print(f"  pipeline: open_clip_train get_wds_dataset ({MODEL} train transform, tokenizer), batch {args.batch_size}")
    print("            one epoch as the trainer iterates it (tar read, shuffles, decode, transform, tokenize, batch)")
    print("  baseline: the same JPEG bytes from a list in memory, PIL convert('RGB'), same transform and tokenizer")
    print(f"  workers: {where}; torch.set_num_threads(1) on both sides; warm-up {WARMUP} images, untimed")
    print()
    header = ("round", "images", "pipeline img/s", "baseline img/s", "efficiency", "export pairs/s")
    print(" ".join(f"{name:>{width}}" for name, width in zip(header, (6, 7, 15, 15, 11, 15), strict=True)))
    for index, ((pipe, base, images), export) in enumerate(zip(loads, exports, strict=True), 1):
        print(f"{index:>6} {images:>7} {pipe:>15.1f} {base:>15.1f} {pipe / base:>11.3f} {export:>15.0f}")
    pipe, base = statistics.median(r[0] for r in loads), statistics.median(r[1] for r in loads)
    print(f"{'median':>6} {'':>7} {pipe:>15.1f} {base:>15.1f} {pipe / base:>11.3f} {statistics.median(exports):>15.0f}")
    print(f"loader_efficiency={pipe / base:.2f} export_pairs_per_s={round(statistics.median(exports))}")


def main() -> None:
    args = parse_args()
    import torch

    torch.set_num_threads(1)
    store_root, out = WORK / "store", WORK / "tars"
    build_s = build_store(store_root, args.pairs, args.slides, args.patch_px)
    exports = time_exports(store_root, out, args.rounds, args.pairs, args.slides)
    samples = tar_samples(out)
    transform, tokenizer = transform_and_tokenizer()
    _baseline_init(samples, transform, tokenizer)
    pool = None
    if args.workers > 0:
        context = multiprocessing.get_context("fork")
        pool = context.Pool(args.workers, initializer=_baseline_init, initargs=(samples, transform, tokenizer))
    try:
        data = pipeline_loader(out, args.batch_size, args.workers, transform, tokenizer)
        loads = compare(data, args.batch_size, pool, args.rounds)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    report(args, build_s, exports, loads, len(samples))


if __name__ == "__main__":
    main()
