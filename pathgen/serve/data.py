"""What the review browser reads from the store: slide records, a slide's patches for the overlay, one pair or patch
by its id, patch images, failed items and reviews. Read-only: the one write, a review, goes through
``tasks.reviews.store.save_review``.

Store layout (tasks/captions/records.py, tasks/slides/record.py, tasks/reviews/store.py): ``slides/<slide_id>/
slide.json``, ``patches/<slide_id>.parquet``, ``pairs/<agents_hash>/<slide_id>.parquet``, ``failed/<agents_hash>/
<slide_id>.parquet``, ``reviews/<agents_hash>/<slide_id>.parquet``. Every id that comes from a request is checked
(``check_slide_id``, ``check_patch_id``, ``check_agents_hash``) before it names a key.
"""

from __future__ import annotations

import io
import json
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pathgen.errors import short_error
from pathgen.serve.queries import PairIndex, ShardFooter
from tasks.captions.records import failed_key, patches_key
from tasks.reviews.store import AGENTS_HASH, PATCH_ID, REVIEWS, Review, load_slide_reviews
from tasks.slides.pictures import cluster_colour
from tasks.slides.sources import slide_id_problem
from tasks.store.listing import ObjectVersion, list_versions, object_version
from tasks.store.objects import Store

OVERLAY_COLUMNS = ["patch_id", "x", "y", "w0", "h0", "cluster", "selected_by"]
PAIR_SKIPPED = ("image", "embedding")
IMAGE_CACHE_BYTES = 256 * 2**20  # image columns of recently shown row groups
LOCATION_CACHE_SHARDS = 256  # shards whose patch_id -> row is remembered
THUMB_PX = 192
READ_THREADS = 16  # slide records read at once (S3 round trips overlap)
SLIDE_SORTS = ("slide_id", "status", "project", "kept", "pairs", "reason")


UNREADABLE = {"status": "unreadable", "project": "", "kept": 0, "pairs": 0, "pairs_by_hash": {}, "size": "",
              "random_weights": False, "random_selection": False, "random_captions": False}  # fmt: skip


class BadRequest(ValueError):
    """A request value that cannot be used: an id that cannot name a store key, a malformed filter (400)."""


class NotFound(LookupError):
    """Nothing in the store has this id; the message says what was looked for."""


def check_slide_id(slide_id: str) -> str:
    problem = slide_id_problem(slide_id)
    if problem or slide_id in (".", ".."):
        raise BadRequest(f"slide id {slide_id[:80]!r} is not one: {problem or 'it is a dot'}")
    return slide_id


def check_patch_id(patch_id: str) -> str:
    if not PATCH_ID.fullmatch(patch_id or ""):
        raise BadRequest(
            f"patch id {patch_id[:80]!r} is not one (letters, digits, '.', '_', '-'; not starting with '.')"
        )
    return patch_id


def check_agents_hash(agents_hash: str) -> str:
    if not AGENTS_HASH.fullmatch(agents_hash or ""):
        raise BadRequest(f"agents_hash {agents_hash[:80]!r} is not one (letters, digits, '_', '-')")
    return agents_hash


# -- slides ------------------------------------------------------------------------------------------------------


def slide_record(store: Store, slide_id: str) -> dict[str, Any]:
    key = f"slides/{check_slide_id(slide_id)}/slide.json"
    try:
        return store.read_json(key)
    except FileNotFoundError:
        raise NotFound(f"no slide {slide_id!r} in {store.url} (no {key})") from None


