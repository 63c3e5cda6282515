"""Extraction of one slide: open, MPP, tissue mask, grid, read, quality filters, select, write.

``extract_slide`` never raises for a bad slide: it records ``slide.json`` with ``status: failed`` and a one-sentence
reason, and returns. Infrastructure (a storage failure that outlasts its retries, a full disk, a model whose weights
cannot be fetched, a CUDA fault or out-of-memory) leaves the slide pending. Pictures are encoded before the shard
is committed; commit order is shard, pictures, then ``slide.json``. A ``slide.json`` with ``status: ok`` counts
only while the shard's footer holds its extraction hash (a run stopped after its shard leaves a record of other
patches, and the slide is redone), and a re-run that fails never removes such a committed extraction.

The slide's source identity (:func:`source_identity`) is part of its extraction hash, so a slide whose file changed
at the same path is extracted again (and its pairs become pending), while an unchanged one is skipped.

Extraction follows the slide stages' one commit protocol (tasks/work/commit.py): the flow plans from these records
(:func:`plan_extraction`), so a slide whose current extraction is committed never reaches a task; a task reads the
record again before its work (another run may have committed the slide since), and ``slide.json`` is its marker.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import math
import os
import posixpath
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import cv2
from prefect import get_run_logger, task

from pathgen import __version__
from pathgen.errors import (
    InfrastructureError,
    SlideError,
    StorageError,
    TransientIOError,
    is_infrastructure,
    is_transient,
    redact_urls,
    retry_infrastructure,
    retry_io,
    short_error,
)
from pathgen.processes import worker_process_setup
from pathgen.settings import Settings
from tasks.selection.plan import ReadBatch, SelectionPlan, plan_selection
from tasks.slides.hashing import (
    legacy_extraction_hash,
    mpp_override,
    non_square_pixels,
    slide_extraction_hash,
    slide_project,
)
from tasks.slides.passes import (
    PassResult,
    SlidePass,
    patch_scale,
    read_resolution,
    write_planned,
    write_representative,
)
from tasks.slides.pictures import draw_selection, draw_thumbnail
from tasks.slides.readers import SlideReader, missing_mpp_message, open_slide
from tasks.slides.record import LevelInfo, PositionProblem, SlideRecord, SourceIdentity
from tasks.slides.shard import SCHEMA_VERSION, PatchShardWriter
from tasks.slides.sources import SlideRef, resolve_sources, slide_id_problem, source_identity
from tasks.slides.tissue import GridCell, grid_cells, grid_shape, mask_fraction, tissue_mask
from tasks.store.objects import Store, is_remote, storage_options, url_to_fs
from tasks.work.commit import metadata as parquet_metadata
from tasks.work.commit import pending_raises
from tasks.work.planning import read_committed
from tasks.work.units import NoUnitSucceeded, UnitOutcome, UnitPlan, in_part

log = logging.getLogger("pathgen.extract")
MD5_CHUNK = 8 * 2**20


@dataclass
class SlideOutcome:
    slide_id: str
    status: str  # ok | failed | skipped (already committed with the same extraction hash) | pending
    patches: int
    seconds: float
    error: str | None = None
    record: SlideRecord | None = None

    def unit(self) -> UnitOutcome:
        record = self.record
        columns = {"project": record.project if record else None}
        random_weights = bool(record and record.random_weights)
        return UnitOutcome(self.slide_id, self.status, self.patches, self.seconds, self.error, random_weights, columns)


def _key_id(slide_id: str) -> str:
    """``slide_id`` when it is safe inside a store key; a ValueError otherwise, so that no key built from a slide id
    ever points outside its folder (ids from ``resolve_sources`` are always safe)."""
    problem = slide_id_problem(slide_id)
    if problem:
        raise ValueError(f"slide id {slide_id!r} cannot name a store key: {problem}")
    return slide_id


def slide_json_key(slide_id: str) -> str:
    return f"slides/{_key_id(slide_id)}/slide.json"


def thumbnail_key(slide_id: str) -> str:
    return f"slides/{_key_id(slide_id)}/thumbnail.png"


def selection_key(slide_id: str) -> str:
    return f"slides/{_key_id(slide_id)}/selection.png"


def shard_key(slide_id: str) -> str:
    return f"patches/{_key_id(slide_id)}.parquet"


def _good_record(store: Store, slide_id: str) -> SlideRecord | None:
    """The slide's committed ``ok`` record, whatever its extraction hash, when its shard is there and is the one it
    describes (the shard's footer holds the record's extraction hash); None otherwise. A run stopped between a new
    shard and its record (a storage error, a kill) leaves an ``ok`` record of other patches: the slide is redone."""
    key = slide_json_key(slide_id)
    if not store.exists(key):
        return None
    try:
        found = store.read_json(key)
        if not isinstance(found, dict) or found.get("status") != "ok" or not store.exists(shard_key(slide_id)):
            return None
        record = SlideRecord.model_validate(found)
        in_shard = parquet_metadata(store, shard_key(slide_id)).get("pathgen.extraction_hash")
    except ValueError as exc:  # corrupt JSON, record or shard: the slide is redone, never a reason to stop the batch
        log.warning(
            "%s: its slide.json or shard cannot be read (%s); the slide is extracted again", slide_id, short_error(exc)
        )
        return None
    if in_shard != record.extraction_hash:
        log.warning(
            "%s: its patch shard holds extraction %s, not the %s its slide.json describes (a run stopped between "
            "them); the slide is extracted again",
            slide_id,
            in_shard,
            record.extraction_hash,
        )
        return None
    return record


def _committed(
    store: Store, ref: SlideRef, settings: Settings, source: SourceIdentity | None, extraction_hash: str
) -> SlideRecord | None:
    """The slide's committed record when it holds this extraction: the same hash, or a record from before source
    identities were kept whose settings match and whose source is provably unchanged since it was written."""
    found = _good_record(store, ref.slide_id)
    if found is None:
        return None
    if non_square_pixels(found.mpp_x, found.mpp_y):  # its pixels' shape is part of its hash
        return found if found.extraction_hash == slide_extraction_hash(ref, settings, source, _axes(found)) else None
    plain = found.extraction_hash == extraction_hash
    if not plain and not (found.source is None and found.extraction_hash == legacy_extraction_hash(ref, settings)):
        return None
    if not (plain or _unchanged_since(found, source)):
        return None
    if found.mpp_x is None:  # written before the MPP was kept per axis
        axes = _square_axes(ref, settings, found)
        if axes is None:
            return None  # read at its mean MPP: now each axis is read at its own, so the slide is extracted again
        # recorded once, so that later plans need not open the slide's header again
        found = found.model_copy(update={"mpp_x": axes[0], "mpp_y": axes[1]})
        store.write_json(slide_json_key(ref.slide_id), found.model_dump(mode="json"))
    return found


def _axes(record: SlideRecord) -> tuple[float, float]:
    assert record.mpp_x is not None and record.mpp_y is not None
    return record.mpp_x, record.mpp_y


def _square_axes(ref: SlideRef, settings: Settings, record: SlideRecord) -> tuple[float, float] | None:
    """The (x, y) MPP of the slide of a record written before the MPP was kept per axis, when its pixels are square;
    None when they are not (or its header cannot be read: its extraction meets that and reports it). An override or
    the default MPP is one figure."""
    if record.mpp_source in ("mpp_overrides", "default_mpp"):
        return record.mpp, record.mpp
    try:
        with open_slide(ref.uri, storage_opts=storage_options(ref.uri, settings.s3)) as reader:
            resolve_mpp(ref, reader, settings)
            axes = (reader.info.mpp_x, reader.info.mpp_y)
    except Exception as exc:  # noqa: BLE001 - the slide's own trouble its extraction meets and reports
        if is_infrastructure(exc):
            raise  # the source cannot be read now: the slide stays pending, not extracted again for nothing
        return None
    return None if non_square_pixels(*axes) else axes


def _unchanged_since(record: SlideRecord, source: SourceIdentity | None) -> bool:
    """Whether a record without a source identity still describes ``source``: the manifest's md5 it was checked
    against, or bytes last written before the record was (a folder slide cannot tell, so it is redone)."""
    if source is None or not record.created_at:
        return False
    if source.kind == "md5":
        return (record.md5 or "").strip().lower() == source.md5
    if source.kind == "folder" or source.modified is None:
        return False
    try:
        written = dt.datetime.fromisoformat(record.created_at).timestamp()
    except ValueError:  # a record whose time cannot be read proves nothing: the slide is extracted again
        return False
    return source.modified < written


def _io(settings: Settings, fn, what: str, on_retry=None):
    retry = settings.retries
    return retry_io(fn, retries=retry.io_retries, backoff_seconds=retry.backoff_seconds, what=what, on_retry=on_retry)


def store_io(settings: Settings, store: Store, fn, what: str):
    """A store call with retries; a storage error that is not a hiccup (a full disk, a quota, a read-only or
    unwritable store) becomes a StorageError: infrastructure, so the slide stays pending."""
    try:
        return _io(settings, fn, what)
    except OSError as exc:
        raise _storage_error(store, what, exc) from exc


def _storage_error(store: Store, what: str, exc: BaseException) -> StorageError:
    # a store or endpoint URL may carry credentials (user:secret@host): the message never shows them
    return StorageError(
        redact_urls(
            f"{what} in the store {store.url} failed ({short_error(exc)}); free space or fix the store's "
            "permissions, then run again: the slide stays pending"
        )
    )


def examine_source(ref: SlideRef, settings: Settings) -> SourceIdentity | None:
    """The slide's identity now; None when it cannot be examined for a reason of its own (the reader says why)."""
    try:
        return _io(settings, lambda: source_identity(ref, settings), f"examining slide {ref.slide_id}")
    except TransientIOError:
        raise
    except Exception as exc:  # noqa: BLE001 - only infrastructure stops here; the slide's own trouble is read later
        if is_infrastructure(exc):
            raise TransientIOError(f"examining slide {ref.slide_id} failed ({short_error(exc)})") from exc
        return None


