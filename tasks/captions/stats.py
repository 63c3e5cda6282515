"""Caption statistics of one agents_hash, for ``pathgen status`` and the factory report.

Read from the pair shards (``pairs/<agents_hash>/<slide_id>.parquet``), only the columns needed (Parquet column
projection: the images are never read; an older shard that lacks a column is counted without it), each shard once:
the same read gives the report its row count and random_weights flag (:func:`read_pairs`). Failed items come as
row counts per failed table (the slide is in the key), which the report counts while it reads their reasons. A
bounded chunk of shards at a time goes into running counts, so the figures scale to the full 1.6M pairs in bounded
memory:

- CLIP-token length of the captions: ``caption_tokens``, the pipeline's own count (open_clip's BPE tokenizer, start
  and end tokens included, ``agents.clip_tokens``): min, p50, p90 and max (nearest rank: the smallest length that
  at least that share of captions do not exceed), and a histogram in buckets of 16 tokens up to CLIP's 77-token
  context (``>77`` would be a caption that does not fit; the pipeline never writes one).
- trimmed: the share of captions still over ``agents.max_caption_tokens`` after the summarizer was re-asked, cut at
  a sentence boundary (``caption_trimmed``).
- revise: the share of descriptions the revise agent changed (``revise_changed``: the revised text differs from
  the description once surrounding white space is stripped; an "unchanged" reply keeps the description), and the
  mean change ``revise_change``, a word-level edit ratio: 1 - difflib.SequenceMatcher ratio between the two texts'
  word sequences (``agents.pipeline._word_change``; 0 = identical, 1 = no word in common), over the changed
  descriptions and over all.
- per TCGA project: pairs by the patch records' ``project`` column, and failed items by their slide's project (the
  project its pairs carry, else the one its slide record names, else its barcode's, else ``unknown``).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pyarrow.parquet as pq

from tasks.slides.projects import barcode_project
from tasks.store.objects import Store
from tasks.work.shards import slide_of

PAIR_COLUMNS = ["project", "caption_tokens", "caption_trimmed", "revise_changed", "revise_change"]
BUCKET_TOKENS = 16
CLIP_CONTEXT = 77
UNKNOWN = "unknown"
READ_THREADS = 16
READ_CHUNK = 256  # shards whose columns are held at once
T = TypeVar("T")


@dataclass
class CaptionTally:
    """Running counts over the pairs of one agents_hash (no list of captions is kept)."""

    pairs: int = 0
    tokens: Counter[int] = field(default_factory=Counter)
    trimmed: int = 0
    trimmed_known: int = 0  # pairs whose shard records caption_trimmed
    changed: int = 0
    revise_known: int = 0
    change_sum_changed: float = 0.0
    change_sum_all: float = 0.0
    project_pairs: Counter[str] = field(default_factory=Counter)
    project_failed: Counter[str] = field(default_factory=Counter)

    def add(self, columns: dict[str, list[Any]], rows: int, default_project: str) -> None:
        """One shard's rows; ``columns`` holds those of PAIR_COLUMNS the shard has."""
        self.pairs += rows
        self.tokens.update(int(t) for t in columns.get("caption_tokens", []) if t is not None)
        if "caption_trimmed" in columns:
            self.trimmed_known += rows
            self.trimmed += sum(bool(t) for t in columns["caption_trimmed"])
        if "revise_changed" in columns and "revise_change" in columns:
            self.revise_known += rows
            for changed, change in zip(columns["revise_changed"], columns["revise_change"], strict=True):
                self.change_sum_all += float(change or 0.0)
                if changed:
                    self.changed += 1
                    self.change_sum_changed += float(change or 0.0)
        projects = columns.get("project") or [None] * rows
        self.project_pairs.update(p or default_project for p in projects)


def token_summary(tokens: Counter[int]) -> dict[str, Any] | None:
    """min / p50 / p90 / max (nearest rank) and the histogram of a length -> count tally; None when empty."""
    total = sum(tokens.values())
    if not total:
        return None
    ordered = sorted(tokens.items())

    def rank(share: float) -> int:
        needed, seen = math.ceil(share * total), 0
        for length, count in ordered:
            seen += count
            if seen >= needed:
                return length
        return ordered[-1][0]

    return {
        "min": ordered[0][0],
        "p50": rank(0.5),
        "p90": rank(0.9),
        "max": ordered[-1][0],
        "histogram": histogram(tokens),
    }


def histogram(tokens: Counter[int]) -> list[dict[str, Any]]:
    """Counts per bucket of BUCKET_TOKENS tokens, the last one ending at CLIP_CONTEXT, then ``>77`` if any."""
    edges = list(range(BUCKET_TOKENS, CLIP_CONTEXT, BUCKET_TOKENS)) + [CLIP_CONTEXT]
    buckets, low = [], 1
    for high in edges:
        buckets.append({"tokens": f"{low}-{high}", "count": sum(c for t, c in tokens.items() if low <= t <= high)})
        low = high + 1
    over = sum(c for t, c in tokens.items() if t > CLIP_CONTEXT)
    if over:
        buckets.append({"tokens": f">{CLIP_CONTEXT}", "count": over})
    return buckets


