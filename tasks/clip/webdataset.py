"""Pairs to WebDataset tars, the input of open_clip's own trainer.

Generated pairs: one tar per pair shard (slide), ``<slide>.tar``; slides held out for retrieval evaluation go to
``holdout/<slide>.tar`` instead, whole: neighbouring patches of one tissue on both sides would make held-out recall
optimistic. The choice is a hash of the slide's case (the first 12 characters of a TCGA barcode, so that every slide
of a patient falls on one side) or of the slide id, and never changes between exports. An external set is split by
its rows' ``case_id`` or ``slide_id`` column when it has one, else pair by pair.
An external set (a folder of images and a CSV/JSONL of captions) becomes ``ext-NNNNNN.tar`` of ``pairs_per_tar`` pairs.
A sample is ``<patch_id>.jpg`` + ``.txt`` (the caption) + ``.json`` (its provenance), written by WebDataset's own
``TarWriter``. ``sizes.json`` beside the tars gives open_clip_train the sample counts; ``manifest.json`` records which
pair shard (by commit id) each tar came from, so a re-export rewrites only slides whose pairs changed. Every file is
written to a temporary name and renamed: a tar is never half there. Reviews (``export.reviews``,
``tasks.reviews.store``) are applied by default: a rejected pair is left out, a corrected caption replaces the generated
one (its sample's ``.json`` says ``"review": "correct"``); the manifest counts them per slide and in all, and a slide
whose reviews changed is written again.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq

from pathgen.settings import PairSetSettings
from tasks.captions.records import pairs_prefix, slide_of
from tasks.reviews.store import (
    COUNTS,
    ExportReviews,
    Review,
    add_counts,
    apply_reviews,
    review_provenance,
    reviews_digest,
)
from tasks.store.objects import Store

HOLDOUT = "holdout"
PROVENANCE = [
    "patch_id", "slide_id", "source_uri", "project", "file_id", "x", "y", "w0", "h0", "level", "mpp", "patch_px",
    "caption_tokens", "describe_model", "revise_model", "summarize_model", "prompt_versions", "agents_hash",
    "extraction_hash", "random_weights", "factory_version", "created_at", "review",
]  # fmt: skip
IMAGE_SUFFIXES = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}


@dataclass
class Sample:
    key: str
    image: bytes
    image_ext: str  # jpg | png | webp
    caption: str
    meta: dict[str, Any]


@dataclass
class ExportSummary:
    out: str
    pairs: int = 0
    holdout_pairs: int = 0
    tars: int = 0
    written: int = 0  # tars (re)written by this export; the rest were up to date
    seconds: float = 0.0
    random_weights: bool = False
    sources: list[str] = field(default_factory=list)
    reviews: dict[str, Any] = field(default_factory=dict)  # the manifest's: mode and counts

    @property
    def pairs_per_s(self) -> float:
        return self.pairs / self.seconds if self.seconds else 0.0


HOLDOUT_SPLIT = "case-or-slide"  # in the manifest: an export split another way is never reused
TCGA_CASE = re.compile(r"TCGA-[A-Z0-9]{2}-[A-Z0-9]{4}", re.IGNORECASE)


def is_holdout(group: str, fraction: float) -> bool:
    """Whether a case, slide or pair (``group``) is held out; stable across exports, machines and settings other
    than the fraction."""
    if fraction <= 0:
        return False
    return int(hashlib.sha256(group.encode()).hexdigest()[:8], 16) / 2**32 < fraction


def holdout_group(slide_id: str) -> str:
    """What is held out together: the case of a TCGA slide (``TCGA-XX-XXXX``, its first 12 characters), else the
    slide."""
    case = TCGA_CASE.match(slide_id)
    return case.group(0).upper() if case else slide_id


def tar_name(slide_id: str) -> str:
    """A file name braceexpand and WebDataset take as it is (no braces, no '::', one dot)."""
    if re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9_-]{0,120}", slide_id.replace(".", "_")):
        return f"{slide_id.replace('.', '_')}.tar"
    return f"slide-{hashlib.sha256(slide_id.encode()).hexdigest()[:16]}.tar"


def write_tar(path: Path, samples: Iterable[Sample]) -> int:
    """Samples to one tar with WebDataset's own writer, atomically; returns how many. Members carry no time or owner:
    same pairs, same bytes."""
    from webdataset import TarWriter  # imported here: webdataset imports torch, which only writing a tar needs

    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.part")
    count = 0
    try:
        with partial.open("wb") as stream, TarWriter(stream, **TAR_MEMBER) as tar:
            for sample in samples:
                tar.write(tar_record(sample))
                count += 1
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)  # an export that failed half-way leaves no partial tar behind
    return count


# No owner and time 0 (an int: a float time costs each member a PAX header), the bytes given written as they are
TAR_MEMBER = {"user": "", "group": "", "mode": 0o644, "mtime": 0, "encoder": False}


def tar_record(sample: Sample) -> dict[str, str | bytes]:
    """A WebDataset sample: ``<key>.<image_ext>`` (the image), ``.txt`` (the caption), ``.json`` (its provenance)."""
    meta = json.dumps(sample.meta, sort_keys=True, default=str).encode()
    return {"__key__": sample.key, sample.image_ext: sample.image, "txt": sample.caption.encode(), "json": meta}


def write_json_atomic(path: Path, obj: Any) -> None:
    partial = path.with_name(f".{path.name}.{os.getpid()}.part")
    partial.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")
    os.replace(partial, path)


def pair_samples(table_rows: list[dict[str, Any]]) -> Iterator[Sample]:
    for row in table_rows:
        meta = {key: row.get(key) for key in PROVENANCE if key in row}
        yield Sample(row["patch_id"], row["image"], "jpg", row["caption"], meta)


def _shard_rows(store: Store, key: str) -> tuple[str, list[dict[str, Any]]]:
    """A pair shard's commit id and rows (image, caption and provenance columns only).

    Read from its bytes on this thread alone: a threaded read starts Arrow's CPU pool, whose workers, having
    touched the Python file object, outlive the command and can abort the interpreter at exit ("terminate called
    without an active exception", exit 134)."""
    shard = pq.ParquetFile(pa.BufferReader(store.read_bytes(key)), pre_buffer=False)
    metadata = {k.decode(): v.decode() for k, v in (shard.schema_arrow.metadata or {}).items()}
    columns = [c for c in ["image", "caption", *PROVENANCE] if c in shard.schema_arrow.names]
    rows = shard.read(columns=columns, use_threads=False).to_pylist()
    return metadata.get("pathgen.commit_id", ""), rows


def export_pairs(
    store: Store,
    agents_hash: str,
    out: Path,
    holdout_fraction: float,
    logger=None,
    reviews: Literal["apply", "ignore"] = "apply",
) -> ExportSummary:
    """Every pair of ``pairs/<agents_hash>/`` into exactly one tar under ``out`` (training or holdout), reviews
    applied or ignored (``reviews``: ``export.reviews``)."""
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    previous = _previous_tars(out)
    identity = {"agents_hash": agents_hash, "holdout_fraction": holdout_fraction, "holdout_split": HOLDOUT_SPLIT}
    identity["reviews_mode"] = reviews
    reviewed = ExportReviews.of(store, agents_hash, reviews)
    manifest = _load_manifest(out, identity)
    summary = ExportSummary(str(out), sources=[store.uri(pairs_prefix(agents_hash))])
    entries: dict[str, dict[str, Any]] = {}
    for key in store.list(pairs_prefix(agents_hash), ".parquet"):
        slide_id = slide_of(key)
        entry = manifest["slides"].get(slide_id)
        slide_reviews = reviewed.for_slide(slide_id)
        digest = reviews_digest(slide_reviews)
        fresh = entry and entry.get("reviews_digest") == digest and _tars_present(out, entry)
        if not (fresh and _commit_of(store, key) == entry["commit_id"]):
            entry = _export_slide(store, key, slide_id, out, holdout_fraction, (slide_reviews, reviews))
            entry["reviews_digest"] = digest
            summary.written += 1
            if logger:
                logger.info("exported %s: %d pairs, %d held out", slide_id, entry["pairs"], entry["holdout_pairs"])
        entries[slide_id] = entry
    _remove_unlisted(out, entries.values(), previous)
    manifest["slides"] = entries
    totals = _review_totals(entries.values())
    manifest["reviews"] = review_provenance(reviews, totals["pairs_read"], totals, reviewed.problems)
    summary = _finish_export(out, manifest, summary, started)
    if logger and holdout_fraction > 0 and not summary.holdout_pairs:
        logger.warning(
            "none of %d slides held out at clip.holdout_fraction=%s (whole cases or slides are held out): no "
            "retrieval evaluation; raise it or add slides",
            len(entries),
            holdout_fraction,
        )
    return summary


def _commit_of(store: Store, key: str) -> str:
    with store.open(key) as handle:
        raw = pq.ParquetFile(handle, pre_buffer=False).schema_arrow.metadata or {}
    return raw.get(b"pathgen.commit_id", b"").decode()


def _review_totals(entries: Iterable[dict[str, Any]]) -> dict[str, int]:
    totals = {"pairs_read": 0, **dict.fromkeys(COUNTS, 0)}
    for entry in entries:
        add_counts(totals, entry.get("reviews", {}))
        totals["pairs_read"] += entry.get("pairs_read", 0)
    return totals


def _export_slide(
    store: Store, key: str, slide_id: str, out: Path, fraction: float, reviews: tuple[dict[str, Review], str]
) -> dict[str, Any]:
    commit_id, read = _shard_rows(store, key)
    rows, counts = apply_reviews(read, *reviews)
    held_out = is_holdout(holdout_group(slide_id), fraction)
    held, kept = (rows, []) if held_out else ([], rows)
    name = tar_name(slide_id)
    entry = {"commit_id": commit_id, "tar": name, "pairs": len(kept), "holdout_pairs": len(held)}
    entry |= {"pairs_read": len(read), "reviews": counts}
    entry["random_weights"] = any(bool(r.get("random_weights")) for r in rows)
    for folder, part in ((out, kept), (out / HOLDOUT, held)):
        target = folder / name
        if part:
            write_tar(target, pair_samples(part))
        elif target.exists():
            target.unlink()
    return entry


def _tars_present(out: Path, entry: dict[str, Any]) -> bool:
    wanted = [(out, entry["pairs"]), (out / HOLDOUT, entry["holdout_pairs"])]
    return all((folder / entry["tar"]).exists() == bool(count) for folder, count in wanted)


def _remove_unlisted(out: Path, entries: Iterable[dict[str, Any]], previous: set[str]) -> None:
    """Tars an earlier export wrote for slides whose pairs are gone never linger. Only those: a tar this exporter
    did not write is left alone (``sizes.json`` never lists it, so it is never trained on)."""
    names = {e["tar"] for e in entries}
    for folder in (out, out / HOLDOUT):
        for name in previous - names:
            (folder / name).unlink(missing_ok=True)


def _previous_tars(out: Path) -> set[str]:
    try:
        return {entry["tar"] for entry in json.loads((out / "manifest.json").read_text())["slides"].values()}
    except (OSError, ValueError, KeyError, TypeError):
        return set()


def _load_manifest(out: Path, identity: dict[str, Any]) -> dict[str, Any]:
    path = out / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        manifest = {}
    if any(manifest.get(k) != v for k, v in identity.items()):
        manifest = {}  # another set or another holdout split: nothing in it can be reused
    return {**identity, "slides": manifest.get("slides", {})}


def _finish_export(out: Path, manifest: dict[str, Any], summary: ExportSummary, started: float) -> ExportSummary:
    entries = list(manifest["slides"].values())
    sizes = {e["tar"]: e["pairs"] for e in entries if e["pairs"]}
    held = {e["tar"]: e["holdout_pairs"] for e in entries if e["holdout_pairs"]}
    write_json_atomic(out / "sizes.json", sizes)
    (out / HOLDOUT).mkdir(exist_ok=True)
    write_json_atomic(out / HOLDOUT / "sizes.json", held)
    write_json_atomic(out / "manifest.json", manifest)
    summary.pairs, summary.holdout_pairs, summary.tars = sum(sizes.values()), sum(held.values()), len(sizes)
    summary.random_weights = any(e.get("random_weights") for e in entries)
    summary.reviews = manifest.get("reviews", {})  # an external set has no reviews
    summary.seconds = time.perf_counter() - started
    return summary


def training_tars(out: Path, holdout: bool = False) -> list[Path]:
    folder = out / HOLDOUT if holdout else out
    sizes = json.loads((folder / "sizes.json").read_text())
    return [folder / name for name in sorted(sizes)]


def tar_sizes(tars: list[Path]) -> list[int]:
    """Each tar's pair count, from the ``sizes.json`` beside it."""
    listed: dict[Path, dict[str, int]] = {}
    for tar in tars:
        if tar.parent not in listed:
            listed[tar.parent] = json.loads((tar.parent / "sizes.json").read_text())
    return [int(listed[tar.parent][tar.name]) for tar in tars]


def sample_count(tars: list[Path]) -> int:
    return sum(tar_sizes(tars))


def external_rows(pair_set: PairSetSettings) -> list[dict[str, str]]:
    """The rows of an external set's captions file (CSV with a header, or JSONL), each naming an image and a caption.

    Errors name the file, the row and the fix."""
    folder = Path(pair_set.folder or "")
    captions = Path(pair_set.captions) if pair_set.captions else None
    if not folder.is_dir():
        raise ValueError(f"external pair set: folder {folder} does not exist (clip.stageN.folder)")
    if captions is None or not captions.is_file():
        raise ValueError(f"external pair set: captions file {captions} not found (clip.stageN.captions: CSV or JSONL)")
    if captions.suffix.lower() == ".csv":
        with captions.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
    else:
        rows = [_json_row(captions, n, line) for n, line in enumerate(captions.read_text().splitlines(), 1) if line]
    for number, row in enumerate(rows, 1):
        if not row.get(pair_set.image_key) or not row.get(pair_set.caption_key):
            raise ValueError(
                f"{captions}: row {number} lacks {pair_set.image_key!r} or {pair_set.caption_key!r} "
                "(set clip.stageN.image_key / caption_key to the columns that hold them)"
            )
    return rows


def _json_row(path: Path, number: int, line: str) -> dict[str, str]:
    try:
        row = json.loads(line)
    except ValueError as exc:
        raise ValueError(f"{path}: line {number} is not JSON ({exc.msg}); one object per line") from None
    if not isinstance(row, dict):
        raise ValueError(f"{path}: line {number} is not a JSON object")
    return row


def external_sample(folder: Path, row: dict[str, str], image_key: str, caption_key: str) -> Sample:
    path = (folder / row[image_key]).resolve()
    if not path.is_relative_to(folder.resolve()):
        raise ValueError(f"image {row[image_key]!r} lies outside the external set's folder {folder}")
    try:
        data, ext = _image_bytes(path)
    except OSError as exc:  # a missing or unreadable image is the set's content: a clear error, not a retry
        raise ValueError(f"external set {folder}: image {row[image_key]!r} cannot be read ({exc})") from None
    key = hashlib.sha256(f"{row[image_key]}|{row[caption_key]}".encode()).hexdigest()[:20]
    meta = {k: v for k, v in row.items() if isinstance(v, str | int | float | bool)}
    return Sample(key, data, ext, str(row[caption_key]), meta | {"pair_id": key})


def _image_bytes(path: Path) -> tuple[bytes, str]:
    from PIL import Image

    data = path.read_bytes()
    ext = IMAGE_SUFFIXES.get(path.suffix.lower())
    with Image.open(io.BytesIO(data)) as image:  # raises on a file that is no image, before training would
        if ext is None:  # TIFF and the like: PNG keeps the pixels exactly and open_clip's loader reads it
            buffer = io.BytesIO()
            image.convert("RGB").save(buffer, "PNG")
            data, ext = buffer.getvalue(), "png"
    return data, ext


def _external_group(sample: Sample) -> str:
    """An external pair is held out with its case or slide when its row names one, else on its own."""
    for column in ("case_id", "slide_id"):
        if sample.meta.get(column) not in (None, ""):
            value = str(sample.meta[column])
            return value if column == "case_id" else holdout_group(value)
    return sample.key


def export_external(pair_set: PairSetSettings, out: Path, pairs_per_tar: int, holdout_fraction: float) -> ExportSummary:
    """An external folder of images + captions into ``ext-NNNNNN.tar`` (and ``holdout/``); always rewritten."""
    started = time.perf_counter()
    folder = Path(pair_set.folder or "")
    rows = external_rows(pair_set)
    out.mkdir(parents=True, exist_ok=True)
    samples = [external_sample(folder, row, pair_set.image_key, pair_set.caption_key) for row in rows]
    content = hashlib.sha256()  # what the tars hold, so that a changed image or caption makes another run
    for sample in samples:
        content.update(hashlib.sha256(sample.image).digest() + sample.caption.encode() + b"\0")
    entries = {}
    held = [s for s in samples if is_holdout(_external_group(s), holdout_fraction)]
    kept = [s for s in samples if not is_holdout(_external_group(s), holdout_fraction)]
    previous = _previous_tars(out)
    for index in range(0, max(len(kept), len(held)), pairs_per_tar):
        name = f"ext-{index // pairs_per_tar:06d}.tar"
        part, part_held = kept[index : index + pairs_per_tar], held[index : index + pairs_per_tar]
        for target, chunk in ((out / name, part), (out / HOLDOUT / name, part_held)):
            if chunk:
                write_tar(target, chunk)
            else:
                target.unlink(missing_ok=True)  # an earlier export's tar of this name must not linger
        entries[name] = {"commit_id": "", "tar": name, "pairs": len(part), "holdout_pairs": len(part_held)}
    _remove_unlisted(out, entries.values(), previous)
    identity = {"folder": str(folder.resolve()), "captions": str(pair_set.captions), "content": content.hexdigest()}
    identity["holdout_split"] = HOLDOUT_SPLIT
    identity["slides"] = entries
    summary = ExportSummary(str(out), sources=[str(folder)], written=len(entries))
    return _finish_export(out, identity, summary, started)
