"""Featuring one slide: every tissue patch at ``features.target_mpp`` and the encoder's input size, through the
same reader, tissue mask and quality filters as extract, encoded a batch at a time while the next batches are read.

A background thread reads, scores and preprocesses up to ``features.prefetch_batches`` batches ahead while torch
runs the encoder here, so the reads and decodes hide behind the encoder. Vectors are stored as ``encode_image``
returns them (not L2-normalised; see tasks/features/hashing.py).

A slide is skipped when its features file is committed with the same ``slide_inputs`` (its source identity and its
own MPP override), and redone otherwise. A content failure (unreadable, no MPP, no tissue, no patch passing the
filters) is recorded in ``failed/<slide_id>.json`` with its reason, final until the slide's inputs change;
infrastructure (storage through its retries, the encoder's weights, the GPU) leaves the slide pending, nothing
recorded.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import numpy as np
from prefect import get_run_logger, task

from pathgen.errors import (
    InfrastructureError,
    SlideError,
    StorageError,
    TransientIOError,
    is_infrastructure,
    redact_urls,
    retry_infrastructure,
    retry_io,
    short_error,
    without_userinfo,
)
from pathgen.processes import worker_process_setup
from pathgen.settings import Settings
from tasks.features.encoder import FeatureEncoder, load_encoder
from tasks.features.hashing import L2_NORMALISED
from tasks.features.store import FeatureTable, failed_key, features_key, read_meta, write_features
from tasks.slides.extract import check_download, examine_source, resolve_mpp, store_io
from tasks.slides.hashing import mpp_override
from tasks.slides.quality import rejection_reason, score_patch
from tasks.slides.readers import SlideInfo, SlideReader, open_slide
from tasks.slides.record import SourceIdentity
from tasks.slides.sources import SlideRef, slide_id_problem
from tasks.slides.tissue import GridCell, grid_cells, tissue_mask
from tasks.store.objects import Store, storage_options
from tasks.work.commit import pending_raises
from tasks.work.planning import read_committed
from tasks.work.units import PendingWork, UnitOutcome, UnitPlan, counts_text

log = logging.getLogger("pathgen.features")
T = TypeVar("T")


@dataclass
class FeatureJob:
    """What every slide of a task shares: settings, store, the loaded encoder and the features hash."""

    settings: Settings
    store: Store
    encoder: FeatureEncoder
    features_hash: str
    logger: logging.Logger


@dataclass
class Batch:
    """Patches read, scored and preprocessed: the kept cells and their stacked model inputs, and what was rejected."""

    cells: list[GridCell]
    inputs: Any  # torch.Tensor B x 3 x S x S, or None when every patch of the batch was rejected
    read: int
    rejected: Counter


def slide_inputs(ref: SlideRef, settings: Settings, source: SourceIdentity | None) -> dict[str, Any]:
    """What of the slide itself its features depend on; a committed file with other inputs is redone."""
    inputs = {"source": source.key if source is not None else None, "mpp_override": mpp_override(ref, settings)}
    return json.loads(json.dumps(inputs, sort_keys=True))  # as it reads back from the file's JSON metadata


def _committed(job: FeatureJob, slide_id: str, inputs: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """("skipped", metadata) when the slide's features are committed for these inputs, ("failed", record) when
    its content failed for them, else None (to do)."""
    return committed_features(job.store, job.features_hash, slide_id, inputs, job.logger)


def committed_features(
    store: Store, features_hash: str, slide_id: str, inputs: dict[str, Any], logger: logging.Logger
) -> tuple[str, dict[str, Any]] | None:
    """("skipped", metadata) when the slide's features are committed for these inputs, ("failed", record) when
    its content failed for them, else None (to do)."""
    key = features_key(features_hash, slide_id)
    if store.exists(key):
        try:
            meta = read_meta(store, key)
        except ValueError as exc:  # a corrupt file is redone, never a reason to stop the batch
            logger.warning("%s: its features file cannot be read (%s); featured again", slide_id, short_error(exc))
            meta = {}
        if meta.get("slide_inputs") == inputs:
            return "skipped", meta
        if meta:
            logger.info("%s: its source or MPP override changed since it was featured; featured again", slide_id)
    failed = failed_key(features_hash, slide_id)
    if store.exists(failed):
        try:
            record = store.read_json(failed)
        except ValueError:  # a corrupt record: the slide is tried again
            record = None
        if isinstance(record, dict) and record.get("slide_inputs") == inputs:
            return "failed", record
    return None


def _final_outcome(slide_id: str, found: tuple[str, dict[str, Any]], random_weights: bool) -> UnitOutcome:
    """A slide's outcome from what the store holds for its current inputs: its features (skipped) or its content
    failure (failed, final until its inputs change)."""
    status, record = found
    if status == "failed":
        return UnitOutcome(slide_id, "failed", error=record.get("error"), random_weights=random_weights)
    kept = int((record.get("counts") or {}).get("kept", 0))
    return UnitOutcome(slide_id, "skipped", kept, random_weights=random_weights)


def _planned(
    ref: SlideRef, settings: Settings, store: Store, features_hash: str, logger: logging.Logger
) -> tuple[str, dict[str, Any]] | None:
    """What the store holds for the slide's current inputs, or None: to do (also when it cannot be read now: the
    task reads it again and reports it pending if it still cannot)."""
    if slide_id_problem(ref.slide_id):
        return None
    inputs = slide_inputs(ref, settings, examine_source(ref, settings))
    read = partial(committed_features, store, features_hash, ref.slide_id, inputs, logger)
    return store_io(settings, store, read, f"reading {ref.slide_id}")


def plan_featuring(
    refs: list[SlideRef], settings: Settings, store: Store, identity: dict[str, Any], features_hash: str
) -> UnitPlan:
    """The slides still to feature, and those whose outcome for their current inputs is in the store: features
    committed (skipped) or a content failure recorded (failed), a few slides at a time (tasks.work.planning)."""
    found = read_committed(
        refs, lambda ref: _planned(ref, settings, store, features_hash, log), lambda ref: ref.slide_id, log
    )
    random_weights = bool(identity["random_weights"])
    final = {
        ref.slide_id: _final_outcome(ref.slide_id, what, random_weights)
        for ref, what in zip(refs, found, strict=True)
        if what is not None
    }
    pending = [ref for ref, what in zip(refs, found, strict=True) if what is None]
    return UnitPlan(sorted(pending, key=lambda ref: ref.slide_id), sorted(final), final)


def feature_slide(ref: SlideRef, job: FeatureJob) -> UnitOutcome:
    """Feature one slide into the store; never raises for the slide's own trouble or for storage (pending)."""
    problem = slide_id_problem(ref.slide_id)
    if problem:  # nothing can be recorded under such an id: it is reported, and the batch goes on
        error = f"slide id {ref.slide_id!r} cannot name a store key ({problem}); resolve slides with resolve_sources"
        job.logger.warning("%r: failed: %s", ref.slide_id, error)
        return UnitOutcome(ref.slide_id, "failed", error=error)
    start = time.perf_counter()
    random_weights = bool(job.encoder.identity["random_weights"])
    try:
        source = examine_source(ref, job.settings)
        inputs = slide_inputs(ref, job.settings, source)
        done = store_io(
            job.settings, job.store, lambda: _committed(job, ref.slide_id, inputs), f"reading {ref.slide_id}"
        )
    except (TransientIOError, StorageError) as exc:
        job.logger.warning("%s: stays pending: %s", ref.slide_id, exc)
        return UnitOutcome(ref.slide_id, "pending", error=str(exc))
    if done is not None:
        job.logger.info("%s: already %s with this encoder, these settings and this source", ref.slide_id, done[0])
        return _final_outcome(ref.slide_id, done, random_weights)
    result = _attempt(ref, job, source, inputs)
    seconds = time.perf_counter() - start
    if isinstance(result, str):
        return UnitOutcome(ref.slide_id, "pending", 0, seconds, result)
    try:
        return _commit(ref, job, inputs, result, seconds)
    except (TransientIOError, StorageError) as exc:
        job.logger.warning("%s: stays pending: %s", ref.slide_id, exc)
        return UnitOutcome(ref.slide_id, "pending", 0, seconds, str(exc))


