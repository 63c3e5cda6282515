"""Server-side paging of the pairs across the store, bounded by the page, not by the store.

The pairs are ``pairs/<agents_hash>/<slide_id>.parquet`` (tasks/captions/records.py), ordered here by key and then
by row. Each shard's footer (row count per row group, min/max statistics, provenance) is read once per object
version and kept, so page N of an unfiltered listing is found by arithmetic on the row counts and reads only the
row groups that hold its rows: a million pairs page as fast as a hundred. Filters are pushed down: agents_hash and
slide by key, project, caption length, trimmed and revise change by row-group statistics (a row group that cannot
match is never read), and what remains (a text search in captions, review state) is evaluated on the filter columns
of the row groups that may match. How many rows of each row group match a filter is remembered per shard version,
so paging on through a filtered listing reads only the row groups of the page asked for.

Shards are read with ``pyarrow.parquet.ParquetFile`` over the store's fsspec handles (as every reader in the factory,
see tasks/slides/shard.py ``read_shard``), not through ``pyarrow.dataset``, whose S3 client can abort the process at
exit. Every page says how many rows it decoded (``rows_read``): the tests bound it.
"""

from __future__ import annotations

import json
import math
import posixpath
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, Literal, get_args

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tasks.store.listing import ObjectVersion, list_versions
from tasks.store.objects import Store

PAIRS_FOLDER = "pairs"
GRID_COLUMNS = [
    "patch_id",
    "slide_id",
    "project",
    "caption",
    "caption_tokens",
    "caption_trimmed",
    "revise_changed",
    "random_weights",
    "agents_hash",
]
STATISTIC_COLUMNS = ("project", "caption_tokens", "caption_trimmed", "revise_changed", "random_weights")
LISTING_SECONDS = 2.0  # one listing of pairs/ serves the requests of a page view (its 48 thumbnails)
MATCH_CACHE_ENTRIES = 200_000  # (filter, shard version) -> matches per row group; a few hundred bytes each
ReviewState = Literal["unreviewed", "reviewed", "accept", "reject", "correct"]
REVIEW_STATES: tuple[str, ...] = get_args(ReviewState)


@dataclass(frozen=True)
class ShardFooter:
    """What a pair shard's footer says: enough to page and to prune without reading any row."""

    key: str
    agents_hash: str
    slide_id: str
    version: ObjectVersion  # (mtime, size, ETag): a new commit is a new version
    row_groups: tuple[int, ...]  # rows per row group
    stats: tuple[dict[str, tuple[Any, Any]], ...]  # per row group: column -> (min, max), where written
    random_weights: bool

    @property
    def rows(self) -> int:
        return sum(self.row_groups)


@dataclass(frozen=True)
class PairFilter:
    """What the pairs grid is narrowed to; every field unset lists every pair."""

    agents_hash: str | None = None
    slide_id: str | None = None
    project: str | None = None
    min_tokens: int | None = None
    max_tokens: int | None = None
    trimmed: bool | None = None
    revise_changed: bool | None = None
    review: ReviewState | None = None
    text: str | None = None

    @property
    def by_rows(self) -> bool:
        """Whether rows must be looked at (beyond keys): then a page's position is found by counting matches."""
        by_key = ("agents_hash", "slide_id")
        return any(getattr(self, f.name) not in (None, "") for f in fields(self) if f.name not in by_key)

    def as_query(self) -> dict[str, str]:
        """The filter as URL query parameters (the pairs page links its pages with them)."""
        query = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value not in (None, ""):
                query[f.name] = str(value).lower() if isinstance(value, bool) else str(value)
        return query


# Reviews of one slide under one agents_hash: patch_id -> verdict ("accept" | "reject" | "correct"), latest wins.
ReviewVerdicts = Callable[[str, str], dict[str, str]]


@dataclass
class PairPage:
    rows: list[dict[str, Any]]
    page: int
    page_size: int
    total: int | None  # exact when known: unfiltered, or every candidate row group counted
    upper_bound: int  # pairs in the shards the filter's keys leave
    has_next: bool
    rows_read: int  # rows decoded to build this page (filter and grid columns): bounded by the page, not the store


def _shard_parts(key: str) -> tuple[str, str] | None:
    parts = key.split("/")
    if len(parts) != 3 or parts[0] != PAIRS_FOLDER or not parts[2].endswith(".parquet"):
        return None
    return parts[1], parts[2][: -len(".parquet")]


