"""Reviews of pairs: ``reviews/<agents_hash>/<slide_id>.parquet``, one row per review (patch_id, verdict, reason,
caption: the corrected caption, reviewer, time, review_id), every review kept; the latest review of a patch is the one
that counts.

Committing. A review rewrites its slide's file (read, append one row, write the whole file), and two reviewers of one
slide at once must lose nothing, so the read-modify-write is serialized per file:

- in one process, by a lock per file;
- on ``file://``, by ``flock`` on ``reviews/<agents_hash>/.<slide_id>.parquet.lock`` (released by the kernel when a
  process dies), and the file is written whole under a temporary name and renamed (``Store.write_bytes``);
- on ``s3://``, by a compare-and-swap: the new file is one PutObject with ``If-Match: <ETag read>`` (or
  ``If-None-Match: *`` for the first review), and a 412/409 answer (another reviewer committed first) reads again,
  appends again and retries. A PutObject is atomic (readers see the old or the whole new object). Conditional writes
  are documented by AWS (https://docs.aws.amazon.com/AmazonS3/latest/userguide/conditional-writes.html) and, on
  SeaweedFS, atomic under concurrent PUTs after 4.16 (the fix of seaweedfs/seaweedfs#8800, PR #8801; the dev extra
  installs 4.48). A server that ignores the headers is found by a probe (a second ``If-None-Match: *`` PUT of one hidden
  object must fail) the first time a process writes a review to it; there the write falls back to
  verify-after-write-and-retry, which catches a concurrent write committed before the read-back but not one committed
  after it: on such a server two reviews of one slide in the same instant can still lose one, and a warning says so.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import io
import json
import logging
import os
import posixpath
import random
import re
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tasks.slides.shard import shard_metadata
from tasks.slides.sources import slide_id_problem
from tasks.store.objects import Store, describe_endpoint, s3_endpoint

log = logging.getLogger("pathgen.reviews")

REVIEWS = "reviews"
REJECT_REASONS = ("wrong tissue", "hallucinated finding", "wrong stain/artefact", "not informative", "other")
OTHER = "other"  # the one listed reason that needs free text after it
REVIEW_MODES = ("apply", "ignore")
COUNTS = ("reviewed", "accepted", "rejected", "corrected")
_COUNT_OF = {"accept": "accepted", "reject": "rejected", "correct": "corrected"}
MAX_CAPTION_CHARS = 2000
MAX_REASON_CHARS = 1000
WRITE_ATTEMPTS = 40  # compare-and-swap rounds before a review is refused as conflicting (reviewers of one slide)
# The ids a review file may name (fullmatch); the review browser checks request ids against the same patterns.
AGENTS_HASH = re.compile(r"[A-Za-z0-9_-]{1,64}")
PATCH_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}")
_LOST_RACE = ("PreconditionFailed", "ConditionalRequestConflict", "412", "409")

REVIEW_SCHEMA = pa.schema(
    [
        pa.field("patch_id", pa.string(), nullable=False),
        pa.field("verdict", pa.string(), nullable=False),
        pa.field("reason", pa.string()),
        pa.field("caption", pa.string()),  # the corrected caption of a "correct" verdict, else null
        pa.field("reviewer", pa.string(), nullable=False),
        pa.field("time", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("review_id", pa.string(), nullable=False),  # tells one review from another in the history
    ]
)


class ReviewConflictError(RuntimeError):
    """A review could not be committed: other reviewers kept committing to the same slide's file first."""


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Review(BaseModel):
    """One reviewer's verdict on one pair. ``reason`` of a reject: a listed reason (``REJECT_REASONS``), optionally
    followed by ``": <free text>"``; ``other`` needs the free text. ``caption``: the corrected caption, only with
    ``correct``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    patch_id: str = Field(min_length=1, max_length=200, description="the reviewed pair's patch_id")
    verdict: Literal["accept", "reject", "correct"]
    reason: str | None = Field(None, max_length=MAX_REASON_CHARS)
    caption: str | None = Field(None, max_length=MAX_CAPTION_CHARS)
    reviewer: str = Field(min_length=1, max_length=200)
    time: dt.datetime = Field(default_factory=_now, description="when, UTC")
    review_id: str = Field(default_factory=lambda: uuid.uuid4().hex, min_length=1, max_length=64)

    @field_validator("patch_id")
    @classmethod
    def _plain_patch_id(cls, value: str) -> str:
        if not PATCH_ID.fullmatch(value):
            raise ValueError(f"patch_id {value[:80]!r} is not a patch id (letters, digits, '.', '_', '-')")
        return value

    @field_validator("reviewer", "reason", "caption")
    @classmethod
    def _stripped(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.strip()
        if any(ord(ch) < 32 and ch not in "\n\t" for ch in value):
            raise ValueError("control characters are not allowed")
        return value or None

    @field_validator("reviewer")
    @classmethod
    def _named(cls, value: str | None) -> str:
        if not value:
            raise ValueError("reviewer is empty: name who reviewed (the proxy's user header or --reviewer)")
        return value

    @field_validator("time")
    @classmethod
    def _utc(cls, value: dt.datetime) -> dt.datetime:
        if value.tzinfo is None:
            raise ValueError("time must carry a timezone (UTC), e.g. 2026-01-31T12:00:00Z")
        return value.astimezone(dt.UTC)

    @model_validator(mode="after")
    def _verdict_fits(self) -> Review:
        if self.verdict == "correct" and not self.caption:
            raise ValueError("a 'correct' review needs the corrected caption in 'caption'")
        if self.verdict != "correct" and self.caption is not None:
            raise ValueError(f"only a 'correct' review carries a caption, not {self.verdict!r}")
        if self.verdict == "reject":
            reject_reason(self.reason)  # raises with the list of reasons
        return self


def reject_reason(reason: str | None) -> str:
    """The listed reason a reject's ``reason`` starts with; a ValueError naming the list when there is none."""
    code, _, text = (reason or "").partition(":")
    code = code.strip().lower()
    if code not in REJECT_REASONS:
        raise ValueError(
            f"a 'reject' review needs a reason, one of {', '.join(REJECT_REASONS)} (optionally followed by "
            f"': <free text>'), not {(reason or '')[:80]!r}"
        )
    if code == OTHER and not text.strip():
        raise ValueError("reason 'other' needs free text: 'other: <what is wrong>'")
    return code