def committed_extraction(
    ref: SlideRef, settings: Settings, store: Store
) -> tuple[str, SourceIdentity | None, SlideRecord | None]:
    """(the slide's extraction hash now, its source identity, its committed record when that holds this very
    extraction); TransientIOError or StorageError when the source or the store cannot be read."""
    source = examine_source(ref, settings)
    extraction_hash = slide_extraction_hash(ref, settings, source)
    done = store_io(
        settings, store, lambda: _committed(store, ref, settings, source, extraction_hash), f"reading {ref.slide_id}"
    )
    return extraction_hash, source, done


def _planned_record(ref: SlideRef, settings: Settings, store: Store) -> SlideRecord | None:
    """The slide's committed record of its current extraction, or None: to do (also when it cannot be read now: the
    task reads it again and reports it failed or pending)."""
    if slide_id_problem(ref.slide_id):
        return None
    return committed_extraction(ref, settings, store)[2]


def plan_extraction(refs: list[SlideRef], settings: Settings, store: Store) -> UnitPlan:
    """The slides still to extract, and those whose current extraction is committed (skipped, with their kept
    patches), from each slide's record and shard footer, a few slides at a time (tasks.work.planning)."""
    records = read_committed(refs, lambda ref: _planned_record(ref, settings, store), lambda ref: ref.slide_id, log)
    committed = {
        ref.slide_id: SlideOutcome(ref.slide_id, "skipped", record.kept, 0.0, None, record).unit()
        for ref, record in zip(refs, records, strict=True)
        if record is not None
    }
    pending = [ref for ref, record in zip(refs, records, strict=True) if record is None]
    return UnitPlan(sorted(pending, key=lambda ref: ref.slide_id), sorted(committed), committed)


