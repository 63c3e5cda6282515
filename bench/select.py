"""What representative selection costs, on the extract benchmark slide, with the tiny model on the CPU.

Run: ``python bench/select.py`` (builds the slide under bench/_work on first use).

- extraction alone: ``selection.method=all`` reads, scores, encodes and writes every tissue candidate.
- with selection: ``selection.method=representative`` reads and scores every candidate, embeds it (tiny-random
  open_clip on the CPU: random weights, so the picks are noise and the near-duplicate filter is skipped; the
  timing is what matters), clusters, retrieves, and re-reads only the chosen patches to encode and write them.
  With the default cap (256) this slide has under 3 candidates per kept patch, so they are encoded during the first
  pass; with a cap of 128 the chosen patches are read again, the path large slides take. Both in fresh processes,
  steady state (best of two after a warm-up run), as in bench/extract.py.
- k-means plus the near-duplicate filter alone for 50,000 candidates of 768 dimensions (ViT-L-14's embedding
  width), clustered synthetic embeddings with a fifth near-copies, paper settings (k by the rule, K=16,
  threshold 0.88, cap 256).
"""

from __future__ import annotations

import sys

# This file's name is the contract, and it shadows the standard library's `select` module when run as a
# script: take its folder off the import path before anything imports `select` (subprocess does).
sys.path[:] = [p for p in sys.path if p not in ("", __file__.rsplit("/", 1)[0])]

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def cluster_seconds(n: int = 50_000, dim: int = 768, seed: int = 0) -> tuple[float, dict]:
    from tasks.selection.representative import select_representative

    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(60, dim)).astype(np.float32)
    x = centres[rng.integers(0, len(centres), n)] + 0.7 * rng.normal(size=(n, dim)).astype(np.float32)
    # A fifth of the candidates are near-copies of others (overlapping tissue, re-scans), as on real slides.
    copies = rng.choice(n, n // 5, replace=False)
    x[copies] = x[rng.integers(0, n, len(copies))] + 0.05 * rng.normal(size=(len(copies), dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    attributes = (x @ centres[:20].T).max(axis=1)
    start = time.perf_counter()
    chosen = select_representative(x, attributes, None, max_per_slide=256, top_k=16, duplicate_threshold=0.88, seed=0)
    seconds = time.perf_counter() - start
    return seconds, {"k": chosen.k, "kept": len(chosen.indices), "dropped_duplicates": chosen.dropped_duplicates}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=40_000)
    parser.add_argument("--height", type=int, default=30_000)
    args = parser.parse_args()

    from bench.extract import WORK, worker
    from bench.synthetic_slide import build_slide

    slide = str(build_slide(WORK / f"bench-{args.width}x{args.height}.svs", args.width, args.height))
    print(f"slide: {slide} ({args.width}x{args.height} px, MPP 0.25; 672 px patches at the slide's MPP)")
    with tempfile.TemporaryDirectory(prefix="pathgen-bench-select-") as tmp:
        alone = json.loads(worker(slide, os.path.join(tmp, "all")).communicate()[0])
        chosen = json.loads(
            worker(slide, os.path.join(tmp, "repr"), {"selection.method": "representative"}).communicate()[0]
        )
        # A cap of 128 makes candidates more than 3x the cap: the chosen patches are read a second time, as on
        # large slides (tens of thousands of candidates), instead of being encoded during the first pass.
        reread = json.loads(
            worker(
                slide,
                os.path.join(tmp, "reread"),
                {"selection.method": "representative", "selection.max_per_slide": 128},
            ).communicate()[0]
        )
    overhead = chosen["seconds"] / alone["seconds"] - 1
    print(f"extraction alone (all):   {alone['seconds']:6.2f} s, {alone['patches']} patches written")
    print(
        f"with representative selection: {chosen['seconds']:6.2f} s, {chosen['counts']['candidates']} candidates "
        f"embedded, {chosen['patches']} written (tiny-random model on CPU: RANDOM WEIGHTS, picks are noise)"
    )
    print(
        f"with selection, cap 128 (re-read path): {reread['seconds']:6.2f} s, {reread['patches']} written, "
        f"overhead {reread['seconds'] / alone['seconds'] - 1:.2f}"
    )
    seconds, info = cluster_seconds()
    print(
        f"k-means + near-duplicate filter, 50,000 x 768: {seconds:.2f} s (k={info['k']}, kept {info['kept']}, "
        f"dropped {info['dropped_duplicates']} near-duplicates)"
    )
    print(f"select_overhead={overhead:.2f} cluster_seconds_50k={seconds:.2f}")


if __name__ == "__main__":
    main()