# -- keys ----------------------------------------------------------------------------------------------------------


def reviews_prefix(agents_hash: str) -> str:
    if not isinstance(agents_hash, str) or not AGENTS_HASH.fullmatch(agents_hash):
        raise ValueError(f"agents_hash {str(agents_hash)[:80]!r} is not one (letters, digits, '_', '-'; at most 64)")
    return f"{REVIEWS}/{agents_hash}"


def review_key(agents_hash: str, slide_id: str) -> str:
    """``reviews/<agents_hash>/<slide_id>.parquet``; a ValueError for ids that could name another path."""
    problem = slide_id_problem(slide_id)
    if problem or slide_id in (".", ".."):
        raise ValueError(f"slide id {str(slide_id)[:80]!r} cannot name a review file: {problem or 'it is a dot'}")
    return f"{reviews_prefix(agents_hash)}/{slide_id}.parquet"


# -- encoding ------------------------------------------------------------------------------------------------------


def _table(reviews: Iterable[Review]) -> pa.Table:
    return pa.Table.from_pylist([r.model_dump() for r in reviews], schema=REVIEW_SCHEMA)


def _encode(table: pa.Table, agents_hash: str, slide_id: str) -> bytes:
    meta = shard_metadata(REVIEWS, {"pathgen.agents_hash": agents_hash, "pathgen.slide_id": slide_id})
    sink = io.BytesIO()
    pq.write_table(table.replace_schema_metadata(meta), sink, compression="zstd")
    return sink.getvalue()


def _decode(data: bytes, key: str) -> pa.Table:
    try:
        table = pq.ParquetFile(pa.BufferReader(data), pre_buffer=False).read(use_threads=False)
    except (pa.ArrowException, OSError) as exc:
        raise ValueError(f"{key} is not a Parquet review file ({exc}); move it aside to review that slide") from None
    missing = [name for name in REVIEW_SCHEMA.names if name not in table.column_names]
    if missing:
        raise ValueError(f"{key} lacks the review column(s) {', '.join(missing)}; move it aside to review that slide")
    return table.select(REVIEW_SCHEMA.names).cast(REVIEW_SCHEMA)


