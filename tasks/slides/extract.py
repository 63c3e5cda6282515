"""Extraction of one slide: open, MPP, tissue mask, grid, read, quality filters, select, write.

``extract_slide`` never raises for a bad slide: it records ``slide.json`` with ``status: failed`` and a one-sentence
reason, and returns. I/O errors are retried with backoff first. Commit order is shard, thumbnail, then
``slide.json``: a ``slide.json`` with ``status: ok`` means everything it names is committed and whole.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import cv2
from prefect import get_run_logger, task

from pathgen import __version__
from pathgen.settings import Settings
from tasks.errors import SlideError, TransientIOError, retry_io, retry_only_transient
from tasks.selection.plan import ReadBatch, SelectionPlan, plan_selection
from tasks.slides.passes import PassResult, SlidePass, write_planned, write_representative
from tasks.slides.pictures import draw_selection, draw_thumbnail
from tasks.slides.reader import MPP_TOLERANCE, SlideReader, missing_mpp_message
from tasks.slides.shard import SCHEMA_VERSION, PatchShardWriter
from tasks.slides.sources import SlideRef
from tasks.slides.tissue import GridCell, grid_cells, mask_fraction, tissue_mask
from tasks.store.objects import Store, is_remote, storage_options

log = logging.getLogger("pathgen.extract")


@dataclass
class SlideOutcome:
    slide_id: str
    status: str  # ok | failed | skipped (already committed with the same settings)
    patches: int
    seconds: float
    error: str | None = None
    record: dict[str, Any] = field(default_factory=dict)


def slide_json_key(slide_id: str) -> str:
    return f"slides/{slide_id}/slide.json"


def thumbnail_key(slide_id: str) -> str:
    return f"slides/{slide_id}/thumbnail.png"


def selection_key(slide_id: str) -> str:
    return f"slides/{slide_id}/selection.png"


def shard_key(slide_id: str) -> str:
    return f"patches/{slide_id}.parquet"


def _committed(store: Store, slide_id: str, settings_hash: str) -> dict[str, Any] | None:
    key = slide_json_key(slide_id)
    if not store.exists(key):
        return None
    record = store.read_json(key)
    same = record.get("status") == "ok" and record.get("settings_hash") == settings_hash
    return record if same and store.exists(shard_key(slide_id)) else None


def extract_slide(
    ref: SlideRef, settings: Settings, store: Store, logger: logging.Logger | None = None
) -> SlideOutcome:
    """Extract one slide into the store; a bad slide becomes a failed ``slide.json``, never an exception."""
    logger = logger or log
    settings_hash = settings.extraction_hash()
    start = time.perf_counter()
    done = retry_io(
        lambda: _committed(store, ref.slide_id, settings_hash),
        retries=settings.extract.io_retries,
        backoff_seconds=settings.extract.io_backoff_seconds,
        what=f"reading the store for {ref.slide_id}",
    )
    if done is not None:
        logger.info("%s: already committed with these settings, skipped", ref.slide_id)
        return SlideOutcome(ref.slide_id, "skipped", int(done["counts"]["kept"]), 0.0, None, done)

    base = _base_record(ref, settings, settings_hash)

    partial = dict(base)  # what the last attempt learned (vendor, levels, MPP) survives into a failed record

    def attempt() -> dict[str, Any]:
        partial.clear()
        partial.update(base)
        return _extract(ref, settings, store, logger, partial)

    def on_retry(n: int, exc: BaseException) -> None:
        logger.warning(
            "%s: I/O error (%s), retry %d of %d", ref.slide_id, type(exc).__name__, n, settings.extract.io_retries
        )

    try:
        record = retry_io(
            attempt,
            retries=settings.extract.io_retries,
            backoff_seconds=settings.extract.io_backoff_seconds,
            what=f"reading slide {ref.slide_id}",
            on_retry=on_retry,
        )
    except (SlideError, TransientIOError) as exc:
        record = _failed(partial, str(exc))
    except Exception as exc:  # noqa: BLE001 - one broken slide must never sink the batch
        logger.exception("%s: unexpected error", ref.slide_id)
        record = _failed(partial, f"unexpected {type(exc).__name__} ({exc}); report it with this slide attached")
    record["seconds"]["total"] = round(time.perf_counter() - start, 3)
    record["created_at"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    if record["status"] == "failed":
        logger.warning("%s: failed: %s", ref.slide_id, record["error"])
        # A shard from an earlier, different run would contradict this record: remove it.
        retry_io(
            lambda: store.delete(shard_key(ref.slide_id)),
            retries=settings.extract.io_retries,
            backoff_seconds=settings.extract.io_backoff_seconds,
            what="cleaning the store",
        )
    retry_io(
        lambda: store.write_json(slide_json_key(ref.slide_id), record),
        retries=settings.extract.io_retries,
        backoff_seconds=settings.extract.io_backoff_seconds,
        what=f"writing slide.json for {ref.slide_id}",
    )
    return SlideOutcome(
        ref.slide_id,
        record["status"],
        int(record["counts"].get("kept", 0)),
        record["seconds"]["total"],
        record["error"],
        record,
    )


def _base_record(ref: SlideRef, settings: Settings, settings_hash: str) -> dict[str, Any]:
    return {
        "slide_id": ref.slide_id,
        "status": "failed",
        "error": None,
        "source_uri": ref.uri,
        "origin": ref.origin,
        "project": ref.project,
        "file_id": ref.file_id,
        "md5": ref.md5,
        "target_mpp": settings.patch.target_mpp,
        "patch_px": settings.patch.patch_px,
        "selection": settings.selection.model_dump() if ref.positions is None else {"method": "positions"},
        "tissue_threshold": settings.tissue.threshold,
        "random_weights": False,
        "counts": {"kept": 0},
        "seconds": {},
        "settings_hash": settings_hash,
        "schema_version": SCHEMA_VERSION,
        "factory_version": __version__,
    }


def _failed(base: dict[str, Any], error: str) -> dict[str, Any]:
    record = dict(base)
    record.update(status="failed", error=error, counts={"kept": 0}, seconds={})
    return record


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


def _resolve_mpp(ref: SlideRef, reader: SlideReader, settings: Settings) -> None:
    overrides = settings.slides.mpp_overrides
    for key in (ref.slide_id, reader.uri.rsplit("/", 1)[-1]):
        if key in overrides:
            reader.info.mpp = float(overrides[key])
            reader.info.extra["mpp_source"] = "mpp_overrides"
            return
    if reader.info.mpp is None:
        if settings.slides.default_mpp is None:
            raise SlideError(missing_mpp_message(ref.uri))
        reader.info.mpp = settings.slides.default_mpp
        reader.info.extra["mpp_source"] = "default_mpp"


def _extract(
    ref: SlideRef, settings: Settings, store: Store, logger: logging.Logger, record: dict[str, Any]
) -> dict[str, Any]:
    if ref.missing_reason:
        raise SlideError(ref.missing_reason)
    _check_size(ref)
    timings: dict[str, float] = {}
    tick = time.perf_counter()
    with SlideReader(ref.uri, storage_opts=storage_options(ref.uri, settings.s3)) as reader:
        _resolve_mpp(ref, reader, settings)
        info = reader.info
        record.update(
            vendor=info.vendor,
            backend=info.backend,
            tile_reader=info.fast_tiles,
            width=info.width,
            height=info.height,
            levels=[
                {"level": i, "width": w, "height": h, "downsample": round(ds, 4)}
                for i, ((w, h), ds) in enumerate(zip(info.level_dimensions, info.level_downsamples, strict=True))
            ],
            mpp=info.mpp,
            mpp_source=info.extra.get("mpp_source"),
            objective_power=info.objective_power,
        )
        timings["open"] = time.perf_counter() - tick
        record["upsampled"] = settings.patch.target_mpp < info.mpp * (1 - MPP_TOLERANCE)
        if record["upsampled"]:
            logger.warning(
                "%s: target_mpp %.3g is finer than the scan (%.3g µm/px): patches are upsampled and hold no more "
                "detail than the slide",
                ref.slide_id,
                settings.patch.target_mpp,
                info.mpp,
            )

        tick = time.perf_counter()
        overview, downsample = reader.overview(settings.tissue.mask_downsample)
        mask = tissue_mask(overview, downsample, info.mpp, settings.tissue)
        cell = settings.patch.patch_px * settings.patch.target_mpp / info.mpp
        if ref.positions is not None:
            side = settings.patch.positions_box_px
            cells = [
                GridCell(x, y, side, side, round(mask_fraction(mask, downsample, (x, y, side, side)), 4))
                for x, y in ref.positions
            ]
            plan = SelectionPlan("positions", None, iter([ReadBatch(cells, list(range(len(cells))))]))
        else:
            cells = grid_cells(mask, downsample, (info.width, info.height), cell, settings.tissue.threshold)
            if not cells:
                raise SlideError(
                    f"no {settings.patch.patch_px} px cell at {settings.patch.target_mpp} µm/px reaches the tissue "
                    f"threshold {settings.tissue.threshold}; the tissue is smaller than one patch: lower "
                    "tissue.threshold or patch.patch_px"
                )
            plan = plan_selection(cells, settings.selection, ref.slide_id)
        timings["mask"] = time.perf_counter() - tick
        record["read_level"] = reader.best_level(settings.patch.target_mpp)

        tick = time.perf_counter()
        slide = SlidePass(ref, settings, reader, logger)
        result = _write_shard(slide, store, plan, cells)
        timings["patches"] = time.perf_counter() - tick
        counts = dict(
            result.counts, tissue_cells=len(cells), grid_cells=int(info.width // cell) * int(info.height // cell)
        )
        if result.selection:
            record["selection"] = dict(record["selection"], **result.selection)
        record["random_weights"] = result.random_weights

        tick = time.perf_counter()
        thumb_downsample = max(1.0, max(info.width, info.height) / settings.extract.thumbnail_px)
        picture, picture_downsample = overview, downsample
        if thumb_downsample < downsample * 0.8:  # the mask overview is too coarse to look at
            picture, picture_downsample = reader.overview(thumb_downsample)
        mask_big = cv2.resize(
            mask.astype("uint8"), (picture.shape[1], picture.shape[0]), interpolation=cv2.INTER_NEAREST
        )
        kept_boxes = [k.box for k in result.kept]
        _write_png(
            store,
            thumbnail_key(ref.slide_id),
            draw_thumbnail(picture, mask_big, picture_downsample, kept_boxes, settings.extract.thumbnail_px),
        )
        if plan.name == "representative":
            _write_png(
                store,
                selection_key(ref.slide_id),
                draw_selection(picture, picture_downsample, result.kept, settings.extract.thumbnail_px),
            )
            record["selection_png"] = selection_key(ref.slide_id)
        timings["thumbnail"] = time.perf_counter() - tick

    logger.info(
        "%s: %d patches kept of %d tissue cells (%s, level %d, %.1fs)",
        ref.slide_id,
        counts["kept"],
        len(cells),
        plan.name,
        record["read_level"],
        timings["patches"],
    )
    record.update(
        status="ok",
        counts=counts,
        seconds={k: round(v, 3) for k, v in timings.items()},
        shard=shard_key(ref.slide_id),
        thumbnail=thumbnail_key(ref.slide_id),
    )
    return record


def _write_png(store: Store, key: str, rgb) -> None:
    ok, png = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    store.write_bytes(key, png.tobytes())


def _write_shard(slide: SlidePass, store: Store, plan: SelectionPlan, cells: list[GridCell]) -> PassResult:
    """Write the slide's patch shard through a staged file: it is committed whole or not at all."""
    ref, settings = slide.ref, slide.settings
    metadata = {
        "pathgen.slide_id": ref.slide_id,
        "pathgen.settings_hash": settings.extraction_hash(),
        "pathgen.selection": plan.name,
    }
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
    return result