def _statistics(row_group: pq.RowGroupMetaData, names: list[str]) -> dict[str, tuple[Any, Any]]:
    found = {}
    for i, name in enumerate(names):
        if name not in STATISTIC_COLUMNS:
            continue
        stats = row_group.column(i).statistics
        if stats is not None and stats.has_min_max:
            found[name] = (stats.min, stats.max)
    return found


def read_footer(store: Store, key: str, version: ObjectVersion) -> ShardFooter:
    """A pair shard's footer alone (one ranged read on S3)."""
    agents_hash, slide_id = _shard_parts(key) or ("", "")
    with store.open(key) as handle:
        parquet = pq.ParquetFile(handle, pre_buffer=False)
        meta = parquet.metadata
        names = [meta.schema.column(i).path for i in range(meta.num_columns)]
        groups = [meta.row_group(i) for i in range(meta.num_row_groups)]
        kv = {k.decode(): v.decode() for k, v in (parquet.schema_arrow.metadata or {}).items()}
    stats = tuple(_statistics(g, names) for g in groups)
    try:
        provenance_random = bool(json.loads(kv.get("pathgen.provenance", "{}")).get("random_weights"))
    except ValueError:
        provenance_random = False
    random_rows = any(s.get("random_weights", (False, False))[1] for s in stats)
    return ShardFooter(
        key, agents_hash, slide_id, version, tuple(g.num_rows for g in groups), stats, provenance_random or random_rows
    )


class PairIndex:
    """The footers of every pair shard in the store, each read once per version of its object; thread-safe."""

    def __init__(self, store: Store, listing_seconds: float = LISTING_SECONDS) -> None:
        self.store = store
        self._footers: dict[str, ShardFooter] = {}
        self._lock = threading.Lock()
        self._listed_at = -math.inf
        self._listing_seconds = listing_seconds
        self.footers_read = 0

    def shards(self) -> list[ShardFooter]:
        """Every pair shard, sorted by key: one listing (reused for ``listing_seconds``), and footers only for objects
        new since the last listing."""
        with self._lock:
            if time.monotonic() - self._listed_at < self._listing_seconds:
                return [self._footers[k] for k in sorted(self._footers)]
        listed = {k: v for k, v in list_versions(self.store, PAIRS_FOLDER, ".parquet").items() if _shard_parts(k)}
        with self._lock:
            known = dict(self._footers)
        fresh = {}
        for key, version in listed.items():
            footer = known.get(key)
            if footer is None or footer.version != version:
                try:
                    footer = read_footer(self.store, key, version)
                except (OSError, pa.ArrowException):
                    continue  # removed between the listing and the read, or not Parquet: not a pair shard to page
                self.footers_read += 1
            fresh[key] = footer
        with self._lock:
            self._footers, self._listed_at = fresh, time.monotonic()
        return [fresh[k] for k in sorted(fresh)]

    def agents_hashes(self) -> list[str]:
        return sorted({s.agents_hash for s in self.shards()})


class MatchCounts:
    """(filter, shard version, reviews version) -> matching rows per row group: an LRU shared by all requests."""

    def __init__(self, capacity: int = MATCH_CACHE_ENTRIES) -> None:
        self._entries: OrderedDict[tuple, tuple[int, ...]] = OrderedDict()
        self._capacity = capacity
        self._lock = threading.Lock()

    def get(self, key: tuple) -> tuple[int, ...] | None:
        with self._lock:
            found = self._entries.get(key)
            if found is not None:
                self._entries.move_to_end(key)
            return found

    def put(self, key: tuple, counts: tuple[int, ...]) -> None:
        with self._lock:
            self._entries[key] = counts
            self._entries.move_to_end(key)
            while len(self._entries) > self._capacity:
                self._entries.popitem(last=False)


def _may_match(stats: dict[str, tuple[Any, Any]], flt: PairFilter) -> bool:
    """False when the row group's statistics prove that no row matches (a missing statistic proves nothing)."""

    def outside(column: str, low: Any = None, high: Any = None) -> bool:
        if column not in stats:
            return False
        lo, hi = stats[column]
        return (low is not None and hi < low) or (high is not None and lo > high)

    if flt.project and outside("project", flt.project, flt.project):
        return False
    if outside("caption_tokens", flt.min_tokens, flt.max_tokens):
        return False
    for column, wanted in (("caption_trimmed", flt.trimmed), ("revise_changed", flt.revise_changed)):
        if wanted is not None and outside(column, wanted, wanted):
            return False
    return True