def part_refs(sources: list[str], settings: Settings, part: int | None, parts: int) -> list[SlideRef]:
    """This part's slides of ``sources``; NoUnitSucceeded when a whole run's sources name no slide at all."""
    refs = in_part(resolve_sources(sources, settings), part, parts, key=lambda ref: ref.slide_id)
    if not refs and part is None:
        raise NoUnitSucceeded(f"no slides found in {sources}; check the source paths")
    return refs


def extract_slide(
    ref: SlideRef, settings: Settings, store: Store, logger: logging.Logger | None = None
) -> SlideOutcome:
    """Extract one slide into the store. A bad slide becomes a failed ``slide.json``; a storage failure that
    outlasts its retries leaves the slide pending (nothing written); neither raises. A slide whose current
    extraction is committed (another run's, since the plan) is skipped."""
    logger = logger or log
    problem = slide_id_problem(ref.slide_id)
    if problem:  # nothing can be recorded under such an id: it is reported, and the batch goes on
        error = f"slide id {ref.slide_id!r} cannot name a store key ({problem}); resolve slides with resolve_sources"
        logger.warning("%r: failed: %s", ref.slide_id, error)
        return SlideOutcome(ref.slide_id, "failed", 0, 0.0, error)
    start = time.perf_counter()
    try:
        extraction_hash, source, done = committed_extraction(ref, settings, store)
    except (TransientIOError, StorageError) as exc:
        logger.warning("%s: stays pending: %s", ref.slide_id, exc)
        return SlideOutcome(ref.slide_id, "pending", 0, 0.0, str(exc))
    if done is not None:
        logger.info("%s: already committed with these settings and this source, skipped", ref.slide_id)
        return SlideOutcome(ref.slide_id, "skipped", done.kept, 0.0, None, done)
    record = _attempt(ref, settings, store, logger, _base_record(ref, settings, extraction_hash, source))
    if record is None or isinstance(record, str):
        return SlideOutcome(ref.slide_id, "pending", 0, round(time.perf_counter() - start, 3), record)
    record.seconds = {**record.seconds, "total": round(time.perf_counter() - start, 3)}
    record.created_at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    try:
        record = _commit_record(store, settings, record, logger)
    except (TransientIOError, StorageError) as exc:
        logger.warning("%s: stays pending: %s", ref.slide_id, exc)
        return SlideOutcome(ref.slide_id, "pending", 0, record.seconds["total"], str(exc))
    return SlideOutcome(ref.slide_id, record.status, record.kept, record.seconds["total"], record.error, record)


