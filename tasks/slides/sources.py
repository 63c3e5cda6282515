"""Turn source specs into slide references.

A spec is one of: a local slide file, a local folder (searched recursively), a glob, an ``s3://`` object or prefix,
a GDC manifest (the TSV the GDC portal exports: id, filename, md5, size, state) or a PathGen-1.6M JSON file
(``wsi_id``, ``position``, ``caption``, ``file_id``), whose exact patches are then re-extracted. A spec that
names nothing readable still yields a reference, so that it is recorded as a failed slide with its reason.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import posixpath
from dataclasses import dataclass, field

import fsspec

from pathgen.settings import Settings
from tasks.store.objects import is_remote, local_path, storage_options, url_to_fs

SLIDE_EXTENSIONS = (".svs", ".ndpi", ".tif", ".tiff", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide")
GDC_COLUMNS = ("id", "filename", "md5", "size", "state")


class SourceError(ValueError):
    """A source spec that cannot be read at all (a malformed manifest, for example)."""


@dataclass
class SlideRef:
    slide_id: str
    uri: str
    origin: str
    project: str | None = None
    file_id: str | None = None
    md5: str | None = None
    size: int | None = None
    # Level-0 top-left corners named by a PathGen JSON source, with the captions released for them.
    positions: list[tuple[int, int]] | None = None
    captions: list[str] | None = None
    missing_reason: str | None = field(default=None)


def slide_id_for(path: str) -> str:
    name = posixpath.basename(str(path).rstrip("/"))
    for ext in SLIDE_EXTENSIONS:
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return name


def is_slide_name(path: str) -> bool:
    return str(path).lower().endswith(SLIDE_EXTENSIONS)


def resolve_sources(specs: list[str], settings: Settings) -> list[SlideRef]:
    """Every slide the specs name, in a stable order, without duplicates (first mention wins)."""
    refs: list[SlideRef] = []
    seen: set[str] = set()
    for spec in specs:
        for ref in _resolve_one(str(spec), settings):
            if ref.slide_id in seen:
                continue
            seen.add(ref.slide_id)
            refs.append(ref)
    return refs


def _resolve_one(spec: str, settings: Settings) -> list[SlideRef]:
    lower = spec.lower()
    if lower.endswith(".json"):
        return _pathgen_json(spec, settings)
    if lower.endswith((".tsv", ".txt")) or "manifest" in posixpath.basename(lower):
        return _gdc_manifest(spec, settings)
    if is_remote(spec):
        return _remote(spec, settings)
    if any(ch in spec for ch in "*?["):
        matches = sorted(p for p in glob.glob(os.path.expanduser(spec), recursive=True) if is_slide_name(p))
        return [SlideRef(slide_id_for(p), os.path.abspath(p), origin=spec) for p in matches]
    path = local_path(spec)
    if os.path.isdir(path):
        found = []
        for dirpath, _dirs, files in os.walk(path):
            found.extend(os.path.join(dirpath, f) for f in files if is_slide_name(f))
        return [SlideRef(slide_id_for(p), p, origin=spec) for p in sorted(found)]
    # A file, or a path that does not exist: the reader reports which, per slide.
    return [SlideRef(slide_id_for(path), path, origin=spec)]


def _remote(spec: str, settings: Settings) -> list[SlideRef]:
    if is_slide_name(spec):
        return [SlideRef(slide_id_for(spec), spec, origin=spec)]
    fs, root = url_to_fs(spec, settings.s3)
    protocol = spec.split("://", 1)[0]
    paths = sorted(p for p in fs.find(root) if is_slide_name(p))
    return [SlideRef(slide_id_for(p), f"{protocol}://{p}", origin=spec) for p in paths]


def _read_text(spec: str, settings: Settings) -> str:
    if is_remote(spec):
        with fsspec.open(spec, "rt", **storage_options(spec, settings.s3)) as handle:
            return handle.read()
    path = local_path(spec)
    if not os.path.isfile(path):
        raise SourceError(f"source file {spec} does not exist; check the path")
    with open(path, encoding="utf-8") as handle:
        return handle.read()


def _roots(spec: str, settings: Settings) -> list[str]:
    roots = list(settings.slides.roots)
    parent = posixpath.dirname(spec) if is_remote(spec) else os.path.dirname(local_path(spec))
    return roots or [parent]


def _find_slide(roots: list[str], file_id: str | None, filename: str, settings: Settings) -> str | None:
    """Look for ``<root>/<file_id>/<filename>`` (gdc-client's layout) and ``<root>/<filename>``."""
    names = [filename] if is_slide_name(filename) else [filename + ext for ext in SLIDE_EXTENSIONS]
    for root in roots:
        for name in names:
            candidates = [posixpath.join(root, file_id, name)] if file_id else []
            candidates.append(posixpath.join(root, name))
            for candidate in candidates:
                if is_remote(candidate):
                    fs, path = url_to_fs(candidate, settings.s3)
                    if fs.exists(path):
                        return candidate
                elif os.path.isfile(local_path(candidate)):
                    return local_path(candidate)
    return None


def _gdc_manifest(spec: str, settings: Settings) -> list[SlideRef]:
    text = _read_text(spec, settings)
    rows = list(csv.DictReader(text.splitlines(), delimiter="\t"))
    if not rows or not set(GDC_COLUMNS[:2]).issubset(rows[0].keys()):
        raise SourceError(
            f"{spec} is not a GDC manifest: it needs tab-separated columns {', '.join(GDC_COLUMNS)} "
            "(export it from the GDC portal's cart)"
        )
    roots = _roots(spec, settings)
    refs = []
    for row in rows:
        filename = (row.get("filename") or "").strip()
        if not is_slide_name(filename):
            continue
        file_id = (row.get("id") or "").strip() or None
        found = _find_slide(roots, file_id, filename, settings)
        ref = SlideRef(
            slide_id=slide_id_for(filename),
            uri=found or posixpath.join(roots[0], file_id or "", filename),
            origin=spec,
            project=(row.get("project_id") or row.get("project") or None),
            file_id=file_id,
            md5=(row.get("md5") or None),
            size=int(row["size"]) if (row.get("size") or "").isdigit() else None,
        )
        if not found:
            ref.missing_reason = _missing(filename, file_id, roots, spec)
        refs.append(ref)
    return refs


def _pathgen_json(spec: str, settings: Settings) -> list[SlideRef]:
    try:
        records = json.loads(_read_text(spec, settings))
    except json.JSONDecodeError as exc:
        raise SourceError(f"{spec} is not valid JSON ({exc}); expected a PathGen-1.6M list of records") from None
    if not isinstance(records, list) or (records and not {"wsi_id", "position"} <= set(records[0])):
        raise SourceError(f"{spec} is not a PathGen-1.6M file: expected a list of {{wsi_id, position, caption}}")
    by_slide: dict[str, SlideRef] = {}
    roots = _roots(spec, settings)
    for record in records:
        wsi_id = str(record["wsi_id"])
        ref = by_slide.get(wsi_id)
        if ref is None:
            file_id = record.get("file_id")
            found = _find_slide(roots, file_id, wsi_id, settings)
            ref = by_slide[wsi_id] = SlideRef(
                slide_id=slide_id_for(wsi_id),
                uri=found or posixpath.join(roots[0], wsi_id + ".svs"),
                origin=spec,
                file_id=file_id,
                positions=[],
                captions=[],
            )
            if not found:
                ref.missing_reason = _missing(wsi_id, file_id, roots, spec)
        x, y = (int(float(v)) for v in record["position"])
        ref.positions.append((x, y))
        ref.captions.append(str(record.get("caption") or ""))
    return list(by_slide.values())


def _missing(name: str, file_id: str | None, roots: list[str], spec: str) -> str:
    hint = f" (gdc-client download {file_id})" if file_id else ""
    return (
        f"slide {name} named by {posixpath.basename(spec)} was not found under {', '.join(roots)}; "
        f"download it{hint} and point slides.roots at the folder that holds it"
    )