def _rows(table: pa.Table, key: str, problems: list[str] | None) -> Iterator[Review]:
    for number, row in enumerate(table.to_pylist()):
        try:
            yield Review.model_validate(row)
        except ValueError as exc:
            if problems is not None:
                problems.append(f"{key} row {number}: {' '.join(str(exc).split())[:300]}")


# -- reading -------------------------------------------------------------------------------------------------------


def _read(store: Store, key: str) -> pa.Table | None:
    try:
        return _decode(store.read_bytes(key), key)
    except FileNotFoundError:
        return None


def review_history(store: Store, agents_hash: str, slide_id: str, problems: list[str] | None = None) -> list[Review]:
    """Every review of a slide's pairs, oldest first as committed (none: an empty list)."""
    key = review_key(agents_hash, slide_id)
    table = _read(store, key)
    return [] if table is None else list(_rows(table, key, problems))


def latest(reviews: Iterable[Review]) -> dict[str, Review]:
    """patch_id -> its latest review (by time; of two at one time, the one committed later)."""
    found: dict[str, Review] = {}
    for review in reviews:
        before = found.get(review.patch_id)
        if before is None or review.time >= before.time:
            found[review.patch_id] = review
    return found


def load_slide_reviews(
    store: Store, agents_hash: str, slide_id: str, problems: list[str] | None = None
) -> dict[str, Review]:
    """patch_id -> latest review, for one slide's pairs."""
    return latest(review_history(store, agents_hash, slide_id, problems))


def reviewed_slides(store: Store, agents_hash: str) -> list[str]:
    """The slides of an agents_hash that have a review file."""
    prefix = reviews_prefix(agents_hash)
    return [key[len(prefix) + 1 : -len(".parquet")] for key in store.list(prefix, ".parquet")]


def load_reviews(store: Store, agents_hash: str, problems: list[str] | None = None) -> dict[str, Review]:
    """patch_id -> latest review, over every slide of an agents_hash. A file that cannot be read is left out and
    named in ``problems`` (when given), never sinking the others."""
    found: dict[str, Review] = {}
    for slide_id in reviewed_slides(store, agents_hash):
        try:
            found.update(load_slide_reviews(store, agents_hash, slide_id, problems))
        except ValueError as exc:
            if problems is None:
                raise
            problems.append(str(exc))
    return found


def reviews_digest(reviews: Mapping[str, Review]) -> str:
    """A digest of the reviews that change an export (verdict and corrected caption per patch): an export reused
    only while this is unchanged."""
    blob = json.dumps(sorted((p, r.verdict, r.caption) for p, r in reviews.items()))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# -- applying ------------------------------------------------------------------------------------------------------