def _attempt(
    ref: SlideRef, settings: Settings, store: Store, logger: logging.Logger, base: SlideRecord
) -> SlideRecord | str:
    """The finished record (ok or failed), or the error text when infrastructure failed (storage through every
    retry, a full disk, model weights that cannot be fetched, the GPU): only the slide's own trouble is final."""
    partial = {"record": base}  # what the last attempt learned (vendor, levels, MPP) survives into a failure

    def attempt() -> SlideRecord:
        partial["record"] = base.model_copy(deep=True)
        return _extract(ref, settings, store, logger, partial["record"])

    def on_retry(n: int, exc: BaseException) -> None:
        logger.warning(
            "%s: I/O error (%s), retry %d of %d", ref.slide_id, type(exc).__name__, n, settings.retries.io_retries
        )

    try:
        return _io(settings, attempt, f"reading slide {ref.slide_id}", on_retry)
    except SlideError as exc:
        return partial["record"].failed(str(exc))
    except TransientIOError as exc:
        logger.warning("%s: stays pending: %s", ref.slide_id, exc)
        return str(exc)
    except Exception as exc:  # noqa: BLE001 - one broken slide must never sink the batch
        if is_infrastructure(exc):  # a full disk, a hub, the GPU: not the slide's fault, so never final
            # our own errors say what failed and what to do, in full; others are cut to one line
            error = redact_urls(str(exc)) if isinstance(exc, InfrastructureError) else short_error(exc)
            error = error if "pending" in error else f"{error}; the slide stays pending: run again once it is fixed"
            logger.warning("%s: stays pending: %s", ref.slide_id, error)
            return error
        logger.exception("%s: unexpected error", ref.slide_id)
        return partial["record"].failed(f"unexpected {type(exc).__name__} ({exc}); report it with this slide attached")


def _commit_record(store: Store, settings: Settings, record: SlideRecord, logger: logging.Logger) -> SlideRecord:
    """Commit the record; what is committed comes back. A failed re-run of a slide whose earlier extraction is
    committed and whole (its ``ok`` record and the shard that record describes) leaves that extraction in place (it
    is reported failed, and tried again next run); a failing slide never commits a shard of its own."""
    slide_id = record.slide_id
    if record.status == "failed":
        earlier = store_io(settings, store, lambda: _good_record(store, slide_id), f"reading {slide_id}")
        if earlier is not None:
            kept = f"the store keeps its earlier extraction {earlier.extraction_hash} of {earlier.created_at}"
            record = record.model_copy(
                update={"error": f"{record.error} ({kept}: a failed re-run never removes a committed shard)"}
            )
            logger.warning("%s: failed: %s", slide_id, record.error)
            return record
        logger.warning("%s: failed: %s", slide_id, record.error)
        # A stray shard (no ok record describes it: a run stopped before its record) would contradict this record.
        store_io(settings, store, lambda: store.delete(shard_key(slide_id)), "cleaning the store")
    payload = record.model_dump(mode="json")
    store_io(settings, store, lambda: store.write_json(slide_json_key(slide_id), payload), f"writing {slide_id}")
    return record