def _share(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


def summarize(tally: CaptionTally) -> dict[str, Any]:
    projects = sorted(set(tally.project_pairs) | set(tally.project_failed))
    rows = [{"project": p, "pairs": tally.project_pairs[p], "failed": tally.project_failed[p]} for p in projects]
    revise = None
    if tally.revise_known:
        revise = {
            "changed": _share(tally.changed, tally.revise_known),
            "mean_change_of_changed": round(tally.change_sum_changed / tally.changed, 4) if tally.changed else None,
            "mean_change_of_all": round(tally.change_sum_all / tally.revise_known, 4),
        }
    return {
        "pairs": tally.pairs,
        "tokens": token_summary(tally.tokens),
        "trimmed": _share(tally.trimmed, tally.trimmed_known),
        "revise": revise,
        "projects": sorted(rows, key=lambda r: (-r["pairs"], -r["failed"], r["project"])),
    }


@dataclass(frozen=True)
class PairShard:
    """What one read of a pair shard gives: its row count, whether any row has random_weights, and those of
    PAIR_COLUMNS it has, as lists."""

    rows: int
    random_weights: bool
    columns: dict[str, list[Any]]


def read_pair_shard(store: Store, key: str) -> PairShard:
    """One shard, read once: the footer (row count; random_weights from its column statistics) and the statistics'
    columns; the random_weights column itself only where a row group has no statistics for it."""
    with store.open(key) as handle:
        parquet = pq.ParquetFile(handle, pre_buffer=False)
        footer = parquet.metadata
        present = [c for c in PAIR_COLUMNS if c in parquet.schema_arrow.names]
        random = _any_true_in_footer(footer, "random_weights")
        if random is None:
            present.append("random_weights")
        # not read_table: see tasks.slides.shard.read_shard (no threads, no pre-buffering over a Python file)
        table = parquet.read(columns=present, use_threads=False) if present else None
    columns = {name: table.column(name).to_pylist() for name in table.column_names} if table is not None else {}
    if random is None:
        random = any(columns.pop("random_weights"))
    return PairShard(footer.num_rows, random, columns)


def _any_true_in_footer(footer: pq.FileMetaData, column: str) -> bool | None:
    """Whether a boolean column holds a true value, from the footer's statistics: False where the shard lacks the
    column, None where a row group has no statistics for it (then only the column itself tells)."""
    names = [footer.schema.column(i).name for i in range(footer.num_columns)]
    if column not in names:
        return False
    index = names.index(column)
    for group in range(footer.num_row_groups):
        stats = footer.row_group(group).column(index).statistics
        if stats is None or not stats.has_min_max:
            return None
        if stats.max:
            return True
    return False


def slide_project_fallback(slide_id: str, known: dict[str, str | None]) -> str:
    """A slide's project where its pairs name none: its slide record's, else its barcode's, else unknown."""
    return known.get(slide_id) or barcode_project([slide_id]).project or UNKNOWN


@dataclass(frozen=True)
class PairsRead:
    """One agents_hash's pair shards: their rows, whether any was made with random weights, and the statistics."""

    pairs: int
    random_weights: bool
    captions: dict[str, Any]


def read_pairs(
    store: Store,
    pair_keys: Iterable[str],
    failed_rows: Mapping[str, int],
    known: dict[str, str | None] | None = None,
) -> PairsRead:
    """The statistics of the module docstring over these pair shards (one agents_hash's), each read once;
    ``failed_rows``: failed table key -> its row count; ``known``: slide id -> project from the slide records, for
    slides whose pairs carry none."""
    known = known or {}
    tally = CaptionTally()
    random = False
    slide_projects: dict[str, str] = {}
    for key, shard in _each(pair_keys, lambda key: read_pair_shard(store, key)):
        slide_id = slide_of(key)
        fallback = slide_project_fallback(slide_id, known)
        tally.add(shard.columns, shard.rows, fallback)
        random = random or shard.random_weights
        named = [p for p in shard.columns.get("project", []) if p]
        slide_projects[slide_id] = Counter(named).most_common(1)[0][0] if named else fallback
    for key, rows in failed_rows.items():
        slide_id = slide_of(key)
        project = slide_projects.get(slide_id) or slide_project_fallback(slide_id, known)
        tally.project_failed[project] += rows
    return PairsRead(tally.pairs, random, summarize(tally))


def _each(keys: Iterable[str], read: Callable[[str], T]) -> Iterator[tuple[str, T]]:
    """``(key, read(key))`` in order, READ_THREADS reads in flight (on S3 each shard's latency, not its bytes,
    bounds the read), at most READ_CHUNK results held at once."""
    keys = list(keys)
    with ThreadPoolExecutor(READ_THREADS) as pool:
        for start in range(0, len(keys), READ_CHUNK):
            chunk = keys[start : start + READ_CHUNK]
            yield from zip(chunk, pool.map(read, chunk), strict=True)


def stats_lines(stats: dict[str, Any]) -> list[str]:
    """The statistics as indented report lines (the report's list items in markdown)."""
    lines = []
    tokens = stats.get("tokens")
    if tokens:
        lines.append(
            f"  caption CLIP tokens: min {tokens['min']}, p50 {tokens['p50']}, p90 {tokens['p90']}, "
            f"max {tokens['max']}; histogram " + ", ".join(f"{b['tokens']}: {b['count']}" for b in tokens["histogram"])
        )
    parts = []
    if stats.get("trimmed") is not None:
        parts.append(f"trimmed to fit {_percent(stats['trimmed'])}")
    revise = stats.get("revise")
    if revise:
        of_changed = revise["mean_change_of_changed"]
        parts.append(
            f"changed by revise {_percent(revise['changed'])} (mean word-level change "
            f"{'n/a' if of_changed is None else f'{of_changed:.3f}'} of those changed, "
            f"{revise['mean_change_of_all']:.3f} over all)"
        )
    if parts:
        lines.append("  captions " + "; ".join(parts))
    if stats.get("projects"):
        per = ", ".join(f"{r['project']} {r['pairs']} pairs / {r['failed']} failed" for r in stats["projects"])
        lines.append(f"  per project: {per}")
    return lines


def _percent(share: float | None) -> str:
    return "n/a" if share is None else f"{100 * share:.1f}%"
