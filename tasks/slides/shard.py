"""The patch record (architecture document, "Record contracts") and its Parquet shard writer."""

from __future__ import annotations

import hashlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from tasks.work.shards import SCHEMA_VERSION as SCHEMA_VERSION  # re-exported: the patch records' version
from tasks.work.shards import shard_metadata

ROWS_PER_GROUP = 64  # ~5 MB of JPEG per row group: readers can stream a shard without loading it whole

PATCH_SCHEMA = pa.schema(
    [
        pa.field("patch_id", pa.string(), nullable=False),
        pa.field("slide_id", pa.string(), nullable=False),
        pa.field("source_uri", pa.string(), nullable=False),
        pa.field("project", pa.string()),
        pa.field("file_id", pa.string()),
        pa.field("x", pa.int64(), nullable=False),
        pa.field("y", pa.int64(), nullable=False),
        pa.field("w0", pa.int32(), nullable=False),
        pa.field("h0", pa.int32(), nullable=False),
        pa.field("level", pa.int16(), nullable=False),
        pa.field("mpp", pa.float32(), nullable=False),
        pa.field("slide_mpp", pa.float32(), nullable=False),
        pa.field("patch_px", pa.int32(), nullable=False),
        pa.field("tissue_fraction", pa.float32(), nullable=False),
        pa.field("background_fraction", pa.float32()),
        pa.field("sharpness", pa.float32()),
        pa.field("pen_fraction", pa.float32()),
        pa.field("selected_by", pa.list_(pa.string())),
        pa.field("cluster", pa.int32()),
        pa.field("attribute_score", pa.float32()),
        pa.field("findings_score", pa.float32()),
        pa.field("embedding", pa.list_(pa.float32())),
        pa.field("source_caption", pa.string()),
        pa.field("image", pa.binary(), nullable=False),
    ]
)


def patch_id_for(slide_id: str, box: tuple[int, int, int, int], target_mpp: float, patch_px: int) -> str:
    """Stable across runs and machines: the same slide, box and scale always give the same id."""
    key = f"{slide_id}|{box[0]},{box[1]},{box[2]},{box[3]}|{target_mpp:.6g}|{patch_px}"
    return hashlib.sha256(key.encode()).hexdigest()[:20]


@dataclass
class PatchRecord:
    patch_id: str
    slide_id: str
    source_uri: str
    project: str | None
    file_id: str | None
    x: int
    y: int
    w0: int
    h0: int
    level: int
    mpp: float
    slide_mpp: float
    patch_px: int
    tissue_fraction: float
    background_fraction: float | None
    sharpness: float | None
    pen_fraction: float | None
    image: bytes
    selected_by: list[str] = field(default_factory=list)
    cluster: int | None = None
    attribute_score: float | None = None
    findings_score: float | None = None
    embedding: list[float] | None = None
    source_caption: str | None = None


class PatchShardWriter:
    """Streams patch records into one Parquet file in row groups; commit is the caller's (Store.staged_file).

    Row groups are written by one background thread while the caller reads and encodes the next patches (pyarrow
    releases the GIL while it encodes and writes), with at most one row group in flight, so memory stays bounded. A
    write's error is raised by the next ``add`` or by ``close``, which always waits for the write and closes the file.
    """

    def __init__(self, local_path: str, metadata: dict[str, str]) -> None:
        schema = PATCH_SCHEMA.with_metadata(shard_metadata("patches", metadata))
        # JPEG bytes do not compress further: leave them uncompressed and dictionary-free.
        self._writer = pq.ParquetWriter(
            local_path,
            schema,
            compression={name: ("NONE" if name == "image" else "ZSTD") for name in schema.names},
            use_dictionary=[n for n in schema.names if n not in ("image", "embedding", "patch_id")],
            # min/max statistics over megabytes of JPEG bytes cost time and help no query
            write_statistics=[n for n in schema.names if n not in ("image", "embedding")],
        )
        self._schema = schema
        self._pending: list[PatchRecord] = []
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pathgen-shard")
        self._writing: Future | None = None
        self.rows = 0

    def add(self, records: list[PatchRecord]) -> None:
        self._pending.extend(records)
        while len(self._pending) >= ROWS_PER_GROUP:
            self._flush(self._pending[:ROWS_PER_GROUP])
            self._pending = self._pending[ROWS_PER_GROUP:]

    def _flush(self, records: list[PatchRecord]) -> None:
        if not records:
            return
        columns = {name: [getattr(r, name) for r in records] for name in self._schema.names}
        table = pa.Table.from_pydict(columns, schema=self._schema)  # here: building it needs the GIL throughout
        self._wait()
        self._writing = self._pool.submit(self._writer.write_table, table)
        self.rows += len(records)

    def _wait(self) -> None:
        """Wait for the row group in flight; its error (a full disk) is raised here."""
        writing, self._writing = self._writing, None
        if writing is not None:
            writing.result()

    def close(self) -> None:
        try:
            self._flush(self._pending)
            self._pending = []
            self._wait()
        finally:
            self._pool.shutdown(wait=True)  # a failed flush still leaves no write running on a closed file
            self._writer.close()


def read_shard(handle, columns: list[str] | None = None) -> pa.Table:
    """Read a shard from an open (fsspec) file. Through ParquetFile, not read_table: read_table goes through
    pyarrow.dataset, which brings up pyarrow's S3 client, whose C++ threads can abort the interpreter at exit
    ("terminate called without an active exception"); pre-buffering over a Python file object can do the same, and
    so can a threaded read, whose CPU pool workers touch the Python file object and outlive the command."""
    return pq.ParquetFile(handle, pre_buffer=False).read(columns=columns, use_threads=False)