def _base_record(ref: SlideRef, settings: Settings, extraction_hash: str, source: SourceIdentity | None) -> SlideRecord:
    return SlideRecord(
        slide_id=ref.slide_id,
        source_uri=ref.uri,
        origin=ref.origin,
        project=slide_project(ref, settings),
        file_id=ref.file_id,
        md5=ref.md5,
        source=source,
        target_mpp=settings.patch.target_mpp,
        patch_px=settings.patch.patch_px,
        selection=settings.selection.model_dump() if ref.positions is None else _positions_selection(settings),
        tissue_threshold=settings.tissue.threshold,
        extraction_hash=extraction_hash,
        schema_version=SCHEMA_VERSION,
        factory_version=__version__,
    )


def _positions_selection(settings: Settings) -> dict:
    return {
        "method": "positions",
        "box_px": settings.patch.positions_box_px,
        "resample": settings.patch.positions_resample,
    }


def _check_size(ref: SlideRef) -> None:
    """A manifest that states the size catches a truncated download before any decoding."""
    if ref.size is None or is_remote(ref.uri) or not os.path.isfile(ref.uri):
        return
    actual = os.path.getsize(ref.uri)
    if actual != ref.size:
        raise SlideError(
            f"{os.path.basename(ref.uri)} has {actual} bytes but the manifest says {ref.size}: the download is "
            "truncated or the wrong file; download it again"
        )


_md5_memory: dict[tuple[str, int, int], str] = {}


def _md5(ref: SlideRef, settings: Settings) -> str:
    """The md5 of the slide's bytes, streamed in chunks; a local file's is remembered under (path, size, mtime)."""
    digest = hashlib.md5(usedforsecurity=False)
    if is_remote(ref.uri):
        fs, path = url_to_fs(ref.uri, settings.s3)
        with fs.open(path, "rb", block_size=MD5_CHUNK, cache_type="none") as handle:  # one pass: no block cache
            while chunk := handle.read(MD5_CHUNK):
                digest.update(chunk)
        return digest.hexdigest()
    stat = os.stat(ref.uri)
    stamp = (os.path.realpath(ref.uri), stat.st_size, stat.st_mtime_ns)
    if stamp not in _md5_memory:
        with open(ref.uri, "rb") as handle:
            while chunk := handle.read(MD5_CHUNK):
                digest.update(chunk)
        _md5_memory[stamp] = digest.hexdigest()
    return _md5_memory[stamp]


def _check_md5(ref: SlideRef, settings: Settings) -> None:
    """A manifest's md5 catches a corrupt or wrong file: always for a local slide, for a remote one when
    ``slides.verify_md5_remote`` is on (it reads the whole object once)."""
    if not ref.md5:
        return
    if is_remote(ref.uri):
        if not settings.slides.verify_md5_remote:
            return
    elif not os.path.isfile(ref.uri):
        return  # the reader says that the file is missing
    expected = ref.md5.strip().lower()
    name = posixpath.basename(ref.uri)
    if not re.fullmatch(r"[0-9a-f]{32}", expected):
        raise SlideError(
            f"the manifest's md5 for {name} is {ref.md5!r}, not an md5 digest (32 hex digits), so the file cannot be "
            f"checked; export the manifest again from the GDC portal"
        )
    actual = _md5(ref, settings)
    if actual != expected:
        raise SlideError(
            f"{name} has md5 {actual} but the manifest says {expected}: the download is corrupt or the wrong file; "
            "download it again"
        )


def check_download(ref: SlideRef, settings: Settings) -> None:
    """A SlideError when the slide is missing, or its size or md5 differs from what its manifest says."""
    if ref.missing_reason:
        raise SlideError(ref.missing_reason)
    _check_size(ref)
    _check_md5(ref, settings)


