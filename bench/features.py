"""Features stage throughput on a slide of real tissue, against the encoder's forward pass alone, in one run.

Run: ``python bench/features.py`` (builds the slide under bench/_work on first use, a few seconds).

- stage: the whole per-slide featuring (``tasks/features/extract.feature_slide``: source identity, open, MPP,
  tissue mask, grid, read every tissue cell, quality filters, preprocessing, encoder, Parquet commit), with its
  background thread reading ``features.prefetch_batches`` batches ahead of the encoder; the encoder already loaded.
- forward: the same encoder on the same kept patches, read and preprocessed beforehand and held in memory as
  tensors, in batches of the same size: the encoder's cost alone, which the stage cannot beat.

``features_efficiency`` = forward seconds / stage seconds (1.0: reading, decoding, preprocessing and writing are
entirely hidden behind the encoder). The encoder is a realistic one that builds offline: open_clip ``ViT-B-16``
(PathGen-CLIP's architecture) with RANDOM WEIGHTS (open_clip's random initialisation, nothing downloaded): its
vectors are noise, its cost is the real one. The two are timed in alternation for ``--rounds`` rounds and each
keeps its best (the forward pass first every other round), so that a shared machine's drifting load favours
neither. The bench also times the encoder inside the stage: its share of the stage is the overlap measured within
one run, which the machine's load does not skew.
"""

from __future__ import annotations

import sys

# bench/select.py would shadow the standard library's `select` module: keep this folder off the import path.
sys.path[:] = [p for p in sys.path if p not in ("", __file__.rsplit("/", 1)[0])]

import argparse
import logging
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORK = ROOT / "bench" / "_work"


def _job(store_url: str, encoder: str, batch_size: int):
    from pathgen.settings import load_settings
    from tasks.features.encoder import encoder_identity, load_encoder
    from tasks.features.extract import FeatureJob
    from tasks.features.hashing import features_hash
    from tasks.store.objects import Store

    overrides = {"store": store_url, "features.batch_size": batch_size, "retries.io_retries": 0}
    settings = load_settings(overrides=overrides, environ={})
    identity = encoder_identity(encoder)
    loaded = load_encoder(encoder, identity, "cpu", logging.getLogger("bench"))
    return FeatureJob(settings, Store(settings.store), loaded, features_hash(settings, identity), logging.getLogger())


def run_stage(slide: str, job) -> tuple[float, int, float]:
    """Seconds for the whole featuring of the slide (the committed file removed first), the patches kept, and the
    seconds of those the encoder took inside the stage (where the time goes)."""
    from tasks.features import extract
    from tasks.features.store import features_key
    from tasks.slides.sources import resolve_sources

    (ref,) = resolve_sources([slide], job.settings)
    job.store.delete(features_key(job.features_hash, ref.slide_id))
    encoding = []
    encode = extract.encode_batch

    def timed(encoder, inputs):
        started = time.perf_counter()
        try:
            return encode(encoder, inputs)
        finally:
            encoding.append(time.perf_counter() - started)

    extract.encode_batch = timed
    try:
        start = time.perf_counter()
        outcome = extract.feature_slide(ref, job)
        seconds = time.perf_counter() - start
    finally:
        extract.encode_batch = encode
    if outcome.status != "ok":
        raise SystemExit(f"featuring failed: {outcome.status}: {outcome.error}")
    return seconds, outcome.items, sum(encoding)


def prepared_inputs(slide: str, job) -> list:
    """The kept patches of the committed features, read and preprocessed into batches of model inputs."""
    import torch

    from tasks.features.store import read_features
    from tasks.slides.readers import open_slide

    table = read_features(job.store, job.features_hash, Path(slide).stem)
    side, mpp = job.encoder.image_size, job.settings.features.target_mpp
    with open_slide(slide) as reader:
        tensors = [job.encoder.model.prepare(rgb) for rgb in reader.read_boxes(table.boxes.tolist(), mpp, side)]
    size = job.settings.features.batch_size
    return [torch.stack(tensors[i : i + size]) for i in range(0, len(tensors), size)]


def run_forward(batches: list, job) -> float:
    from tasks.features.extract import encode_batch

    start = time.perf_counter()
    for batch in batches:
        encode_batch(job.encoder, batch)
    return time.perf_counter() - start


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=8000, help="level-0 px at 0.25 µm/px (three tissue islands)")
    parser.add_argument("--height", type=int, default=3800)
    parser.add_argument("--encoder", default="ViT-B-16", help="open_clip spec (default: ViT-B-16, random init)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=4)
    return parser.parse_args()


def _describe(slide: str, args: argparse.Namespace, job, threads) -> None:
    import torch

    identity = job.encoder.identity
    print(f"slide: {slide} ({args.width}x{args.height} px at 0.25 µm/px, real CMU-1 tissue)")
    random = " RANDOM WEIGHTS (open_clip's random init: realistic cost, noise vectors)"
    shape = f"{identity['image_size']} px in, {identity['dim']} out"
    print(f"encoder: {identity['spec']} ({shape}){random if identity['random_weights'] else ''}")
    print(
        f"features.target_mpp={job.settings.features.target_mpp} batch_size={args.batch_size} "
        f"prefetch_batches={job.settings.features.prefetch_batches} torch threads={torch.get_num_threads()} "
        f"(pathgen threads {threads})"
    )


def _rounds(slide: str, job, rounds: int) -> tuple[list[float], list[float], list[float], int]:
    """(stage seconds, forward seconds, the encoder's share of each stage run, patches), round after round."""
    import torch

    size = job.encoder.identity["image_size"]
    run_forward([torch.zeros(1, 3, size, size)], job)  # first-call allocations are nobody's cost
    stage_s, forward_s, inside, patches = [], [], [], 0
    batches = None
    for round_ in range(rounds):
        if round_ % 2:  # every other round the forward pass goes first: the order favours neither
            forward_s.append(run_forward(batches, job))
        seconds, patches, encoding = run_stage(slide, job)
        stage_s.append(seconds)
        inside.append(encoding / seconds)
        batches = batches or prepared_inputs(slide, job)
        if not round_ % 2:
            forward_s.append(run_forward(batches, job))
        print(
            f"round {round_ + 1}: stage {stage_s[-1]:.2f} s (encoder {encoding:.2f} s of it), "
            f"forward alone {forward_s[-1]:.2f} s, {patches} patches"
        )
    return stage_s, forward_s, inside, patches


def main() -> None:
    args = _arguments()
    from bench.synthetic_slide import build_slide
    from pathgen.processes import bound_threads

    threads = bound_threads(import_libraries=True)
    slide = str(build_slide(WORK / f"features-{args.width}x{args.height}.svs", args.width, args.height))
    with tempfile.TemporaryDirectory(prefix="pathgen-bench-features-") as tmp:
        job = _job(str(Path(tmp) / "store"), args.encoder, args.batch_size)
        _describe(slide, args, job, threads)
        stage_s, forward_s, inside, patches = _rounds(slide, job, args.rounds)
    stage, forward = min(stage_s), min(forward_s)
    print(f"best: stage {stage:.2f} s ({patches / stage:.2f} patches/s), forward alone {forward:.2f} s")
    print(
        f"share of the stage spent in the encoder: {min(inside):.2f}..{max(inside):.2f} (the rest: source identity, "
        "open, tissue mask, the first batch's read, Parquet commit)"
    )
    print(f"features_efficiency={forward / stage:.2f} patches_per_s={patches / stage:.2f}")


if __name__ == "__main__":
    main()