class SlideRecords:
    """Every ``slides/<slide_id>/slide.json``, each read once per version of its object (one listing per call), the
    new ones in parallel: the slides page of a store of thousands of slides reads only what changed."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._records: dict[str, tuple[ObjectVersion, dict[str, Any] | str]] = {}
        self._lock = threading.Lock()

    def all(self) -> dict[str, dict[str, Any] | str]:
        """key -> the record, or why it cannot be read."""
        listed = list_versions(self.store, "slides", "/slide.json")
        with self._lock:
            known = dict(self._records)
        stale = [key for key, version in listed.items() if known.get(key, (None,))[0] != version]
        with ThreadPoolExecutor(READ_THREADS) as pool:
            for key, record in zip(stale, pool.map(self._read, stale), strict=True):
                known[key] = (listed[key], record)
        fresh = {key: known[key] for key in listed}
        with self._lock:
            self._records = fresh
        return {key: fresh[key][1] for key in sorted(fresh)}

    def _read(self, key: str) -> dict[str, Any] | str:
        try:
            return self.store.read_json(key)
        except (OSError, ValueError) as exc:
            return f"{key} cannot be read ({short_error(exc)})"


def slide_rows(records: SlideRecords, index: PairIndex) -> list[dict[str, Any]]:
    """One row per slide record: status, reason, counts, pairs per agents_hash, random weights."""
    from tasks.report import reason_code  # the grouping `pathgen status` uses

    pairs: dict[str, dict[str, int]] = {}
    random_pairs: set[str] = set()
    for shard in index.shards():
        pairs.setdefault(shard.slide_id, {})[shard.agents_hash] = shard.rows
        if shard.random_weights:
            random_pairs.add(shard.slide_id)
    rows = []
    for key, record in records.all().items():
        if isinstance(record, str):
            rows.append({**UNREADABLE, "slide_id": key.split("/")[1], "error": record, "reason": "unreadable record"})
            continue
        slide_id = record.get("slide_id", key.split("/")[1])
        error = record.get("error")
        rows.append(
            {
                "slide_id": slide_id,
                "status": record.get("status"),
                "error": error,
                "reason": reason_code(error, slide_id) if error else "",
                "project": record.get("project") or "",
                "vendor": record.get("vendor"),
                "size": f"{record['width']} x {record['height']}" if record.get("width") else "",
                "mpp": record.get("mpp"),
                "kept": int((record.get("counts") or {}).get("kept", 0)),
                "pairs_by_hash": pairs.get(slide_id, {}),
                "pairs": sum(pairs.get(slide_id, {}).values()),
                "random_weights": bool(record.get("random_weights")) or slide_id in random_pairs,
                "random_selection": bool(record.get("random_weights")),
                "random_captions": slide_id in random_pairs,
            }
        )
    return rows


@dataclass(frozen=True)
class SlideQuery:
    """The slides table's filter and sort: the query parameters of ``/slides`` and ``/api/slides`` (a FastAPI
    dependency: a blank field of the form is unset); a bad sort or order is a ``BadRequest``."""

    status: str | None = None
    project: str | None = None
    reason: str | None = None
    q: str | None = None
    sort: str = "slide_id"
    order: str = "asc"

    def __post_init__(self) -> None:
        if self.sort not in SLIDE_SORTS:
            raise BadRequest(f"sort {self.sort[:40]!r} is not one of {', '.join(SLIDE_SORTS)}")
        if self.order not in ("asc", "desc"):
            raise BadRequest(f"order {self.order[:40]!r} is not asc or desc")
        for name in ("status", "project", "reason", "q"):
            object.__setattr__(self, name, getattr(self, name) or None)

    def as_query(self) -> dict[str, str]:
        return {k: v for k, v in vars(self).items() if v}


def filter_slides(rows: list[dict[str, Any]], query: SlideQuery) -> list[dict[str, Any]]:
    kept = [
        r
        for r in rows
        if (not query.status or r.get("status") == query.status)
        and (not query.project or r.get("project") == query.project)
        and (not query.reason or r.get("reason") == query.reason)
        and (not query.q or query.q.lower() in r["slide_id"].lower())
    ]

    def key(row: dict[str, Any]) -> tuple:
        value = row.get(query.sort)
        missing = value in (None, "")
        return (missing, 0 if missing else value, row["slide_id"])  # a missing value sorts last, never against a str

    return sorted(kept, key=key, reverse=query.order == "desc")


def random_selection(store: Store, slide_ids: set[str]) -> bool:
    """Whether any of these slides' patches were picked with random-weight embeddings (their slide records say so),
    read in parallel; a slide without a readable record says nothing."""

    def flagged(slide_id: str) -> bool:
        try:
            return bool(slide_record(store, slide_id).get("random_weights"))
        except (NotFound, OSError, ValueError):
            return False

    if not slide_ids:
        return False
    with ThreadPoolExecutor(min(READ_THREADS, len(slide_ids))) as pool:
        return any(pool.map(flagged, sorted(slide_ids)))


def slide_overlay(store: Store, slide_id: str, index: PairIndex) -> dict[str, Any]:
    """The kept patches of a slide (level-0 boxes, cluster, retrieval picks, which agents captioned them) and the
    legend of their clusters' colours, as the selection picture draws them (tasks/slides/pictures.py)."""
    key = patches_key(check_slide_id(slide_id))
    if not store.exists(key):
        return {"patches": [], "legend": [], "captioned_by": []}
    with store.open(key) as handle:
        parquet = pq.ParquetFile(handle, pre_buffer=False)
        columns = [c for c in OVERLAY_COLUMNS if c in parquet.schema_arrow.names]
        table = parquet.read(columns=columns, use_threads=False)
    hashes = sorted(s.agents_hash for s in index.shards() if s.slide_id == slide_id)
    patches, clusters = [], {}
    for row in table.to_pylist():
        picks = [p.split(":", 1)[1] for p in row.get("selected_by") or [] if p.startswith("retrieval:")]
        cluster = row.get("cluster")
        colour = "#{:02x}{:02x}{:02x}".format(*cluster_colour(cluster)) if cluster is not None else "#3070ff"
        box = {k: row[k] for k in ("patch_id", "x", "y", "w0", "h0")}
        patches.append(box | {"cluster": cluster, "colour": colour, "retrieval": picks})
        entry = clusters.setdefault(cluster, {"cluster": cluster, "colour": colour, "patches": 0, "retrieval": 0})
        entry["patches"] += 1
        entry["retrieval"] += bool(picks)
    legend = sorted(clusters.values(), key=lambda e: (e["cluster"] is None, e["cluster"] or 0))
    return {"patches": patches, "legend": legend, "captioned_by": hashes}


