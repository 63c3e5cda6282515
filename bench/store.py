"""What one shard costs on S3: the old commit (temporary key, then copy and delete) against a write to the final key.

Run: ``python bench/store.py [--sizes-mb 1 8 120] [--shards N]`` (SeaweedFS on 127.0.0.1, under bench/_work/store).

Both protocols upload the same local shard file through one s3fs filesystem in the same run, alternating shard by
shard. The old one is reproduced here as ``Store`` did it before: ``put_file`` to ``.<name>.<owner>.tmp`` beside
the final key, then ``fs.mv`` (s3fs: CopyObject, then DeleteObject). The new one is ``Store.put_file``, which
uploads straight to the final key (one PutObject, or a multipart upload above s3fs's part size). Every S3 call
s3fs makes is counted by wrapping its ``_call_s3``: *sent* is the request bodies the client uploads (PutObject,
UploadPart), *written* adds the bytes the server copies for CopyObject (the source object's size), which is traffic
inside the store that a client-side count cannot see. Printed per shard, with the ratio old / new.
"""

from __future__ import annotations

import sys

# bench/select.py would shadow the standard library's `select` module: keep this folder off the import path.
sys.path[:] = [p for p in sys.path if p not in ("", __file__.rsplit("/", 1)[0])]

import argparse
import collections
import os
import shutil
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.seaweed import seaweedfs  # noqa: E402
from tasks.store.objects import Store, temporary_name  # noqa: E402

WORK = ROOT / "bench" / "_work" / "store"
BUCKET, S3_KEY, S3_SECRET = "bench", "bench-key", "bench-secret"
UPLOADS = ("put_object", "upload_part")


class CallCounter:
    """Counts s3fs's S3 calls by operation, the bytes it uploads and the bytes the server copies."""

    def __init__(self, fs) -> None:
        self.fs, self.original = fs, fs._call_s3
        self.reset()
        fs._call_s3 = self._call

    def reset(self) -> None:
        self.calls: collections.Counter[str] = collections.Counter()
        self.sent = self.copied = 0

    async def _call(self, method, *args, **kwargs):
        self.calls[method] += 1
        if method in UPLOADS:
            self.sent += len(kwargs.get("Body", b""))
        out = await self.original(method, *args, **kwargs)
        if method == "copy_object":
            source = kwargs["CopySource"]
            head = await self.original("head_object", Bucket=source["Bucket"], Key=source["Key"])
            self.copied += int(head["ContentLength"])
        return out

    def close(self) -> None:
        del self.fs._call_s3  # the instance attribute shadowed the class's method


def old_put_file(store: Store, local: Path, key: str) -> None:
    """The protocol before this change: temporary key, then a move (CopyObject + DeleteObject on S3)."""
    head, tail = os.path.split(key)
    tmp = store.path(os.path.join(head, temporary_name(tail)))
    store.fs.put_file(str(local), tmp)
    store.fs.mv(tmp, store.path(key))


def measure(store: Store, counter: CallCounter, local: Path, key: str, old: bool) -> dict:
    counter.reset()
    start = time.perf_counter()
    if old:
        old_put_file(store, local, key)
    else:
        store.put_file(local, key)
    seconds = time.perf_counter() - start
    return {
        "sent": counter.sent,
        "written": counter.sent + counter.copied,
        "requests": sum(counter.calls.values()),
        "calls": dict(counter.calls),
        "seconds": seconds,
    }


def mean(rows: list[dict], field: str) -> float:
    return sum(r[field] for r in rows) / len(rows)


def report(size_mb: float, old: list[dict], new: list[dict]) -> None:
    print(f"shard {size_mb:g} MiB ({len(old)} shards each)")
    print(f"  old calls per shard: {old[0]['calls']}")
    print(f"  new calls per shard: {new[0]['calls']}")
    for field, unit in (("sent", "bytes"), ("written", "bytes"), ("requests", ""), ("seconds", "s")):
        before, after = mean(old, field), mean(new, field)
        ratio = before / after if after else float("inf")
        fmt = ".3f" if field == "seconds" else ",.0f"
        print(f"  {field:<9} per shard: old {before:{fmt}} {unit:<5} new {after:{fmt}} {unit:<5} old/new {ratio:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes-mb", type=float, nargs="+", default=[1.0, 8.0])
    parser.add_argument("--shards", type=int, default=3, help="shards per size and protocol")
    args = parser.parse_args()
    shutil.rmtree(WORK, ignore_errors=True)
    with seaweedfs(WORK / "seaweed", S3_KEY, S3_SECRET, BUCKET, volume_mb=256) as endpoint:
        os.environ.update(
            PATHGEN_S3_ENDPOINT_URL=endpoint,
            AWS_ACCESS_KEY_ID=S3_KEY,
            AWS_SECRET_ACCESS_KEY=S3_SECRET,
            AWS_DEFAULT_REGION="us-east-1",
        )
        store = Store(f"s3://{BUCKET}/run")
        store.check()
        counter = CallCounter(store.fs)
        try:
            for size_mb in args.sizes_mb:
                local = WORK / f"shard-{size_mb:g}.parquet"
                local.write_bytes(os.urandom(int(size_mb * 2**20)))
                old, new = [], []
                for i in range(args.shards):
                    old.append(measure(store, counter, local, f"old/{size_mb:g}/{i}.parquet", old=True))
                    new.append(measure(store, counter, local, f"new/{size_mb:g}/{i}.parquet", old=False))
                report(size_mb, old, new)
        finally:
            counter.close()


if __name__ == "__main__":
    main()
