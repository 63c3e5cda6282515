"""Caption planning on a large store: ``plan_captions`` over 10,000 slides' patch shards and 5,000 pair shards.

Run: ``python bench/plan.py`` (builds both stores under bench/_work/plan, starts SeaweedFS on 127.0.0.1 for the S3
one and stops it at the end; building takes a minute or two, most of it the S3 writes).

- the store: one tiny patch shard per slide, ``patches/<slide_id>.parquet`` (a valid Parquet file with the patch
  schema, one row with a few-byte image and ``pathgen.extraction_hash`` in its metadata), then, written after them
  so they are newer, pair shards ``pairs/<agents_hash>/<slide_id>.parquet`` for every other slide. Planning only
  lists the store, so every patch shard carries the same bytes (and every pair shard the same bytes).
- local: the store on this machine's disk; s3: the same objects on SeaweedFS through s3fs, as in production.
- timed: ``plan_captions(Store(url), agents_hash)`` with a fresh Store and fresh fsspec instances each time (no
  listing cache carried over), best of 3; each run must find exactly the slides without pairs pending and the
  others done.
"""

from __future__ import annotations

import sys

# bench/select.py would shadow the standard library's `select` module: keep this folder off the import path.
sys.path[:] = [p for p in sys.path if p not in ("", __file__.rsplit("/", 1)[0])]

import argparse
import contextlib
import io
import math
import os
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORK = ROOT / "bench" / "_work" / "plan"
AGENTS_HASH = "b3nchb3nch00"  # planning only compares keys: any 12-character hash does
BUCKET = "pathgen-bench-plan"
S3_KEY, S3_SECRET = "pathgen-bench", "pathgen-bench-secret"
REPEATS = 3


def slide_ids(n: int) -> list[str]:
    return [f"bench-slide-{i:06d}" for i in range(n)]


def with_pairs(ids: list[str]) -> list[str]:
    """Every other slide has been captioned."""
    return ids[::2]


def _patch_row() -> dict[str, Any]:
    """One patch row, as extraction writes it (the image a minimal JPEG)."""
    return {
        "patch_id": "0" * 20,
        "slide_id": "bench-slide",
        "source_uri": "file:///bench/bench-slide.svs",
        "project": None,
        "file_id": None,
        "x": 0,
        "y": 0,
        "w0": 224,
        "h0": 224,
        "level": 0,
        "mpp": 0.5,
        "slide_mpp": 0.5,
        "patch_px": 224,
        "tissue_fraction": 0.9,
        "background_fraction": 0.1,
        "sharpness": 1.0,
        "pen_fraction": 0.0,
        "selected_by": ["all"],
        "cluster": None,
        "attribute_score": None,
        "findings_score": None,
        "embedding": None,
        "source_caption": None,
        "image": b"\xff\xd8\xff\xd9",
    }


def _pair_row(patch: dict[str, Any]) -> dict[str, Any]:
    """The pair captioning ``patch`` makes: its fields but the embedding, and the texts and models."""
    text = {"description": "tissue.", "revised_description": "tissue.", "caption": "tissue.", "created_at": "now"}
    return {
        **{k: v for k, v in patch.items() if k != "embedding"},
        **text,
        "revise_changed": False,
        "revise_change": 0.0,
        "caption_tokens": 4,
        "caption_trimmed": False,
        "describe_model": "bench",
        "revise_model": "bench",
        "summarize_model": "bench",
        "prompt_versions": "{}",
        "sampling": "{}",
        "agents_hash": AGENTS_HASH,
        "extraction_hash": "e" * 12,
        "random_weights": True,
        "factory_version": "bench",
    }


def _one_row_parquet(row: dict[str, Any], schema, kind: str, extra: dict[str, str]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tasks.slides.shard import shard_metadata

    buffer = io.BytesIO()
    table = pa.Table.from_pylist([row], schema.with_metadata(shard_metadata(kind, extra)))
    pq.write_table(table, buffer, compression="zstd")
    data = buffer.getvalue()
    assert pq.ParquetFile(io.BytesIO(data)).metadata.num_rows == 1
    return data


def parquet_payloads() -> tuple[bytes, bytes]:
    """(patch shard, pair shard): each one valid Parquet file of one row, built once and shared by every slide."""
    from tasks.captions.records import PAIR_SCHEMA
    from tasks.slides.shard import PATCH_SCHEMA

    patch = _patch_row()
    meta = {"pathgen.extraction_hash": "e" * 12, "pathgen.slide_id": "bench-slide"}
    pair_meta = {**meta, "pathgen.agents_hash": AGENTS_HASH, "pathgen.commit_id": "0" * 32}
    return (
        _one_row_parquet(patch, PATCH_SCHEMA, "patches", meta),
        _one_row_parquet(_pair_row(patch), PAIR_SCHEMA, "pairs", pair_meta),
    )


def object_sets(n: int) -> tuple[list[str], list[str]]:
    from tasks.captions.records import pair_key, patches_key

    ids = slide_ids(n)
    return [patches_key(s) for s in ids], [pair_key(AGENTS_HASH, s) for s in with_pairs(ids)]


def build_local(root: Path, n: int, patch: bytes, pair: bytes) -> float:
    """Writes the store on local disk; returns seconds."""
    start = time.perf_counter()
    shutil.rmtree(root, ignore_errors=True)
    patch_keys, pair_keys = object_sets(n)
    for keys, data in ((patch_keys, patch), (pair_keys, pair)):
        (root / keys[0]).parent.mkdir(parents=True, exist_ok=True)
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda key, data=data: (root / key).write_bytes(data), keys))
    # The pair shards were written after the patch shards; make "newer" hold even on a coarse-clock filesystem.
    newest_patch = max(os.stat(root / k).st_mtime for k in patch_keys)
    for key in pair_keys:
        if os.stat(root / key).st_mtime <= newest_patch:
            os.utime(root / key, (newest_patch + 1, newest_patch + 1))
    return time.perf_counter() - start