# -- one patch -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Location:
    key: str  # the shard holding the row
    group: int
    offset: int  # row within the row group
    agents_hash: str | None  # None: a patch shard (no caption)
    slide_id: str
    version: ObjectVersion  # of the shard the group and offset were found in: cached rows are keyed by it


class ShardLocations:
    """patch_id -> (row group, offset) per shard version, for the shards last looked at (an LRU)."""

    def __init__(self, capacity: int = LOCATION_CACHE_SHARDS) -> None:
        self._shards: OrderedDict[tuple[str, Any], dict[str, tuple[int, int]]] = OrderedDict()
        self._capacity = capacity
        self._lock = threading.Lock()

    def rows(self, store: Store, key: str, version: Any) -> dict[str, tuple[int, int]]:
        with self._lock:
            found = self._shards.get((key, version))
            if found is not None:
                self._shards.move_to_end((key, version))
                return found
        found = {}
        with store.open(key) as handle:
            parquet = pq.ParquetFile(handle, pre_buffer=False)
            for group in range(parquet.num_row_groups):
                ids = parquet.read_row_group(group, columns=["patch_id"], use_threads=False)["patch_id"]
                for offset, patch_id in enumerate(ids.to_pylist()):
                    found.setdefault(patch_id, (group, offset))
        with self._lock:
            self._shards[(key, version)] = found
            while len(self._shards) > self._capacity:
                self._shards.popitem(last=False)
        return found


def _version(store: Store, key: str) -> ObjectVersion:
    return object_version(store.fs.info(store.path(key)))


def locate_patch(
    store: Store,
    index: PairIndex,
    locations: ShardLocations,
    patch_id: str,
    slide_id: str | None = None,
    agents_hash: str | None = None,
) -> list[Location]:
    """Where a patch's rows are: its pairs (one per agents_hash that captioned it), else its patch shard row. With
    the slide given (every page links with it) only that slide's shards are read; without it, every pair shard's
    patch_id column is searched, then every patch shard's."""
    check_patch_id(patch_id)
    if slide_id is not None:
        check_slide_id(slide_id)
    if agents_hash is not None:
        check_agents_hash(agents_hash)
    shards: list[ShardFooter] = [
        s
        for s in index.shards()
        if (slide_id is None or s.slide_id == slide_id) and (agents_hash is None or s.agents_hash == agents_hash)
    ]
    found = []
    for shard in shards:
        hit = locations.rows(store, shard.key, shard.version).get(patch_id)
        if hit:
            found.append(Location(shard.key, hit[0], hit[1], shard.agents_hash, shard.slide_id, shard.version))
    if found:
        return found
    keys = [patches_key(slide_id)] if slide_id else store.list("patches", ".parquet")
    for key in keys:
        if not store.exists(key):
            continue
        version = _version(store, key)
        hit = locations.rows(store, key, version).get(patch_id)
        if hit:
            return [Location(key, hit[0], hit[1], None, key.rsplit("/", 1)[-1][: -len(".parquet")], version)]
    where = f" of slide {slide_id!r}" if slide_id else ""
    raise NotFound(f"no patch {patch_id!r}{where} in {store.url}")