def _attempt(
    ref: SlideRef, job: FeatureJob, source: SourceIdentity | None, inputs: dict[str, Any]
) -> tuple[FeatureTable, dict[str, Any]] | SlideError | str:
    """(features, metadata); a SlideError for the slide's own trouble (final); the error text when infrastructure
    failed (pending)."""
    retry = job.settings.retries
    try:
        return retry_io(
            lambda: _feature(ref, job, source, inputs),
            retries=retry.io_retries,
            backoff_seconds=retry.backoff_seconds,
            what=f"reading slide {ref.slide_id}",
        )
    except SlideError as exc:
        return exc
    except Exception as exc:  # noqa: BLE001 - one broken slide must never sink the batch
        if is_infrastructure(exc):  # storage, the encoder's weights, the GPU: never final
            error = redact_urls(str(exc)) if isinstance(exc, InfrastructureError) else short_error(exc)
            error = error if "pending" in error else f"{error}; the slide stays pending: run again once it is fixed"
            job.logger.warning("%s: stays pending: %s", ref.slide_id, error)
            return error
        job.logger.exception("%s: unexpected error", ref.slide_id)
        return SlideError(f"unexpected {type(exc).__name__} ({exc}); report it with this slide attached")


def _commit(ref: SlideRef, job: FeatureJob, inputs: dict[str, Any], result: Any, seconds: float) -> UnitOutcome:
    """Commit the features (then drop an outdated failure record), or record the content failure."""
    store, settings, slide_id = job.store, job.settings, ref.slide_id
    random_weights = bool(job.encoder.identity["random_weights"])
    if isinstance(result, SlideError):
        error = redact_urls(str(result))
        job.logger.warning("%s: failed: %s", slide_id, error)
        record = {
            "slide_id": slide_id,
            "status": "failed",
            "error": error,
            "features_hash": job.features_hash,
            "slide_inputs": inputs,
            "source_uri": without_userinfo(ref.uri),
            "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        }
        # Features committed for the slide's earlier content describe a file that is no longer there: a MIL task
        # must not train on them. They go first, so that a record is never final while they remain (a store error
        # in between leaves the slide pending, and the next run does both).
        stale = features_key(job.features_hash, slide_id)
        store_io(settings, store, lambda: store.delete(stale), f"removing the outdated {stale}")
        key = failed_key(job.features_hash, slide_id)
        store_io(settings, store, lambda: store.write_json(key, record), f"writing {key}")
        return UnitOutcome(slide_id, "failed", 0, seconds, error, random_weights)
    table, meta = result
    meta["seconds"] = round(seconds, 3)
    key = store_io(
        settings, store, lambda: write_features(store, job.features_hash, table, meta), f"writing {slide_id}"
    )
    failed = failed_key(job.features_hash, slide_id)
    store_io(settings, store, lambda: store.delete(failed), f"cleaning {failed}")
    counts = meta["counts"]
    job.logger.info(
        "%s: %d patches featured of %d tissue cells (%s) into %s", slide_id, counts["kept"], counts["tissue_cells"],
        counts_text(counts["rejected"]) or "none rejected", key,
    )  # fmt: skip
    columns = {"tissue_cells": counts["tissue_cells"], "rejected": counts_text(counts["rejected"])}
    return UnitOutcome(slide_id, "ok", counts["kept"], seconds, None, random_weights, columns)


def _feature(
    ref: SlideRef, job: FeatureJob, source: SourceIdentity | None, inputs: dict[str, Any]
) -> tuple[FeatureTable, dict[str, Any]]:
    """The slide's features and their metadata: every tissue cell at the features scale through the encoder."""
    settings = job.settings
    check_download(ref, settings)
    with open_slide(ref.uri, storage_opts=storage_options(ref.uri, settings.s3)) as reader:
        resolve_mpp(ref, reader, settings)
        cells = _tissue_cells(ref, reader, job)
        features, kept, counts = encode_cells(reader, cells, job)
        read_level = reader.best_level(settings.features.target_mpp)
    if not kept:
        raise SlideError(
            f"no patch passed the quality filters ({counts['read']} read; rejected: {counts['rejected']}); check the "
            "slide or relax quality.max_background_fraction, quality.min_sharpness or quality.max_pen_fraction"
        )
    table = FeatureTable(ref.slide_id, features, [c.box for c in kept], [c.tissue_fraction for c in kept])
    where = {"patch_size_level0": int(cells[0].w0), "read_level": int(read_level)}
    return table, _features_meta(ref, job, reader.info, where, source, inputs, counts)


def _tissue_cells(ref: SlideRef, reader: SlideReader, job: FeatureJob) -> list[GridCell]:
    """The grid's cells on tissue at the features scale; a SlideError when none reaches the threshold, a warning
    when the patches are finer than the scan."""
    settings, info = job.settings, reader.info
    mpp, side = settings.features.target_mpp, job.encoder.image_size
    overview, downsample = reader.overview(settings.tissue.mask_downsample)
    mask = tissue_mask(overview, downsample, info.mpp, settings.tissue)
    cells = grid_cells(
        mask, downsample, (info.width, info.height), info.level0_px(side * mpp), settings.tissue.threshold
    )
    if not cells:
        raise SlideError(
            f"no {side} px patch at {mpp} µm/px reaches the tissue threshold {settings.tissue.threshold}; the "
            "tissue is smaller than one patch: lower tissue.threshold or features.target_mpp"
        )
    if info.upsampled_at(mpp):
        job.logger.warning(
            "%s: patches at %.3g µm/px are finer than the scan (%.3g µm/px): they are upsampled",
            ref.slide_id, mpp, info.mpp,
        )  # fmt: skip
    return cells


def _features_meta(
    ref: SlideRef,
    job: FeatureJob,
    info: SlideInfo,
    where: dict[str, int],
    source: SourceIdentity | None,
    inputs: dict[str, Any],
    counts: dict[str, Any],
) -> dict[str, Any]:
    """The features file's metadata: the encoder, the scale, the slide (``info``, the reader's), where the patches
    were read (``where``: their level-0 size and read level), the source and inputs, the counts."""
    encoder = job.encoder
    return {
        "encoder": encoder.identity,
        "mpp": job.settings.features.target_mpp,
        "patch_px": encoder.image_size,
        "patch_size_level0": where["patch_size_level0"],
        "slide_mpp": float(info.mpp),
        "mpp_source": info.extra.get("mpp_source", "metadata"),
        "width": int(info.width),
        "height": int(info.height),
        "read_level": where["read_level"],
        "source_uri": without_userinfo(ref.uri),
        "source": source.model_dump(mode="json") if source is not None else None,
        "slide_inputs": inputs,
        "random_weights": bool(encoder.identity["random_weights"]),
        "l2_normalised": L2_NORMALISED,
        "counts": counts,
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def read_batches(reader: SlideReader, cells: list[GridCell], job: FeatureJob) -> Iterator[Batch]:
    """Read every cell at the features scale, score it, and preprocess the survivors into batches of
    ``features.batch_size`` model inputs (raster order: each tile decodes once)."""
    import torch

    settings, model = job.settings, job.encoder.model
    size, side = settings.features.batch_size, job.encoder.image_size
    boxes = [c.box for c in cells]
    pixels = reader.read_boxes(boxes, settings.features.target_mpp, side, settings.extract.read_ahead)
    kept: list[GridCell] = []
    tensors: list[Any] = []
    rejected: Counter[str] = Counter()
    read = 0
    for cell, rgb in zip(cells, pixels, strict=True):
        read += 1
        reason = rejection_reason(score_patch(rgb, settings.quality.analysis_px), settings.quality)
        if reason:
            rejected[reason] += 1
        else:
            kept.append(cell)
            tensors.append(model.prepare(rgb))
        if len(tensors) == size:
            yield Batch(kept, torch.stack(tensors), read, rejected)
            kept, tensors, rejected, read = [], [], Counter(), 0
    if read:
        yield Batch(kept, torch.stack(tensors) if tensors else None, read, rejected)


def encode_batch(encoder: FeatureEncoder, inputs: Any) -> np.ndarray:
    """The encoder's raw ``encode_image`` output for a batch of model inputs, float32 (not normalised)."""
    import torch

    model = encoder.model
    with torch.inference_mode():
        return model.model.encode_image(inputs.to(model.device)).float().cpu().numpy()


def encode_cells(
    reader: SlideReader, cells: list[GridCell], job: FeatureJob
) -> tuple[np.ndarray, list[GridCell], dict[str, Any]]:
    """Features of the cells that pass the quality filters, those cells, and the counts (read, rejected by reason,
    kept, tissue cells). Batches are read ahead in a background thread while the encoder runs here."""
    chunks: list[np.ndarray] = []
    kept: list[GridCell] = []
    rejected: Counter[str] = Counter()
    read = 0
    for batch in prefetched(read_batches(reader, cells, job), job.settings.features.prefetch_batches):
        read += batch.read
        rejected.update(batch.rejected)
        if batch.inputs is not None:
            chunks.append(encode_batch(job.encoder, batch.inputs))
            kept.extend(batch.cells)
    dim = int(job.encoder.identity["dim"])
    features = np.concatenate(chunks) if chunks else np.zeros((0, dim), np.float32)
    counts = {"tissue_cells": len(cells), "read": read, "rejected": dict(rejected), "kept": len(kept)}
    return features, kept, counts


_END = object()


def prefetched(items: Iterator[T], depth: int) -> Iterator[T]:
    """``items``, produced by one background thread at most ``depth`` ahead of the consumer. The producer's error
    is raised here; when the consumer stops early the producer stops too (and closes ``items``)."""
    ahead: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def put(entry: tuple[Any, BaseException | None]) -> bool:
        while not stop.is_set():
            try:
                ahead.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
            put((_END, None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            put((_END, exc))
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=produce, name="pathgen-features-read", daemon=True)
    thread.start()
    try:
        while True:
            item, error = ahead.get()
            if item is _END:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        stop.set()
        thread.join()


def feature_slides(
    units: list[SlideRef],
    settings: Settings,
    encoder: str,
    identity: dict[str, Any],
    features_hash: str,
    logger: logging.Logger | None = None,
) -> list[UnitOutcome]:
    """A group of slides in one worker: one encoder (loaded once per process) and one store client. When the encoder
    cannot be loaded, or a slide's storage fails through every retry, the task raises PendingWork (Prefect retries
    it; committed slides are then skipped)."""
    logger = logger or log
    store = Store(settings.store, settings.s3)
    try:
        loaded = load_encoder(encoder, identity, settings.features.device, logger)
    except InfrastructureError as exc:
        logger.warning("%d slides stay pending: %s", len(units), exc)
        raise PendingWork(str(exc), [UnitOutcome(ref.slide_id, "pending", error=str(exc)) for ref in units]) from exc
    job = FeatureJob(settings, store, loaded, features_hash, logger)
    return pending_raises([feature_slide(ref, job) for ref in units])


@task(name="feature-slides", retry_condition_fn=retry_infrastructure, tags=["features", "gpu"])
def feature_slides_task(
    units: list[SlideRef], settings: Settings, encoder: str, identity: dict[str, Any], features_hash: str
) -> list[UnitOutcome]:
    worker_process_setup()  # in a pool worker: die with the main process, bounded threads; no-op in the main
    return feature_slides(units, settings, encoder, identity, features_hash, get_run_logger())