def record_failures(refs: list[SlideRef], settings: Settings, error: str) -> list[SlideOutcome]:
    """Failed records for slides whose worker was lost before it could record them itself (best effort)."""
    store = Store(settings.store, settings.s3)
    outcomes = []
    for ref in refs:
        record = _failed(_base_record(ref, settings, settings.extraction_hash()), error)
        record["created_at"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        try:
            if not _committed(store, ref.slide_id, record["settings_hash"]):
                store.write_json(slide_json_key(ref.slide_id), record)
        except Exception:  # noqa: BLE001 - the store may be what failed; the run summary still lists the slide
            log.warning("%s: could not record the failure in the store", ref.slide_id)
        outcomes.append(SlideOutcome(ref.slide_id, "failed", 0, 0.0, error, record))
    return outcomes


def extract_slides(
    refs: list[SlideRef], settings: Settings, logger: logging.Logger | None = None
) -> list[SlideOutcome]:
    """A group of slides in one worker: one store client and, per slide, one reader opened and closed."""
    store = Store(settings.store, settings.s3)
    return [extract_slide(ref, settings, store, logger) for ref in refs]


@task(
    name="extract-slides",
    retries=2,
    retry_delay_seconds=[10, 60],
    retry_condition_fn=retry_only_transient,
    tags=["extract"],
)
def extract_slides_task(refs: list[SlideRef], settings: Settings) -> list[SlideOutcome]:
    return extract_slides(refs, settings, get_run_logger())