def build_s3(url: str, n: int, patch: bytes, pair: bytes) -> float:
    """Writes the store on S3 (concurrent puts through s3fs); returns seconds."""
    import fsspec

    start = time.perf_counter()
    fs, root = fsspec.core.url_to_fs(url, client_kwargs={"endpoint_url": os.environ["PATHGEN_S3_ENDPOINT_URL"]})
    root = root.rstrip("/")
    patch_keys, pair_keys = object_sets(n)
    fs.pipe({f"{root}/{k}": patch for k in patch_keys}, batch_size=256)
    # S3's LastModified has one-second resolution: the pairs must be strictly newer than every patch shard.
    time.sleep(1.5)
    fs.pipe({f"{root}/{k}": pair for k in pair_keys}, batch_size=256)
    return time.perf_counter() - start


def time_plan(url: str, n: int) -> tuple[list[float], int, int]:
    """plan_captions with a fresh Store and fresh fsspec instances each time: (seconds of each run, pending, done)."""
    import fsspec

    from tasks.captions.plan import plan_captions
    from tasks.store.objects import Store

    expected_done = set(with_pairs(slide_ids(n)))
    runs = []
    for _ in range(REPEATS):
        fsspec.AbstractFileSystem.clear_instance_cache()
        start = time.perf_counter()
        store = Store(url)
        store.fs.invalidate_cache()
        plan = plan_captions(store, AGENTS_HASH)
        runs.append(time.perf_counter() - start)
        if set(plan.done) != expected_done or len(plan.pending) != n - len(expected_done):
            raise SystemExit(
                f"{url}: plan found {len(plan.pending)} pending and {len(plan.done)} done, expected "
                f"{n - len(expected_done)} and {len(expected_done)}"
            )
    return runs, len(plan.pending), len(plan.done)


@contextlib.contextmanager
def seaweedfs_here(workdir: Path) -> Iterator[str]:
    """The bench's S3 endpoint, with its credentials in this process's environment while it runs."""
    from bench.seaweed import seaweedfs

    shutil.rmtree(workdir, ignore_errors=True)
    with seaweedfs(workdir, S3_KEY, S3_SECRET, BUCKET, volume_mb=64) as endpoint:
        environ = {
            "PATHGEN_S3_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": S3_KEY,
            "AWS_SECRET_ACCESS_KEY": S3_SECRET,
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        saved = {name: os.environ.get(name) for name in environ}
        os.environ.update(environ)
        try:
            yield endpoint
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slides", type=int, default=10_000)
    parser.add_argument("--work", type=Path, default=WORK)
    args = parser.parse_args()
    n = args.slides
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)

    patch, pair = parquet_payloads()
    paired = len(with_pairs(slide_ids(n)))
    print(
        f"store: {n} patch shards ({len(patch)} B each) and {paired} pair shards ({len(pair)} B each) under "
        f"pairs/{AGENTS_HASH}/, written after the patch shards"
    )
    results: dict[str, tuple[list[float], int, int, float]] = {}
    local_root = work / "store"
    built = build_local(local_root, n, patch, pair)
    results["local"] = (*time_plan(str(local_root), n), built)
    print(f"local: built in {built:.1f} s, planned in {min(results['local'][0]):.2f} s", flush=True)
    try:
        with seaweedfs_here(work / "seaweedfs") as endpoint:
            url = f"s3://{BUCKET}/store"
            print(f"writing {n + paired} objects to SeaweedFS at {endpoint} ...", flush=True)
            built = build_s3(url, n, patch, pair)
            results["s3"] = (*time_plan(url, n), built)
    finally:
        with contextlib.suppress(Exception):
            import pyarrow.fs

            pyarrow.fs.finalize_s3()

    print(f"{'store':<6} {'objects':>8} {'build s':>8} {'pending':>8} {'done':>6} {'best s':>8}  runs (s)")
    for name, (runs, pending, done, built) in results.items():
        listed = ", ".join(f"{s:.2f}" for s in runs)
        print(f"{name:<6} {n + paired:>8} {built:>8.1f} {pending:>8} {done:>6} {min(runs):>8.2f}  {listed}")
    best = {name: min(r[0]) if r[0] else math.inf for name, r in results.items()}
    print(f"plan_seconds_local={best['local']:.2f} plan_seconds_s3={best['s3']:.2f}")


if __name__ == "__main__":
    main()
