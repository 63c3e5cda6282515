"""Reading a slide's candidate cells into patch records, one selection method at a time.

``write_planned`` serves ``all``, ``random`` and the exact positions of a PathGen JSON source in one pass: read,
score, encode, write. ``write_representative`` reads every candidate, scores it and embeds it (a batch at a time),
chooses on the embeddings alone, then writes the chosen patches: re-read and encoded when the slide is large, or
taken from JPEGs encoded during the first pass when there are few candidates per kept patch. Memory never holds
more than a batch of pixels, nor more than a few times ``max_per_slide`` JPEGs.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import imagecodecs
import numpy as np

from pathgen.settings import SelectionSettings, Settings
from tasks.selection.embedding import EmbeddingModel, PatchEmbedder, load_embedding_model
from tasks.selection.plan import SelectionPlan
from tasks.selection.representative import Selection, select_representative
from tasks.selection.retrieval import SlidePrompts, prompts_for, retrieval_scores
from tasks.slides.projects import ResolvedProject, resolve_project
from tasks.slides.quality import QualityScores, rejection_reason, score_patch
from tasks.slides.readers import Resolution, SlideInfo, SlideReader
from tasks.slides.shard import PatchRecord, PatchShardWriter, patch_id_for
from tasks.slides.sources import SlideRef
from tasks.slides.tissue import GridCell

RASTER_BATCH = 512
REREAD_FACTOR = 3  # up to this many candidates per kept patch, encode all candidates rather than re-read


@dataclass(frozen=True)
class KeptPatch:
    box: tuple[int, int, int, int]
    selected_by: tuple[str, ...]
    cluster: int | None = None


@dataclass
class PassResult:
    kept: list[KeptPatch]
    counts: dict[str, Any]
    selection: dict[str, Any] = field(default_factory=dict)
    random_weights: bool = False


def patch_scale(ref: SlideRef, settings: Settings, slide_mpp: float) -> tuple[float, int]:
    """The (µm/px, side in px) of this slide's saved patches.

    Grid slides: ``patch.target_mpp`` and ``patch.patch_px``. The positions of a PathGen JSON source are level-0
    boxes of ``patch.positions_box_px`` whatever the scanner: by default they are saved exactly as those level-0
    pixels (the slide's own MPP, ``positions_box_px`` wide); with ``patch.positions_resample`` the same box is
    resampled to ``patch.patch_px``, at ``slide_mpp * positions_box_px / patch_px`` µm/px.
    """
    patch = settings.patch
    if ref.positions is None:
        return patch.target_mpp, patch.patch_px
    box = patch.positions_box_px
    if settings.patch.positions_resample:
        return slide_mpp * box / patch.patch_px, patch.patch_px
    return slide_mpp, box


def read_resolution(ref: SlideRef, settings: Settings, info: SlideInfo, mpp: float, patch_px: int) -> Resolution:
    """The (x, y) µm/px a slide's patches are read at. A grid patch is square in microns (``mpp`` on both axes); a
    PathGen JSON position is a square level-0 box, so on a slide with non-square pixels each axis keeps its own
    scale and the read shows exactly the box (``mpp``, their mean, is what the records carry)."""
    if ref.positions is None:
        return mpp
    factor = settings.patch.positions_box_px / patch_px
    return (info.mpp_x * factor, info.mpp_y * factor)


@dataclass
class SlidePass:
    """What every pass needs about one slide: where to read, how to score, how to make a record."""

    ref: SlideRef
    settings: Settings
    reader: SlideReader
    logger: logging.Logger

    def __post_init__(self) -> None:
        # once, not per patch: the scale of every patch of this slide and the level it is read from
        self.mpp, self.patch_px = patch_scale(self.ref, self.settings, float(self.reader.info.mpp))
        self.read_mpp = read_resolution(self.ref, self.settings, self.reader.info, self.mpp, self.patch_px)
        self.read_level = self.reader.best_level(self.read_mpp)
        # the project its prompts and its hash use (tasks.slides.hashing.slide_project), recorded on every patch
        self.project: ResolvedProject = resolve_project(self.ref, self.settings)
        if self.project.source == "barcode":
            self.logger.info("%s: project %s from its barcode (%s)", self.ref.slide_id, self.project.project,
                             self.project.note)  # fmt: skip
        elif self.project.source == "none":
            self.logger.info("%s: no project from its barcode: %s", self.ref.slide_id, self.project.note)

    def read(self, cells: list[GridCell]) -> Iterator[tuple[GridCell, np.ndarray]]:
        boxes = [c.box for c in cells]
        # patch_px at mpp spans patch_px * mpp / slide_mpp level-0 px from the box's corner: the grid cell's side,
        # and for positions exactly the box side, so every patch shows its recorded box and nothing else.
        pixels = self.reader.read_boxes(boxes, self.read_mpp, self.patch_px, self.settings.extract.read_ahead)
        yield from zip(cells, pixels, strict=True)

    def score(self, rgb: np.ndarray) -> tuple[QualityScores, str | None]:
        scores = score_patch(rgb, self.settings.quality.analysis_px)
        return scores, rejection_reason(scores, self.settings.quality)

    def encode(self, rgb: np.ndarray) -> bytes:
        return imagecodecs.jpeg8_encode(rgb, level=self.settings.patch.jpeg_quality)

    def record(
        self, cell: GridCell, scores: QualityScores, pixels: np.ndarray | bytes, selected_by: list[str], **extra
    ) -> PatchRecord:
        """A patch record; ``pixels`` is the RGB patch, or its JPEG when it was encoded already."""
        return PatchRecord(
            patch_id=patch_id_for(self.ref.slide_id, cell.box, self.mpp, self.patch_px),
            slide_id=self.ref.slide_id,
            source_uri=self.ref.uri,
            project=self.project.project,
            file_id=self.ref.file_id,
            x=cell.x,
            y=cell.y,
            w0=cell.w0,
            h0=cell.h0,
            level=self.read_level,
            mpp=self.mpp,
            slide_mpp=float(self.reader.info.mpp),
            patch_px=self.patch_px,
            tissue_fraction=cell.tissue_fraction,
            background_fraction=scores.background_fraction,
            sharpness=scores.sharpness,
            pen_fraction=scores.pen_fraction,
            image=pixels if isinstance(pixels, bytes) else self.encode(pixels),
            selected_by=selected_by,
            **extra,
        )


def write_planned(slide: SlidePass, plan: SelectionPlan, writer: PatchShardWriter) -> PassResult:
    """One pass for ``all``, ``random`` and exact positions: read, score, encode and write as cells come."""
    positional = plan.name == "positions"
    caption_at = dict(zip(slide.ref.positions or [], slide.ref.captions or [], strict=False))
    rejected: Counter[str] = Counter()
    kept: list[KeptPatch] = []
    read = 0
    for batch in plan.batches:
        if plan.cap is not None and len(kept) >= plan.cap:
            break
        survivors: list[tuple[int, PatchRecord]] = []
        ranks = dict(zip(batch.cells, batch.ranks, strict=True))
        for cell, rgb in slide.read(batch.cells):
            read += 1
            scores, reason = slide.score(rgb)
            if reason and not positional:  # exact positions are kept whatever they show; scores are recorded
                rejected[reason] += 1
                continue
            record = slide.record(cell, scores, rgb, [plan.name], source_caption=caption_at.get((cell.x, cell.y)))
            if plan.cap is None:  # nothing can be cut: stream it, so the shard is written while the next cells read
                _keep(writer, kept, [record], plan.name)
            else:
                survivors.append((ranks[cell], record))
        if plan.cap is not None:  # only the last batch can overshoot: drop its worst-ranked survivors
            survivors = sorted(survivors, key=lambda s: s[0])[: plan.cap - len(kept)]
            survivors.sort(key=lambda s: (s[1].y, s[1].x))
            _keep(writer, kept, [r for _, r in survivors], plan.name)
    return PassResult(kept, {"read": read, "rejected": dict(rejected), "kept": len(kept)})


def _keep(writer: PatchShardWriter, kept: list[KeptPatch], records: list[PatchRecord], method: str) -> None:
    writer.add(records)
    kept.extend(KeptPatch((r.x, r.y, r.w0, r.h0), (method,)) for r in records)


@lru_cache(maxsize=64)
def _text_embeddings(model: EmbeddingModel, texts: tuple[str, ...]) -> np.ndarray:
    return model.embed_texts(list(texts))


@dataclass
class _Candidates:
    """The cells that passed the quality checks, their embeddings, and their JPEGs when encoded in the first pass."""

    cells: list[tuple[GridCell, QualityScores]]
    embeddings: np.ndarray
    jpegs: list[bytes]
    rejected: Counter[str]


def write_representative(slide: SlidePass, cells: list[GridCell], writer: PatchShardWriter) -> PassResult:
    """Embed the slide's candidates, choose the representative ones (clusters, retrieval, near-duplicate filter) and
    write them; the result says how they were chosen."""
    cfg = slide.settings.selection
    model = load_embedding_model(slide.settings.embedding, slide.logger)
    threshold = _duplicate_threshold(slide, model)
    # Choosing needs every candidate's embedding, so the chosen patches are either encoded now, while their pixels
    # are at hand, or read again afterwards. Encoding costs ~1 ms a patch and re-reading ~3 ms (its tiles decode
    # again), so a slide with few candidates per kept patch (biopsies) encodes all of them now; a large one
    # re-reads only what is kept.
    encode_now = len(cells) <= REREAD_FACTOR * cfg.max_per_slide
    embedder = PatchEmbedder(model, slide.settings.embedding.batch_size, slide.logger)
    found = _embed_candidates(slide, cells, embedder, encode_now)
    prompts = prompts_for(slide.ref.slide_id, slide.project.project, cfg.prompts_file, cfg.findings_file, slide.logger)
    attributes, findings = retrieval_scores(
        found.embeddings, _text_embeddings(model, prompts.attributes), _text_embeddings(model, prompts.findings)
    )
    chosen = _choose(found, attributes, findings, cfg, threshold)
    kept = _write_chosen(slide, found, chosen, attributes, findings, writer, encode_now)
    counts = {
        "read": len(cells) + (0 if encode_now else len(chosen.indices)),
        "candidates": len(found.cells),
        "rejected": dict(found.rejected),
        "kept": len(kept),
    }
    selection = _selection_record(slide, model, found, chosen, prompts, threshold)
    return PassResult(kept, counts, selection, model.random_weights)


def _choose(
    found: _Candidates,
    attributes: np.ndarray,
    findings: np.ndarray | None,
    cfg: SelectionSettings,
    threshold: float | None,
) -> Selection:
    """The representative picks among the embedded candidates, with ``selection``'s settings."""
    return select_representative(
        found.embeddings,
        attributes,
        findings,
        max_per_slide=cfg.max_per_slide,
        top_k=cfg.retrieval_top_k,
        duplicate_threshold=threshold,
        seed=cfg.seed,
        clusters=cfg.clusters,
        cluster_rule_factor=cfg.cluster_rule_factor,
    )


def _selection_record(
    slide: SlidePass,
    model: EmbeddingModel,
    found: _Candidates,
    chosen: Selection,
    prompts: SlidePrompts,
    threshold: float | None,
) -> dict[str, Any]:
    """How the slide's patches were chosen, for its ``slide.json``."""
    cfg = slide.settings.selection
    return {
        "method": "representative",
        "candidates": len(found.cells),
        "k": chosen.k,
        "K": cfg.retrieval_top_k,
        "max_per_slide": cfg.max_per_slide,
        "duplicate_threshold": cfg.duplicate_threshold,
        "duplicate_filter": "applied" if threshold is not None else "skipped: random-weight embeddings",
        "dropped_duplicates": chosen.dropped_duplicates,
        "seed": cfg.seed,
        "picks": chosen.picks,
        "prompts": {
            "project": prompts.project,
            "project_from": slide.project.source,
            "attributes": len(prompts.attributes),
            "findings": len(prompts.findings),
        },
        "embedding": model.describe(),
    }


def _duplicate_threshold(slide: SlidePass, model: EmbeddingModel) -> float | None:
    """``selection.duplicate_threshold``, or None (no near-duplicate filter) for random-weight embeddings: those of
    H&E patches are nearly collinear (cosine ~0.97 for unrelated tissue), so a similarity filter on them would
    discard almost everything for no reason. It is skipped, and said so."""
    if not model.random_weights:
        return slide.settings.selection.duplicate_threshold
    slide.logger.warning(
        "%s: selection uses random-weight embeddings (tiny-random): clusters and retrieval picks are noise, "
        "and the near-duplicate filter is skipped",
        slide.ref.slide_id,
    )
    return None


def _embed_candidates(slide: SlidePass, cells: list[GridCell], embedder: PatchEmbedder, encode: bool) -> _Candidates:
    """Every cell read and scored; those that pass embedded (and encoded, with ``encode``), a batch at a time."""
    found = _Candidates([], np.empty(0), [], Counter())
    for start in range(0, len(cells), RASTER_BATCH):
        for cell, rgb in slide.read(cells[start : start + RASTER_BATCH]):
            scores, reason = slide.score(rgb)
            if reason:
                found.rejected[reason] += 1
                continue
            found.cells.append((cell, scores))
            embedder.add(rgb)
            if encode:
                found.jpegs.append(slide.encode(rgb))
    found.embeddings = embedder.finish()
    return found


def _write_chosen(
    slide: SlidePass,
    found: _Candidates,
    chosen: Selection,
    attributes: np.ndarray,
    findings: np.ndarray | None,
    writer: PatchShardWriter,
    encoded: bool,
) -> list[KeptPatch]:
    """The chosen candidates' records, in raster order (each tile decoded once when they are read again)."""
    order = sorted(chosen.indices, key=lambda i: (found.cells[i][0].y, found.cells[i][0].x))
    by_cell = {found.cells[i][0]: i for i in order}
    kept: list[KeptPatch] = []
    for start in range(0, len(order), RASTER_BATCH):
        batch = [found.cells[i][0] for i in order[start : start + RASTER_BATCH]]
        pixels = ((cell, found.jpegs[by_cell[cell]]) for cell in batch) if encoded else slide.read(batch)
        records = []
        for cell, image in pixels:
            i = by_cell[cell]
            records.append(
                slide.record(
                    cell,
                    found.cells[i][1],
                    image,
                    chosen.reasons[i],
                    cluster=int(chosen.labels[i]),
                    attribute_score=float(attributes[i]),
                    findings_score=None if findings is None else float(findings[i]),
                    embedding=found.embeddings[i].tolist(),
                )
            )
            kept.append(KeptPatch(cell.box, tuple(chosen.reasons[i]), int(chosen.labels[i])))
        writer.add(records)
    return kept