def resolve_mpp(ref: SlideRef, reader: SlideReader, settings: Settings) -> None:
    """The slide's MPP: its own override, else the scanner's, else ``slides.default_mpp``; a SlideError if none."""
    override = mpp_override(ref, settings)
    if override is not None:
        reader.info.mpp = override
        reader.info.extra["mpp_source"] = "mpp_overrides"
        return
    if reader.info.mpp is None:
        if settings.slides.default_mpp is None:
            raise SlideError(missing_mpp_message(ref.uri))
        reader.info.mpp = settings.slides.default_mpp
        reader.info.extra["mpp_source"] = "default_mpp"


@dataclass
class _Tissue:
    """Where a slide's patches come from: its overview and tissue mask, the level-0 size of a patch cell, the cells
    on tissue (or at the given positions), and the plan that reads and chooses among them."""

    overview: Any
    downsample: float
    mask: Any
    cell: Any  # a patch cell's level-0 size (across, down)
    cells: list[GridCell]
    plan: SelectionPlan


def _extract(
    ref: SlideRef, settings: Settings, store: Store, logger: logging.Logger, record: SlideRecord
) -> SlideRecord:
    """Open the slide, find its tissue, write its chosen patches and its pictures: its record, filled in."""
    check_download(ref, settings)
    timings: dict[str, float] = {}
    tick = time.perf_counter()
    with open_slide(ref.uri, storage_opts=storage_options(ref.uri, settings.s3)) as reader:
        _open_scale(ref, settings, reader, record, logger)
        timings["open"] = time.perf_counter() - tick
        tick = time.perf_counter()
        tissue = _find_tissue(ref, settings, reader, record, logger)
        timings["mask"] = time.perf_counter() - tick
        counts = _write_patches(SlidePass(ref, settings, reader, logger), store, record, tissue, timings)
    logger.info(
        "%s: %d patches kept of %d tissue cells (%s, level %d, %.1fs)",
        *(ref.slide_id, counts["kept"], len(tissue.cells), tissue.plan.name, record.read_level, timings["patches"]),
    )
    record.counts = counts
    record.seconds = {k: round(v, 3) for k, v in timings.items()}
    record.shard = shard_key(ref.slide_id)
    record.thumbnail = thumbnail_key(ref.slide_id)
    record.status = "ok"
    return record


def _open_scale(
    ref: SlideRef, settings: Settings, reader: SlideReader, record: SlideRecord, logger: logging.Logger
) -> None:
    """The slide's MPP and levels into its record, and the patches' scale; a warning when they are upsampled."""
    resolve_mpp(ref, reader, settings)
    info = reader.info
    _describe_slide(record, reader)
    # the hash the shard and the record hold: non-square pixels, now known, add their key (tasks.slides.hashing)
    record.extraction_hash = slide_extraction_hash(ref, settings, record.source, (info.mpp_x, info.mpp_y))
    patch_mpp, patch_px = patch_scale(ref, settings, info.mpp)
    if ref.positions is not None:  # what the positions' patches are: the paper's level-0 boxes, at this scale
        record.target_mpp, record.patch_px = patch_mpp, patch_px
    record.upsampled = info.upsampled_at(read_resolution(ref, settings, info, patch_mpp, patch_px))
    if record.upsampled:
        logger.warning(
            "%s: patches at %.3g µm/px are finer than the scan (%.3g µm/px): they are upsampled and hold no more "
            "detail than the slide",
            *(ref.slide_id, patch_mpp, info.mpp),
        )


def _find_tissue(
    ref: SlideRef, settings: Settings, reader: SlideReader, record: SlideRecord, logger: logging.Logger
) -> _Tissue:
    """The tissue mask and the cells to read: the given positions on the slide, else the grid's cells on tissue
    (a SlideError when none reaches the threshold), with the selection's plan."""
    info = reader.info
    overview, downsample = reader.overview(settings.tissue.mask_downsample)
    mask = tissue_mask(overview, downsample, info.mpp, settings.tissue)
    cell = info.level0_px(settings.patch.patch_px * settings.patch.target_mpp)  # (across, down)
    if ref.positions is not None:
        side = settings.patch.positions_box_px
        cells = [
            GridCell(x, y, side, side, round(mask_fraction(mask, downsample, (x, y, side, side)), 4))
            for x, y in _positions_inside(ref, record, side, logger)
        ]
        plan = SelectionPlan("positions", None, iter([ReadBatch(cells, list(range(len(cells))))]))
        return _Tissue(overview, downsample, mask, cell, cells, plan)
    cells = grid_cells(mask, downsample, (info.width, info.height), cell, settings.tissue.threshold)
    if not cells:
        raise SlideError(
            f"no {settings.patch.patch_px} px cell at {settings.patch.target_mpp} µm/px reaches the tissue "
            f"threshold {settings.tissue.threshold}; the tissue is smaller than one patch: lower "
            "tissue.threshold or patch.patch_px"
        )
    return _Tissue(overview, downsample, mask, cell, cells, plan_selection(cells, settings.selection, ref.slide_id))