def _all_match(stats: dict[str, tuple[Any, Any]], flt: PairFilter) -> bool:
    """True when the row group's statistics prove that every row matches (no text or review filter: those need rows)."""
    if flt.text or flt.review:
        return False

    def within(column: str, low: Any = None, high: Any = None) -> bool:
        if column not in stats:
            return False
        lo, hi = stats[column]
        return (low is None or lo >= low) and (high is None or hi <= high)

    checks = [
        not flt.project or within("project", flt.project, flt.project),
        (flt.min_tokens is None and flt.max_tokens is None) or within("caption_tokens", flt.min_tokens, flt.max_tokens),
        flt.trimmed is None or within("caption_trimmed", flt.trimmed, flt.trimmed),
        flt.revise_changed is None or within("revise_changed", flt.revise_changed, flt.revise_changed),
    ]
    return all(checks)


def _filter_columns(flt: PairFilter) -> list[str]:
    wanted = {
        "project": flt.project,
        "caption_tokens": flt.min_tokens is not None or flt.max_tokens is not None or None,
        "caption_trimmed": flt.trimmed,
        "revise_changed": flt.revise_changed,
        "patch_id": flt.review,
        "caption": flt.text,
    }
    return [name for name, value in wanted.items() if value not in (None, "")]


def row_mask(table: pa.Table, flt: PairFilter, verdicts: dict[str, str]) -> pa.Array:
    """Which rows of a table (holding ``_filter_columns``) match the filter."""
    mask = pa.array([True] * table.num_rows, pa.bool_())
    if flt.project:
        mask = pc.and_kleene(mask, pc.equal(table["project"], flt.project))
    if flt.min_tokens is not None:
        mask = pc.and_kleene(mask, pc.greater_equal(table["caption_tokens"], flt.min_tokens))
    if flt.max_tokens is not None:
        mask = pc.and_kleene(mask, pc.less_equal(table["caption_tokens"], flt.max_tokens))
    for column, wanted in (("caption_trimmed", flt.trimmed), ("revise_changed", flt.revise_changed)):
        if wanted is not None:
            mask = pc.and_kleene(mask, pc.equal(table[column], wanted))
    if flt.text:
        # A literal substring, case-insensitive: the text is never a pattern.
        mask = pc.and_kleene(mask, pc.match_substring(table["caption"], flt.text, ignore_case=True))
    if flt.review:
        states = [_review_state(verdicts.get(pid), flt.review) for pid in table["patch_id"].to_pylist()]
        mask = pc.and_kleene(mask, pa.array(states, pa.bool_()))
    return pc.fill_null(mask, False)


def _review_state(verdict: str | None, wanted: str) -> bool:
    if wanted == "unreviewed":
        return verdict is None
    if wanted == "reviewed":
        return verdict is not None
    return verdict == wanted


@dataclass
class _Scan:
    """One page's walk over the candidate row groups."""

    store: Store
    flt: PairFilter
    start: int  # matches to skip
    size: int
    rows_read: int = 0
    rows: list[dict[str, Any]] = field(default_factory=list)

    def read(self, shard: ShardFooter, group: int, columns: list[str]) -> pa.Table:
        with self.store.open(shard.key) as handle:
            parquet = pq.ParquetFile(handle, pre_buffer=False)
            present = [c for c in columns if c in parquet.schema_arrow.names]
            table = parquet.read_row_group(group, columns=present, use_threads=False)
        self.rows_read += table.num_rows
        return table


def _candidates(shards: list[ShardFooter], flt: PairFilter) -> list[ShardFooter]:
    return [
        s
        for s in shards
        if (not flt.agents_hash or s.agents_hash == flt.agents_hash)
        and (not flt.slide_id or s.slide_id == flt.slide_id)
    ]


