"""A slide's extraction hash: everything that changes the patches this slide yields, and nothing else.

It covers the settings that apply to this slide (its own MPP override and TCGA project, never another slide's; the
project as resolved from the settings, the source's GDC metadata or the slide's barcode: :func:`slide_project`),
and the contents of the files the settings name, as this slide uses them: the attribute prompts of its project,
its own findings sentences and the embedding checkpoint (sha256), and the identity of the slide's own bytes
(:func:`tasks.slides.sources.source_identity`: the manifest's md5, else size and modification time of a file or the
ETag and version id of an object), so that a changed slide at the same path is extracted again; a slide whose pixels
are not square (read per axis) adds a key once its MPP is known (:func:`non_square_pixels`). `slide.json` records
it; a re-run re-extracts exactly the slides whose hash changed.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from pathlib import Path
from typing import Any

from pathgen.digest import path_digest
from pathgen.settings import Settings
from tasks.clip.spec import quick_gelu_name
from tasks.selection.retrieval import prompts_for
from tasks.slides.projects import resolve_project
from tasks.slides.readers import Resolution
from tasks.slides.record import SourceIdentity
from tasks.slides.sources import SlideRef


def slide_project(ref: SlideRef, settings: Settings) -> str | None:
    """The slide's TCGA project: the settings, else the source's GDC metadata, else its barcode's tissue source
    site (:func:`tasks.slides.projects.resolve_project`); every caller resolves it here, so the hash follows."""
    return resolve_project(ref, settings).project


def mpp_override(ref: SlideRef, settings: Settings) -> float | None:
    """The override that names this slide, by slide id or by file name."""
    overrides = settings.slides.mpp_overrides
    for key in (ref.slide_id, posixpath.basename(str(ref.uri))):
        if key in overrides:
            return float(overrides[key])
    return None


def _embedding_identity(settings: Settings) -> dict[str, Any]:
    cfg = settings.embedding
    # The model built: a QuickGELU-trained tag builds the name's -quickgelu twin (tasks.clip.spec.quick_gelu_name)
    model = quick_gelu_name(cfg.model, cfg.pretrained) if cfg.model else cfg.model
    identity: dict[str, Any] = {"model": model, "pretrained": cfg.pretrained}
    if cfg.pretrained and Path(cfg.pretrained).exists():
        identity["pretrained"] = {"file": Path(cfg.pretrained).name, "sha256": path_digest(cfg.pretrained)}
    return identity


def _patch_inputs(ref: SlideRef, settings: Settings) -> dict[str, Any]:
    """The patch settings that change this slide's patches. Grid slides: all but the ``positions_*`` ones (so
    adding such a setting leaves their hashes as they were). Positions: all but ``target_mpp``, which never applies
    to their level-0 boxes, and ``patch_px``, which applies only when the boxes are resampled."""
    patch = settings.patch.model_dump()
    if ref.positions is None:
        return {k: v for k, v in patch.items() if not k.startswith("positions_")}
    resample = settings.patch.positions_resample
    inputs = {k: v for k, v in patch.items() if k not in ("target_mpp", "patch_px")}
    inputs["positions_resample"] = resample  # also before the setting exists (then always False)
    inputs["scale"] = "level-0 box"  # boxes read as the paper's level-0 boxes (before: patch_px at target_mpp)
    if resample:
        inputs["patch_px"] = patch["patch_px"]
    return inputs


def _selection_inputs(ref: SlideRef, settings: Settings) -> dict[str, Any]:
    if ref.positions is not None:  # the exact boxes of a PathGen JSON source: no selection at all
        return {
            "method": "positions",
            "box_px": settings.patch.positions_box_px,
            "positions": hashlib.sha256(json.dumps(ref.positions).encode()).hexdigest(),
        }
    selection = settings.selection.model_dump(exclude={"prompts_file", "findings_file"})
    if settings.selection.method == "representative":
        cfg = settings.selection
        prompts = prompts_for(ref.slide_id, slide_project(ref, settings), cfg.prompts_file, cfg.findings_file, False)
        selection["attribute_prompts"] = hashlib.sha256("\n".join(prompts.attributes).encode()).hexdigest()
        selection["findings"] = hashlib.sha256("\n".join(prompts.findings).encode()).hexdigest()
        selection["embedding"] = _embedding_identity(settings)
    return selection


def non_square_pixels(mpp_x: float | None, mpp_y: float | None) -> bool:
    """Whether a slide's pixels are not square: its grid and its patches are then read with each axis at its own
    MPP, not both at their mean as before the axes were kept apart (any difference moves them, so no tolerance)."""
    return mpp_x is not None and mpp_y is not None and mpp_x != mpp_y


def slide_extraction_hash(
    ref: SlideRef, settings: Settings, source: SourceIdentity | None = None, pixel_mpp: Resolution | None = None
) -> str:
    """12 hex digits of sha256 over this slide's extraction inputs (not where they are stored). ``source`` is the
    slide's identity (:func:`tasks.slides.sources.source_identity`, looked up by the caller under its I/O retries);
    None for a slide that could not be examined. ``pixel_mpp`` is the slide's (x, y) MPP once known (its record,
    or the opened slide): non-square pixels add a key, so their earlier mean-MPP extractions are not current, and
    every other slide keeps the hash it had (the caller before opening the slide passes None)."""
    inputs = {"source": source.key if source is not None else None, **_settings_inputs(ref, settings)}
    if isinstance(pixel_mpp, tuple) and non_square_pixels(*pixel_mpp):
        inputs["pixels"] = "per-axis MPP"
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:12]


def legacy_extraction_hash(ref: SlideRef, settings: Settings) -> str:
    """The hash of a slide extracted before source identities were recorded (settings only): such a slide is kept
    while its source is provably unchanged since (``tasks.slides.extract``), and extracted again otherwise."""
    return hashlib.sha256(json.dumps(_settings_inputs(ref, settings), sort_keys=True).encode()).hexdigest()[:12]


def _settings_inputs(ref: SlideRef, settings: Settings) -> dict[str, Any]:
    return {
        "patch": _patch_inputs(ref, settings),
        "tissue": settings.tissue.model_dump(),
        "quality": settings.quality.model_dump(),
        "selection": _selection_inputs(ref, settings),
        "mpp_override": mpp_override(ref, settings),
        "default_mpp": settings.slides.default_mpp,
        "project": slide_project(ref, settings),
    }