def read_row(store: Store, location: Location) -> dict[str, Any]:
    """The row at a location, every column but the image and the embedding."""
    with store.open(location.key) as handle:
        parquet = pq.ParquetFile(handle, pre_buffer=False)
        columns = [c for c in parquet.schema_arrow.names if c not in PAIR_SKIPPED]
        table = parquet.read_row_group(location.group, columns=columns, use_threads=False)
    return table.slice(location.offset, 1).to_pylist()[0]


class ImageColumns:
    """The image column of recently shown row groups (a grid page shows consecutive rows of one or two shards),
    bounded in bytes; kept per shard version, as the offsets that index them are."""

    def __init__(self, capacity_bytes: int = IMAGE_CACHE_BYTES) -> None:
        self._groups: OrderedDict[tuple[str, ObjectVersion, int], pa.ChunkedArray] = OrderedDict()
        self._capacity = capacity_bytes
        self._bytes = 0
        self._lock = threading.Lock()

    def image(self, store: Store, location: Location) -> bytes:
        cache_key = (store.uri(location.key), location.version, location.group)
        with self._lock:
            column = self._groups.get(cache_key)
            if column is not None:
                self._groups.move_to_end(cache_key)
        if column is None:
            with store.open(location.key) as handle:
                parquet = pq.ParquetFile(handle, pre_buffer=False)
                column = parquet.read_row_group(location.group, columns=["image"], use_threads=False)["image"]
            with self._lock:
                if cache_key not in self._groups:
                    self._groups[cache_key] = column
                    self._bytes += column.nbytes
                while self._bytes > self._capacity and len(self._groups) > 1:
                    _, old = self._groups.popitem(last=False)
                    self._bytes -= old.nbytes
        return column[location.offset].as_py()


def thumbnail(jpeg: bytes, side: int = THUMB_PX) -> bytes:
    image = Image.open(io.BytesIO(jpeg)).convert("RGB")
    image.thumbnail((side, side))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=85)
    return out.getvalue()


def failed_items(store: Store, agents_hash: str, slide_id: str) -> list[dict[str, Any]]:
    """The slide's items that failed captioning: stage, reason, detail."""
    key = failed_key(check_agents_hash(agents_hash), check_slide_id(slide_id))
    if not store.exists(key):
        return []
    with store.open(key) as handle:
        table = pq.ParquetFile(handle, pre_buffer=False).read(use_threads=False)
    return table.to_pylist()


def parse_json(text: str | None) -> Any:
    try:
        return json.loads(text) if text else None
    except ValueError:
        return text


# -- reviews -------------------------------------------------------------------------------------------------------


class ReviewCache:
    """Each slide's latest reviews, read once per version of its review file; the versions come from one listing
    of ``reviews/`` per request (``refresh``)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._versions: dict[str, ObjectVersion] = {}
        self._loaded: dict[str, tuple[ObjectVersion, dict[str, Review]]] = {}
        self._lock = threading.Lock()

    def refresh(self) -> None:
        versions = list_versions(self.store, REVIEWS, ".parquet")
        with self._lock:
            self._versions = versions

    def version(self, agents_hash: str, slide_id: str) -> ObjectVersion | None:
        return self._versions.get(f"{REVIEWS}/{agents_hash}/{slide_id}.parquet")

    def slide(self, agents_hash: str, slide_id: str) -> dict[str, Review]:
        key = f"{REVIEWS}/{agents_hash}/{slide_id}.parquet"
        version = self._versions.get(key)
        if version is None:
            return {}
        with self._lock:
            cached = self._loaded.get(key)
        if cached is not None and cached[0] == version:
            return cached[1]
        try:
            reviews = load_slide_reviews(self.store, agents_hash, slide_id, problems=[])
        except ValueError:  # not a review file: the slide shows as unreviewed; `pathgen status` names the file
            reviews = {}
        with self._lock:
            self._loaded[key] = (version, reviews)
        return reviews

    def verdicts(self, agents_hash: str, slide_id: str) -> dict[str, str]:
        return {patch_id: review.verdict for patch_id, review in self.slide(agents_hash, slide_id).items()}