def page_pairs(
    index: PairIndex,
    flt: PairFilter,
    page: int,
    page_size: int,
    verdicts: ReviewVerdicts,
    counts: MatchCounts | None = None,
    reviews_version: Callable[[str, str], Any] | None = None,
) -> PairPage:
    """Page ``page`` (1-based) of the pairs that match ``flt``, ``page_size`` to a page.

    ``verdicts(agents_hash, slide_id)`` gives a slide's review verdicts (read only when the filter is on review
    state); ``reviews_version(agents_hash, slide_id)`` changes when they do, so remembered match counts stay true.
    """
    if page < 1 or page_size < 1:
        raise ValueError(f"page {page} and page size {page_size} must be at least 1; pages are numbered from 1")
    shards = _candidates(index.shards(), flt)
    upper = sum(s.rows for s in shards)
    scan = _Scan(index.store, flt, (page - 1) * page_size, page_size)
    result = PairPage([], page, page_size, None, upper, False, 0)
    if scan.start >= upper:  # past the end (a huge page number): nothing to read
        result.total = upper if not flt.by_rows else None
        return result
    if flt.by_rows:
        total = _filtered(scan, shards, verdicts, counts or MatchCounts(), reviews_version or (lambda h, s: None))
    else:
        total = upper
        _unfiltered(scan, shards)
    result.rows, result.rows_read, result.total = scan.rows, scan.rows_read, total
    result.has_next = scan.start + page_size < (total if total is not None else upper) and len(scan.rows) == page_size
    return result


def _unfiltered(scan: _Scan, shards: list[ShardFooter]) -> None:
    """Row counts alone find the row groups holding rows [start, start + size)."""
    position, end = 0, scan.start + scan.size
    for shard in shards:
        if position + shard.rows <= scan.start:
            position += shard.rows
            continue
        for group, rows in enumerate(shard.row_groups):
            if position + rows > scan.start and rows:
                table = scan.read(shard, group, GRID_COLUMNS)
                first = max(0, scan.start - position)
                scan.rows.extend(_with_shard(table.slice(first, end - position - first).to_pylist(), shard))
            position += rows
            if position >= end:
                return


def _filtered(
    scan: _Scan,
    shards: list[ShardFooter],
    verdicts: ReviewVerdicts,
    counts: MatchCounts,
    reviews_version: Callable[[str, str], Any],
) -> int | None:
    """Skip row groups by statistics and by their remembered match counts; read the filter columns of the others
    and the grid columns only of those the page lies in. Returns the exact number of matches when every candidate
    row group was counted, else None (the page filled up first)."""
    matched = 0
    for shard in shards:
        if scan.flt.review in ("accept", "reject", "correct", "reviewed") and not verdicts(
            shard.agents_hash, shard.slide_id
        ):
            continue  # no review of this slide: none of its pairs is in a reviewed state
        cache_key = (scan.flt, shard.key, shard.version, reviews_version(shard.agents_hash, shard.slide_id))
        found = _shard_matches(scan, shard, counts.get(cache_key), matched, verdicts)
        if found is None:
            return None
        counts.put(cache_key, found)
        matched += sum(found)
    return matched


def _shard_matches(
    scan: _Scan, shard: ShardFooter, known: tuple[int, ...] | None, matched: int, verdicts: ReviewVerdicts
) -> tuple[int, ...] | None:
    """Matches per row group of one shard, taking the page's rows from it on the way; None when the page filled up
    before every row group was counted."""
    found: list[int] = []
    slide_verdicts = verdicts(shard.agents_hash, shard.slide_id) if scan.flt.review else {}
    for group, rows in enumerate(shard.row_groups):
        if not rows or not _may_match(shard.stats[group], scan.flt):
            found.append(0)
            continue
        every = _all_match(shard.stats[group], scan.flt)
        certain = known[group] if known is not None else (rows if every else None)
        page_full = len(scan.rows) >= scan.size
        if certain is not None and (page_full or matched + certain <= scan.start):
            hits = certain  # wholly before the page, or the page is full: no row read
        elif page_full:
            return None
        else:
            if every:
                mask = pa.array([True] * rows, pa.bool_())
            else:
                mask = row_mask(scan.read(shard, group, _filter_columns(scan.flt)), scan.flt, slide_verdicts)
            hits = int(pc.sum(mask).as_py() or 0)
            if matched + hits > scan.start:
                chosen = scan.read(shard, group, GRID_COLUMNS).filter(mask)
                first = max(0, scan.start - matched)
                scan.rows.extend(_with_shard(chosen.slice(first, scan.size - len(scan.rows)).to_pylist(), shard))
        found.append(hits)
        matched += hits
    return tuple(found)


def _with_shard(rows: list[dict[str, Any]], shard: ShardFooter) -> list[dict[str, Any]]:
    for row in rows:
        row.setdefault("agents_hash", shard.agents_hash)
        row["slide_id"] = row.get("slide_id") or shard.slide_id
        row["shard"] = posixpath.basename(shard.key)
    return rows