def _write_patches(
    slide: SlidePass, store: Store, record: SlideRecord, tissue: _Tissue, timings: dict[str, float]
) -> dict[str, Any]:
    """Read, filter and choose the patches into the committed shard, then write the slide's pictures; the counts.
    ``timings`` gets the seconds of the patches and of the pictures."""
    tick = time.perf_counter()
    ref, settings, reader = slide.ref, slide.settings, slide.reader
    record.read_level = slide.read_level

    def pictures(result: PassResult) -> dict[str, bytes]:
        started = time.perf_counter()
        drawn = (tissue.overview, tissue.downsample, tissue.mask)
        encoded = _encode_pictures(reader, settings, ref.slide_id, tissue.plan.name, drawn, result)
        timings["thumbnail"] = time.perf_counter() - started
        return encoded

    result, pngs = _write_shard(slide, store, tissue.plan, tissue.cells, record.extraction_hash, pictures)
    timings["patches"] = time.perf_counter() - tick - timings["thumbnail"]
    grid = math.prod(grid_shape((reader.info.width, reader.info.height), tissue.cell))
    counts = dict(result.counts, tissue_cells=len(tissue.cells), grid_cells=grid)
    if record.failed_positions:
        counts["rejected"] = dict(counts["rejected"], outside_slide=len(record.failed_positions))
    if result.selection:
        record.selection = dict(record.selection, **result.selection)
    record.random_weights = result.random_weights
    tick = time.perf_counter()
    for key, png in pngs.items():
        _write_png(store, key, png)
    if selection_key(ref.slide_id) in pngs:
        record.selection_png = selection_key(ref.slide_id)
    timings["thumbnail"] += time.perf_counter() - tick
    return counts


def _positions_inside(ref: SlideRef, record: SlideRecord, side: int, logger: logging.Logger) -> list[tuple[int, int]]:
    """The positions whose level-0 box lies on the slide. The others are recorded in ``failed_positions`` (reading
    them would give glass-white patches that show nothing of the slide); a slide with none on it fails."""
    width, height = int(record.width or 0), int(record.height or 0)
    inside, outside = [], []
    for x, y in ref.positions or []:
        if x + side <= width and y + side <= height:
            inside.append((x, y))
        else:
            reason = f"its {side} px box from ({x}, {y}) leaves the slide ({width} x {height} px at level 0)"
            outside.append(PositionProblem(x=x, y=y, reason=reason))
    record.failed_positions = outside
    if outside:
        named = "; ".join(f"({p.x}, {p.y})" for p in outside[:5]) + ("; ..." if len(outside) > 5 else "")
        message = (
            f"{len(outside)} of {len(ref.positions or [])} positions of {ref.origin} lie outside {ref.slide_id} "
            f"({width} x {height} px at level 0, boxes of {side} px): {named}; check that the positions belong to "
            "this slide (its wsi_id and file_id) and are level-0 pixels"
        )
        if not inside:
            raise SlideError(message)
        logger.warning("%s: %s; they are recorded in failed_positions", ref.slide_id, message)
    return inside


def _describe_slide(record: SlideRecord, reader: SlideReader) -> None:
    info = reader.info
    record.vendor, record.backend, record.tile_reader = info.vendor, info.backend, info.fast_tiles
    record.width, record.height = info.width, info.height
    record.levels = [
        LevelInfo(level=i, width=w, height=h, downsample=round(ds, 4))
        for i, ((w, h), ds) in enumerate(zip(info.level_dimensions, info.level_downsamples, strict=True))
    ]
    record.mpp, record.mpp_source = info.mpp, info.extra.get("mpp_source")
    record.mpp_x, record.mpp_y = info.mpp_x, info.mpp_y
    record.objective_power = info.objective_power


