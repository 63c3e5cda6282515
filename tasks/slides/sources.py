"""Turn source specs into slide references.

A spec is one of: a local slide file, a local folder (searched recursively), a glob, an ``s3://`` object or prefix,
a GDC manifest (the TSV the GDC portal exports: id, filename, md5, size, state; a ``project_id`` column, where a
table has one, gives each slide's project), a GDC sample sheet (the portal's other cart export,
``gdc_sample_sheet.<date>.tsv``: "File ID", "File Name", ..., "Project ID", ...; its project is the slide's) or a
PathGen-1.6M JSON file (``wsi_id``, ``position``, ``caption``, ``file_id``), whose exact patches are then
re-extracted. A spec that names nothing readable still yields a reference, so that it is recorded as a failed slide
with its reason. A slide no source names a project for may still get one from its barcode (tasks.slides.projects).

Slide ids are the file name without its extension, made safe as a store key (``safe_slide_id``). Two different
slides of one folder, glob, prefix or manifest that share a name both get ``<name>-<6 hex>``, the hex from their path
relative to that source's root (``<id>/<filename>`` for a GDC manifest, gdc-client's layout), so that ids do not
depend on scan order and a folder in which nothing collides keeps the plain names. A later spec of the same run that
names a different slide under an id already taken gets ``<name>-<6 hex of its absolute path or URL>``. Names read
from a manifest or a PathGen JSON file are data: one that is absolute or climbs out of its root with ``..`` is not
looked for; it is recorded as a failed slide.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
import math
import os
import posixpath
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any

import fsspec

from pathgen.errors import cut, short_repr
from pathgen.settings import Settings
from tasks.slides.dicom import DICOM_SUFFIX
from tasks.slides.record import SourceIdentity
from tasks.store.objects import is_remote, local_path, storage_options, url_to_fs

SLIDE_EXTENSIONS = (
    ".svs", ".ndpi", ".tif", ".tiff", ".qptiff", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide", ".dcm",
)  # fmt: skip
GDC_COLUMNS = ("id", "filename", "md5", "size", "state")
# A GDC sample sheet's columns, as the manifest's names: the portal names them so in both exports' headers.
SAMPLE_SHEET_COLUMNS = {"File ID": "id", "File Name": "filename", "Project ID": "project_id"}


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


MAX_SLIDE_ID = 160  # a store key segment; with a ``-<6 hex>`` suffix still well under S3's and POSIX's limits
_UNSAFE = re.compile(r"[/\\]")


def _short_hash(text: str, digits: int = 6) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:digits]


def safe_slide_id(name: str) -> str:
    """``name`` as one store key segment: ``/``, ``\\`` and control characters become ``_``, leading dots become
    ``_`` (so never ``.``, ``..`` or a hidden name), empty becomes ``_``; a name longer than ``MAX_SLIDE_ID`` keeps
    its start and ends in 8 hex of the whole name. The same name always gives the same id."""
    text = "".join("_" if unicodedata.category(ch) in ("Cc", "Cf", "Cs") else ch for ch in str(name))
    text = _UNSAFE.sub("_", text)
    stripped = text.lstrip(".")
    text = "_" * (len(text) - len(stripped)) + stripped
    text = text or "_"
    if len(text) > MAX_SLIDE_ID:
        text = f"{text[: MAX_SLIDE_ID - 9]}-{_short_hash(str(name), 8)}"
    return text


def slide_id_problem(slide_id: str) -> str | None:
    """Why ``slide_id`` must not name store keys, or None when it is safe (what ``safe_slide_id`` makes)."""
    if not isinstance(slide_id, str) or not slide_id:
        return "it is empty"
    if slide_id.startswith("."):
        return "it starts with a dot"
    if _UNSAFE.search(slide_id):
        return "it holds a path separator"
    if any(unicodedata.category(ch) in ("Cc", "Cf", "Cs") for ch in slide_id):
        return "it holds control characters"
    if len(slide_id) > MAX_SLIDE_ID + 7:
        return f"it is longer than {MAX_SLIDE_ID + 7} characters"
    return None


def slide_id_for(path: str) -> str:
    name = posixpath.basename(str(path).replace("\\", "/").rstrip("/"))
    for ext in SLIDE_EXTENSIONS:
        if name.lower().endswith(ext):
            name = name[: -len(ext)]
            break
    return safe_slide_id(name)


def _distinct_ids(relatives: list[str]) -> list[str]:
    """Ids for the slides of one source, given each one's path relative to the source's root: the plain id, or
    ``<id>-<6 hex of the relative path>`` for every slide whose plain id another slide of the source shares."""
    plain = [slide_id_for(rel) for rel in relatives]
    counts: dict[str, int] = {}
    for sid in plain:
        counts[sid] = counts.get(sid, 0) + 1
    return [f"{sid}-{_short_hash(rel)}" if counts[sid] > 1 else sid for sid, rel in zip(plain, relatives, strict=True)]


def is_slide_name(path: str) -> bool:
    return str(path).lower().endswith(SLIDE_EXTENSIONS)


def resolve_sources(specs: list[str], settings: Settings) -> list[SlideRef]:
    """Every slide the specs name, in a stable order, each once (first mention wins), each under its own id."""
    refs: list[SlideRef] = []
    seen: set[tuple[str, str]] = set()
    owners: dict[str, tuple[str, str]] = {}  # slide id -> the slide that holds it
    for spec in specs:
        for ref in _resolve_one(str(spec), settings):
            identity = _identity(ref)
            if identity in seen:
                continue
            seen.add(identity)
            if ref.slide_id in owners:  # a different slide under a taken id: this one is told apart by its path
                ref.slide_id = f"{ref.slide_id}-{_short_hash(ref.uri)}"
                if ref.slide_id in owners:
                    ref.slide_id = f"{ref.slide_id}-{_short_hash(ref.uri + chr(0) + ref.origin)}"
            owners[ref.slide_id] = identity
            refs.append(ref)
    return refs


def _identity(ref: SlideRef) -> tuple[str, str]:
    """Which slide a reference reads: its real path or its URL; a slide that will not be read, by its id."""
    if ref.missing_reason:
        return ("unread", ref.slide_id)
    if is_remote(ref.uri):
        return ("url", ref.uri)
    return ("file", os.path.realpath(ref.uri))


_MD5 = re.compile(r"[0-9a-f]{32}")


def source_identity(ref: SlideRef, settings: Settings) -> SourceIdentity | None:
    """What the slide's bytes are now (see :class:`SourceIdentity`); None when there is nothing to examine (a slide
    that was not found: the reader reports it). Storage errors other than a missing file propagate."""
    if ref.missing_reason:
        return None
    md5 = (ref.md5 or "").strip().lower()
    if _MD5.fullmatch(md5):
        return SourceIdentity(kind="md5", md5=md5)
    try:
        if is_remote(ref.uri):
            return _object_identity(ref.uri, settings)
        path = local_path(ref.uri)
        if os.path.isdir(path):
            return _folder_identity(path)
        stat = os.stat(path)
        identity = SourceIdentity(kind="file", size=stat.st_size, mtime_ns=stat.st_mtime_ns, modified=stat.st_mtime)
        companion = os.path.splitext(path)[0]  # an MRXS keeps its pixels in a folder of the same name
        if path.lower().endswith(".mrxs") and os.path.isdir(companion):
            folder = _folder_identity(companion)
            identity = identity.model_copy(update={"files": folder.files, "stamp": folder.stamp})
        return identity
    except FileNotFoundError:
        return None


def _object_identity(uri: str, settings: Settings) -> SourceIdentity:
    fs, path = url_to_fs(uri, settings.s3)
    fs.invalidate_cache(path)  # a listing cached while resolving the sources may be older than the object
    info = fs.info(path)
    etag = info.get("ETag") or info.get("etag")
    modified = _seconds(info.get("LastModified") or info.get("mtime"))
    return SourceIdentity(
        kind="object",
        size=info.get("size"),
        etag=str(etag).strip('"') if etag else None,
        version_id=info.get("VersionId") or None,
        mtime_ns=None if etag or modified is None else int(modified * 1e9),
        modified=modified,
    )


def _seconds(value: Any) -> float | None:
    if value is None:
        return None
    if hasattr(value, "timestamp"):
        return float(value.timestamp())
    return float(value)


def _folder_identity(path: str) -> SourceIdentity:
    """A folder slide (a DICOM series) or an MRXS's data folder: every file's name, size and modification time."""
    digest = hashlib.sha256()
    count = 0
    for dirpath, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(dirpath, name)
            stat = os.stat(full)
            digest.update(f"{_relative(full, path)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
            count += 1
    return SourceIdentity(kind="folder", files=count, stamp=digest.hexdigest())


def _glob_root(pattern: str) -> str:
    """The folder a glob searches below: its leading components without wildcards."""
    parts = pattern.split(os.sep)
    fixed = []
    for part in parts:
        if any(ch in part for ch in "*?["):
            break
        fixed.append(part)
    return os.sep.join(fixed) or "."


def _resolve_one(spec: str, settings: Settings) -> list[SlideRef]:
    lower = spec.lower()
    if lower.endswith(".json"):
        return _pathgen_json(spec, settings)
    if lower.endswith((".tsv", ".txt")) or "manifest" in posixpath.basename(lower):
        return _gdc_manifest(spec, settings)
    if is_remote(spec):
        return _remote(spec, settings)
    if any(ch in spec for ch in "*?["):
        pattern = os.path.expanduser(spec)
        matches = sorted(os.path.abspath(p) for p in glob.glob(pattern, recursive=True) if is_slide_name(p))
        root = os.path.abspath(_glob_root(pattern))
        ids = _distinct_ids([_relative(p, root) for p in matches])
        return [SlideRef(sid, p, origin=spec) for sid, p in zip(ids, matches, strict=True)]
    path = local_path(spec)
    if os.path.isdir(path):
        found = _slides_in_folder(path)
        # A series folder given itself is named after the folder, not "."
        ids = _distinct_ids([_relative(p, path) if p != path else os.path.basename(path) for p in found])
        return [SlideRef(sid, p, origin=spec) for sid, p in zip(ids, found, strict=True)]
    if path.lower().endswith(DICOM_SUFFIX):  # one instance stands for its series: the folder is the slide
        folder = os.path.dirname(path)
        return [SlideRef(slide_id_for(folder), folder, origin=spec)]
    # A file, or a path that does not exist: the reader reports which, per slide.
    return [SlideRef(slide_id_for(path), path, origin=spec)]


def _slides_in_folder(path: str) -> list[str]:
    """Slide files under a folder, and DICOM series folders (a folder of .dcm instances is one slide)."""
    found = []
    for dirpath, _dirs, files in os.walk(path):
        names = [f for f in files if is_slide_name(f)]
        if any(f.lower().endswith(DICOM_SUFFIX) for f in names):
            found.append(dirpath)
            names = [f for f in names if not f.lower().endswith(DICOM_SUFFIX)]
        found.extend(os.path.join(dirpath, f) for f in names)
    return sorted(found)


def _remote(spec: str, settings: Settings) -> list[SlideRef]:
    if is_slide_name(spec):
        return [SlideRef(slide_id_for(spec), spec, origin=spec)]
    fs, root = url_to_fs(spec, settings.s3)
    protocol = spec.split("://", 1)[0]
    paths = sorted(p for p in fs.find(root) if is_slide_name(p))
    ids = _distinct_ids([posixpath.relpath(p, root.rstrip("/") or "/") for p in paths])
    return [SlideRef(sid, f"{protocol}://{p}", origin=spec) for sid, p in zip(ids, paths, strict=True)]


def _relative(path: str, root: str) -> str:
    return os.path.relpath(path, root).replace(os.sep, "/")


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


def _escape(name: str, what: str) -> str | None:
    """Why a slide name read from a manifest or a PathGen JSON file may not be joined onto a root, or None."""
    if not name:
        return f"its {what} is empty"
    if any(unicodedata.category(ch) in ("Cc", "Cf", "Cs") for ch in name):
        return f"its {what} {name!r} holds control characters"
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or "://" in name or (len(parts[0]) == 2 and parts[0][1] == ":"):
        return f"its {what} {name!r} is an absolute path"
    if ".." in parts:
        return f"its {what} {name!r} climbs out of its root with '..'"
    return None


def _inside(root: str, candidate: str) -> bool:
    """Whether ``candidate`` lies below ``root`` once ``.`` and ``..`` are resolved (a belt to ``_escape``'s braces)."""
    if is_remote(root):
        base = posixpath.normpath(root.split("://", 1)[1])
        path = posixpath.normpath(candidate.split("://", 1)[1])
        return path.startswith(base.rstrip("/") + "/")
    base, path = os.path.normpath(local_path(root)), os.path.normpath(local_path(candidate))
    return os.path.commonpath([base, path]) == base and path != base


def _find_slide(roots: list[str], file_id: str | None, filename: str, settings: Settings) -> str | None:
    """Look for ``<root>/<file_id>/<filename>`` (gdc-client's layout) and ``<root>/<filename>``, never outside a
    root (the caller has refused names that are absolute or hold ``..``)."""
    names = [filename] if is_slide_name(filename) else [filename + ext for ext in SLIDE_EXTENSIONS]
    for root in roots:
        for name in names:
            candidates = [posixpath.join(root, file_id, name)] if file_id else []
            candidates.append(posixpath.join(root, name))
            for candidate in candidates:
                if not _inside(root, candidate):
                    continue
                if is_remote(candidate):
                    fs, path = url_to_fs(candidate, settings.s3)
                    if fs.exists(path):
                        return candidate
                elif os.path.isfile(local_path(candidate)):
                    return local_path(candidate)
    return None


def _named_slide(
    spec: str, roots: list[str], name: str, file_id: str | None, settings: Settings
) -> tuple[str, str | None]:
    """``(uri, missing_reason)`` of a slide a manifest or a PathGen JSON file names, looked for only inside the
    roots; a name that would leave them is refused without looking."""
    problem = _escape(name, "name") or (_escape(file_id, "file id") if file_id is not None else None)
    if problem:
        return name, (
            f"slide {name!r} named by {posixpath.basename(spec)} is not looked for: {problem}, and slides are read "
            f"only inside slides.roots ({', '.join(roots)}); name it by its path inside a root in {spec}"
        )
    found = _find_slide(roots, file_id, name, settings)
    if found:
        return found, None
    # where it was expected: gdc-client's layout for a manifest's file name, ``<root>/<wsi_id>.svs`` for PathGen's
    guess = (
        posixpath.join(roots[0], file_id or "", name)
        if is_slide_name(name)
        else posixpath.join(roots[0], name + ".svs")
    )
    return guess, _missing(name, file_id, roots, spec)


def _gdc_manifest(spec: str, settings: Settings) -> list[SlideRef]:
    text = _read_text(spec, settings)
    rows = [
        {SAMPLE_SHEET_COLUMNS.get(k, k): v for k, v in row.items()}
        for row in csv.DictReader(text.splitlines(), delimiter="\t")
    ]
    if not rows or not set(GDC_COLUMNS[:2]).issubset(rows[0].keys()):
        raise SourceError(
            f"{spec} is not a GDC manifest: it needs tab-separated columns {', '.join(GDC_COLUMNS)}, or a sample "
            "sheet's 'File ID' and 'File Name' (export either from the GDC portal's cart)"
        )
    roots = _roots(spec, settings)
    refs: list[SlideRef] = []
    layout: list[str] = []  # each slide's path in gdc-client's layout, which tells slides of one name apart
    for row in rows:
        filename = (row.get("filename") or "").strip()
        if not is_slide_name(filename):
            continue
        file_id = (row.get("id") or "").strip() or None
        uri, missing = _named_slide(spec, roots, filename, file_id, settings)
        ref = SlideRef(
            slide_id=slide_id_for(filename),
            uri=uri,
            origin=spec,
            project=_row_project(row),
            file_id=file_id,
            md5=((row.get("md5") or "").strip() or None),
            size=int(row["size"]) if (row.get("size") or "").isdigit() else None,
            missing_reason=missing,
        )
        refs.append(ref)
        layout.append(f"{file_id}/{filename}" if file_id else filename)
    for ref, slide_id in zip(refs, _distinct_ids(layout), strict=True):
        ref.slide_id = slide_id
    return refs


def _row_project(row: dict[str, Any]) -> str | None:
    """The project a manifest or sample sheet row names; a file of several cases lists each case's project
    (``TCGA-BRCA, TCGA-BRCA``): one project when they agree, none when they do not."""
    named = {p.strip() for p in str(row.get("project_id") or row.get("project") or "").split(",") if p.strip()}
    return named.pop() if len(named) == 1 else None


def _pathgen_json(spec: str, settings: Settings) -> list[SlideRef]:
    try:
        records = json.loads(_read_text(spec, settings))
    except json.JSONDecodeError as exc:
        raise SourceError(f"{spec} is not valid JSON ({exc}); expected a PathGen-1.6M list of records") from None
    if not isinstance(records, list) or (records and not {"wsi_id", "position"} <= set(records[0])):
        raise SourceError(f"{spec} is not a PathGen-1.6M file: expected a list of {{wsi_id, position, caption}}")
    by_slide: dict[str, SlideRef] = {}
    roots = _roots(spec, settings)
    for index, record in enumerate(records):
        wsi_id, (x, y) = _pathgen_record(spec, index, record)
        ref = by_slide.get(wsi_id)
        if ref is None:
            file_id = record.get("file_id")
            file_id = str(file_id) if file_id not in (None, "") else None
            uri, missing = _named_slide(spec, roots, wsi_id, file_id, settings)
            ref = by_slide[wsi_id] = SlideRef(
                slide_id=slide_id_for(wsi_id),
                uri=uri,
                origin=spec,
                file_id=file_id,
                positions=[],
                captions=[],
                missing_reason=missing,
            )
        ref.positions.append((x, y))
        ref.captions.append(str(record.get("caption") or ""))
    refs = list(by_slide.values())
    layout = [f"{r.file_id}/{wsi_id}" if r.file_id else wsi_id for wsi_id, r in by_slide.items()]
    for ref, slide_id in zip(refs, _distinct_ids(layout), strict=True):
        ref.slide_id = slide_id
    return refs


def _pathgen_record(spec: str, index: int, record: Any) -> tuple[str, tuple[int, int]]:
    """A record's slide and level-0 corner; a malformed record stops the run naming the file and the record."""
    try:
        wsi_id = str(record["wsi_id"])
        x, y = (float(v) for v in record["position"])
        if not (math.isfinite(x) and math.isfinite(y)) or x < 0 or y < 0:
            raise ValueError(f"position {x}, {y} is not a pair of non-negative numbers")
        return wsi_id, (int(x), int(y))
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        problem = f"{type(exc).__name__}: {cut(str(exc), 100)}"
        raise SourceError(
            f"{spec}: record {index} ({short_repr(record)}) has no valid wsi_id and position [x, y] ({problem}); "
            "fix or remove that record"
        ) from None


def _missing(name: str, file_id: str | None, roots: list[str], spec: str) -> str:
    hint = f" (gdc-client download {file_id})" if file_id else ""
    return (
        f"slide {name} named by {posixpath.basename(spec)} was not found under {', '.join(roots)}; "
        f"download it{hint} and point slides.roots at the folder that holds it"
    )