def apply_reviews(
    pairs: Iterable[dict[str, Any]], reviews: Mapping[str, Review], mode: Literal["apply", "ignore"]
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """(pairs kept, counts). ``apply``: rejected pairs left out, corrected captions swapped in (``caption_tokens``
    then unknown: None; ``review`` says the verdict); ``ignore``: every pair as it is. Counts (of the pairs given,
    in both modes): reviewed, accepted, rejected, corrected."""
    if mode not in REVIEW_MODES:
        raise ValueError(f"export.reviews must be one of {', '.join(REVIEW_MODES)}, not {mode!r}")
    counts = dict.fromkeys(COUNTS, 0)
    kept = []
    for pair in pairs:
        review = reviews.get(pair.get("patch_id"))  # a pair without an id (an older shard) cannot be reviewed
        if review is None:
            kept.append(pair)
            continue
        counts["reviewed"] += 1
        counts[_COUNT_OF[review.verdict]] += 1
        if mode == "ignore":
            kept.append(pair)
        elif review.verdict == "correct":
            kept.append({**pair, "caption": review.caption, "caption_tokens": None, "review": review.verdict})
        elif review.verdict == "accept":
            kept.append({**pair, "review": review.verdict})
    return kept, counts


def add_counts(total: dict[str, int], counts: Mapping[str, int]) -> dict[str, int]:
    for name in COUNTS:
        total[name] = total.get(name, 0) + int(counts.get(name, 0))
    return total


@dataclass
class ExportReviews:
    """The reviews an export of one agents_hash applies, slide by slide, and the counts its provenance records."""

    store: Store
    agents_hash: str
    mode: Literal["apply", "ignore"]
    slides: set[str] = field(default_factory=set)  # slides with a review file
    pairs: int = 0  # pairs read, before the reviews
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTS, 0))
    problems: list[str] = field(default_factory=list)
    _read: dict[str, dict[str, Review]] = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, store: Store, agents_hash: str, mode: Literal["apply", "ignore"]) -> ExportReviews:
        if mode not in REVIEW_MODES:
            raise ValueError(f"export.reviews must be one of {', '.join(REVIEW_MODES)}, not {mode!r}")
        return cls(store, agents_hash, mode, set(reviewed_slides(store, agents_hash)))

    def for_slide(self, slide_id: str) -> dict[str, Review]:
        """The slide's latest reviews. A review file that cannot be read fails an applying export (rejected pairs
        must not slip into training) and is named in ``problems`` of an ignoring one."""
        if slide_id not in self.slides:
            return {}
        if slide_id in self._read:
            return self._read[slide_id]
        problems: list[str] = []
        try:
            found = load_slide_reviews(self.store, self.agents_hash, slide_id, problems)
        except ValueError as exc:
            found, problems = {}, [str(exc)]
        if problems and self.mode == "apply":
            raise ValueError(f"{problems[0]}; or export the pairs as generated with --set export.reviews=ignore")
        self.problems += problems
        self._read[slide_id] = found
        return found

    def digest(self, slide_ids: Iterable[str]) -> str:
        """What the reviews of these slides do to an export, as a digest (with the mode): a reused export must match."""
        reviewed = sorted(set(slide_ids) & self.slides)
        parts = [self.mode, *(f"{s}:{reviews_digest(self.for_slide(s))}" for s in reviewed)]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]

    def rejected(self, slide_id: str) -> set[str]:
        """The slide's patch ids whose pairs an applying export leaves out (none when reviews are ignored)."""
        if self.mode != "apply":
            return set()
        return {patch_id for patch_id, r in self.for_slide(slide_id).items() if r.verdict == "reject"}

    def apply(self, slide_id: str, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The slide's rows as exported; the counts add up."""
        kept, counts = apply_reviews(rows, self.for_slide(slide_id), self.mode)
        self.pairs += len(rows)
        add_counts(self.counts, counts)
        return kept

    def provenance(self) -> dict[str, Any]:
        """What an export's provenance says of the reviews."""
        return review_provenance(self.mode, self.pairs, self.counts, self.problems)


def review_provenance(
    mode: Literal["apply", "ignore"], pairs_read: int, counts: Mapping[str, int], problems: list[str]
) -> dict[str, Any]:
    """The reviews block of every export's provenance (PathGen JSON, WebDataset manifest, LLaVA): the mode, the pairs
    read, the counts, and what applying them did (pairs left out, captions corrected; none when ignored)."""
    applied = mode == "apply"
    found = {"mode": mode, "pairs_read": pairs_read, **{name: int(counts.get(name, 0)) for name in COUNTS}}
    found["left_out"] = found["rejected"] if applied else 0
    found["captions_corrected"] = found["corrected"] if applied else 0
    return found | ({"problems": list(problems)} if problems else {})


# -- writing -------------------------------------------------------------------------------------------------------

_FILE_LOCKS: dict[str, threading.Lock] = {}
_FILE_LOCKS_GUARD = threading.Lock()
_CONDITIONAL: dict[str, bool] = {}  # endpoint + bucket -> whether the server enforces conditional PUTs


def _file_lock(store: Store, key: str) -> threading.Lock:
    with _FILE_LOCKS_GUARD:
        return _FILE_LOCKS.setdefault(store.uri(key), threading.Lock())


def save_review(store: Store, agents_hash: str, slide_id: str, review: Review) -> None:
    """Append a review to ``reviews/<agents_hash>/<slide_id>.parquet`` and commit the file whole; concurrent
    reviewers of one slide lose nothing (see the module's docstring for the guarantee on each store)."""
    key = review_key(agents_hash, slide_id)
    row = _table([review])
    with _file_lock(store, key):
        if store.remote:
            _save_remote(store, key, row, agents_hash, slide_id)
        else:
            _save_local(store, key, row, agents_hash, slide_id)


def _appended(existing: pa.Table | None, row: pa.Table) -> pa.Table:
    return row if existing is None else pa.concat_tables([existing.replace_schema_metadata(None), row])


def _save_local(store: Store, key: str, row: pa.Table, agents_hash: str, slide_id: str) -> None:
    path = store.path(key)
    folder, name = posixpath.split(path)
    os.makedirs(folder, exist_ok=True)
    with open(posixpath.join(folder, f".{name}.lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # closing the file releases it
        store.write_bytes(key, _encode(_appended(_read(store, key), row), agents_hash, slide_id))


def _lost_race(exc: BaseException) -> bool:
    """Whether an S3 error is the answer to a failed precondition (another writer committed first)."""
    seen: BaseException | None = exc
    while seen is not None:
        response = getattr(seen, "response", None)
        code = str(response.get("Error", {}).get("Code", "")) if isinstance(response, dict) else ""
        if code in _LOST_RACE or any(mark in str(seen) for mark in _LOST_RACE[:2]):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _read_remote(store: Store, key: str) -> tuple[str | None, pa.Table | None]:
    """(ETag, table) of the file now, None for both when there is none; the ETag is read first, so the bytes are
    never older than it (a newer version fails the If-Match and is read again)."""
    path = store.path(key)
    store.fs.invalidate_cache(path)
    try:
        etag = store.fs.info(path).get("ETag")
        return etag, _decode(store.fs.cat_file(path), key)
    except FileNotFoundError:
        return None, None


def _save_remote(store: Store, key: str, row: pa.Table, agents_hash: str, slide_id: str) -> None:
    conditional = _conditional_writes(store)
    for attempt in range(WRITE_ATTEMPTS):
        etag, existing = _read_remote(store, key)
        data = _encode(_appended(existing, row), agents_hash, slide_id)
        if not conditional:
            store.fs.pipe_file(store.path(key), data)
            if _holds_all(store, key, existing, row):
                return
        else:
            try:
                store.fs.pipe_file(store.path(key), data, **({"IfMatch": etag} if etag else {"IfNoneMatch": "*"}))
                return
            except Exception as exc:
                if not _lost_race(exc):
                    raise
        time.sleep(random.uniform(0.0, 0.02 * 2 ** min(attempt, 5)))  # reviewers of one slide step apart
    raise ReviewConflictError(
        f"{store.uri(key)}: other reviewers committed first {WRITE_ATTEMPTS} times in a row; submit the review again"
    )


def _holds_all(store: Store, key: str, existing: pa.Table | None, row: pa.Table) -> bool:
    """Verify-after-write (servers without conditional PUTs): the file now holds every review read and the new one."""
    _, now = _read_remote(store, key)
    wanted = set(row.column("review_id").to_pylist())
    if existing is not None:
        wanted |= set(existing.column("review_id").to_pylist())
    return now is not None and wanted <= set(now.column("review_id").to_pylist())


def _conditional_writes(store: Store) -> bool:
    """Whether the S3 server enforces ``If-None-Match: *`` on PutObject, probed once per endpoint and bucket with a
    hidden object under reviews/ (removed after)."""
    bucket = store.root.split("/", 1)[0]
    where = f"{s3_endpoint() or 'aws'}|{bucket}"
    if where not in _CONDITIONAL:
        probe = store.path(f"{REVIEWS}/.conditional-write-probe-{uuid.uuid4().hex[:12]}")
        store.fs.pipe_file(probe, b"first")
        try:
            store.fs.pipe_file(probe, b"second", IfNoneMatch="*")
            enforced = False
        except Exception as exc:  # noqa: BLE001 - any refusal but a failed precondition: not supported either
            enforced = _lost_race(exc)
        finally:
            store.fs.rm_file(probe)
        if not enforced:
            log.warning(
                "the S3 server at %s ignores conditional writes (If-None-Match): reviews of one slide committed in "
                "the same instant by two processes may lose one; use a server that enforces them (AWS S3, SeaweedFS "
                "newer than 4.16)",
                describe_endpoint(),  # never the credentials an endpoint URL may carry
            )
        _CONDITIONAL[where] = enforced
    return _CONDITIONAL[where]