def _encode_pictures(
    reader: SlideReader, settings: Settings, slide_id: str, plan_name: str, overview: tuple, result: PassResult
) -> dict[str, bytes]:
    """The slide's thumbnail (and selection picture) as PNG bytes by store key. ``overview`` is the tissue mask's
    (picture, downsample, mask)."""
    info = reader.info
    picture, picture_downsample, mask = overview
    thumb_downsample = max(1.0, max(info.width, info.height) / settings.extract.thumbnail_px)
    if thumb_downsample < picture_downsample * 0.8:  # the mask overview is too coarse to look at
        picture, picture_downsample = reader.overview(thumb_downsample)
    mask_big = cv2.resize(mask.astype("uint8"), (picture.shape[1], picture.shape[0]), interpolation=cv2.INTER_NEAREST)
    size, random_weights = settings.extract.thumbnail_px, result.random_weights
    boxes = [k.box for k in result.kept]
    thumbnail = draw_thumbnail(picture, mask_big, picture_downsample, boxes, size, random_weights=random_weights)
    pngs = {thumbnail_key(slide_id): _png(thumbnail_key(slide_id), thumbnail)}
    if plan_name == "representative":
        selection = draw_selection(picture, picture_downsample, result.kept, size, random_weights=random_weights)
        pngs[selection_key(slide_id)] = _png(selection_key(slide_id), selection)
    return pngs


def _png(key: str, rgb) -> bytes:
    ok, png = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok or png is None or not png.size:  # an empty file would stand in the store as a picture
        raise SlideError(f"{key} could not be encoded as PNG (a {rgb.shape} picture); report it with this slide")
    return png.tobytes()


def _write_png(store: Store, key: str, png: bytes) -> None:
    try:
        store.write_bytes(key, png)
    except OSError as exc:
        if is_transient(exc):
            raise
        raise _storage_error(store, f"writing {key}", exc) from exc


def _write_shard(
    slide: SlidePass,
    store: Store,
    plan: SelectionPlan,
    cells: list[GridCell],
    extraction_hash: str,
    pictures: Callable[[PassResult], dict[str, bytes]],
) -> tuple[PassResult, dict[str, bytes]]:
    """Write the slide's patch shard through a staged file: it is committed whole or not at all. Its pictures are
    encoded before the commit, so that a slide that fails never replaces a committed shard."""
    ref = slide.ref
    metadata = {
        "pathgen.slide_id": ref.slide_id,
        "pathgen.extraction_hash": extraction_hash,
        "pathgen.selection": plan.name,
    }
    try:
        with store.staged_file(shard_key(ref.slide_id)) as local:
            writer = PatchShardWriter(local, metadata)
            try:
                if plan.name == "representative":
                    result = write_representative(slide, cells, writer)
                else:
                    result = write_planned(slide, plan, writer)
            finally:
                writer.close()
            if not result.kept:
                raise SlideError(
                    f"no patch passed the quality filters ({result.counts['read']} read; rejected: "
                    f"{result.counts['rejected']}); check the slide or relax quality.max_background_fraction, "
                    "quality.min_sharpness or quality.max_pen_fraction"
                )
            pngs = pictures(result)
    except OSError as exc:  # the reader turns the slide's own read errors into SlideError: this is the store
        if is_transient(exc):
            raise
        raise _storage_error(store, f"writing the patch shard of {ref.slide_id}", exc) from exc
    return result, pngs


def extract_slides(
    units: list[SlideRef], settings: Settings, logger: logging.Logger | None = None
) -> list[UnitOutcome]:
    """A group of slides in one worker: one store client and, per slide, one reader opened and closed. Slides
    whose storage failed through every retry make the task raise (so that Prefect retries it) after the others
    are done; committed slides are skipped on the retry."""
    store = Store(settings.store, settings.s3)
    return pending_raises([extract_slide(ref, settings, store, logger).unit() for ref in units])


@task(name="extract-slides", retry_condition_fn=retry_infrastructure, tags=["extract"])
def extract_slides_task(units: list[SlideRef], settings: Settings) -> list[UnitOutcome]:
    worker_process_setup()  # in a pool worker: die with the main process, bounded threads; no-op in the main
    return extract_slides(units, settings, get_run_logger())
