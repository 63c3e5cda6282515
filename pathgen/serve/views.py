"""What each page shows, as plain data: the JSON API returns it and the pages render it, so the two never differ."""

from __future__ import annotations

import difflib
import re
from typing import Any
from urllib.parse import quote, urlencode

from pathgen.serve import data
from pathgen.serve.context import OPENSEADRAGON_FETCH, ServeContext
from pathgen.serve.queries import PairFilter, page_pairs
from tasks.reviews.store import REJECT_REASONS, latest, review_history

RANDOM_CAPTIONS = "captions from random-weight models: they are noise"
RANDOM_SELECTION = "patches picked with random-weight embeddings: the picks are noise"
_WORDS = re.compile(r"\S+|\s+")
VIEWER_MISSING = (
    f"the slide viewer (OpenSeadragon) is not installed: run {OPENSEADRAGON_FETCH} in the checkout, or set "
    "serve.openseadragon_dir"
)
PATCH_FIELDS = ("tissue_fraction", "sharpness", "pen_fraction", "cluster", "selected_by", "attribute_score",
                "findings_score", "project")  # fmt: skip


def slides_view(ctx: ServeContext, query: data.SlideQuery) -> dict[str, Any]:
    rows = data.slide_rows(ctx.records, ctx.index)
    shown = data.filter_slides(rows, query)
    return {
        "slides": shown,
        "total": len(rows),
        "statuses": sorted({r["status"] for r in rows if r.get("status")}),
        "projects": sorted({r["project"] for r in rows if r.get("project")}),
        "reasons": sorted({r["reason"] for r in rows if r.get("reason")}),
        "agents_hashes": sorted({h for r in rows for h in r.get("pairs_by_hash", {})}),
        "random_weights": _random_note(
            any(r.get("random_selection") for r in rows), any(r.get("random_captions") for r in rows)
        ),
        "params": dict(vars(query)),
    }


def _random_note(selection: bool, captions: bool) -> str | None:
    reasons = ([RANDOM_SELECTION] if selection else []) + ([RANDOM_CAPTIONS] if captions else [])
    return "; ".join(reasons) or None


def slide_view(ctx: ServeContext, slide_id: str) -> dict[str, Any]:
    record = data.slide_record(ctx.store, slide_id)
    overlay = data.slide_overlay(ctx.store, slide_id, ctx.index)
    shards = [s for s in ctx.index.shards() if s.slide_id == slide_id]
    base = f"/api/slides/{quote(slide_id, safe='')}"
    return {
        "slide_id": slide_id,
        "record": {k: v for k, v in record.items() if k not in ("failed_positions",)},
        "status": record.get("status"),
        "error": record.get("error"),
        "width": record.get("width"),
        "height": record.get("height"),
        "dzi": f"{base}/slide.dzi" if record.get("width") else None,
        "outline_url": f"{base}/outline",
        "viewer": ctx.openseadragon is not None,
        "viewer_missing": None if ctx.openseadragon else VIEWER_MISSING,
        "pairs": {s.agents_hash: s.rows for s in shards},
        **overlay,
        "random_weights": _random_note(bool(record.get("random_weights")), any(s.random_weights for s in shards)),
    }


def word_diff(before: str, after: str) -> list[dict[str, str]]:
    """The revise agent's changes: segments of kept, deleted and inserted text (whitespace kept)."""
    a, b = _WORDS.findall(before or ""), _WORDS.findall(after or "")
    segments = []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes():
        if op == "equal":
            segments.append({"op": "same", "text": "".join(a[i1:i2])})
            continue
        if i2 > i1:
            segments.append({"op": "del", "text": "".join(a[i1:i2])})
        if j2 > j1:
            segments.append({"op": "ins", "text": "".join(b[j1:j2])})
    return segments


def patch_view(
    ctx: ServeContext, patch_id: str, slide_id: str | None = None, agents_hash: str | None = None
) -> dict[str, Any]:
    locations = data.locate_patch(ctx.store, ctx.index, ctx.locations, patch_id, slide_id, None)
    chosen = next((loc for loc in locations if agents_hash and loc.agents_hash == agents_hash), locations[0])
    if agents_hash and chosen.agents_hash != agents_hash:
        raise data.NotFound(f"patch {patch_id!r} has no pair under agents_hash {agents_hash!r}")
    row = data.read_row(ctx.store, chosen)
    slide_id = chosen.slide_id
    try:
        record = data.slide_record(ctx.store, slide_id)
    except data.NotFound:
        record = {}
    query = {"slide": slide_id} | ({"agents_hash": chosen.agents_hash} if chosen.agents_hash else {})
    view = {
        "patch_id": patch_id,
        "slide_id": slide_id,
        "agents_hash": chosen.agents_hash,
        "captioned_by": [loc.agents_hash for loc in locations if loc.agents_hash],
        "image_url": f"/api/patches/{quote(patch_id, safe='')}/image.jpg?{urlencode(query)}",
        "box": {k: row.get(k) for k in ("x", "y", "w0", "h0", "level", "mpp", "patch_px")},
        "patch": {k: row.get(k) for k in PATCH_FIELDS},
        "pair": None,
        "failed": [],
        "reviews": [],
        "review": None,
        "review_error": None,  # the slide's review file cannot be read: shown, and reviewing is off
        "reject_reasons": list(REJECT_REASONS),
        "random_weights": _random_note(bool(record.get("random_weights")), bool(row.get("random_weights"))),
    }
    if chosen.agents_hash:
        view["pair"] = _pair(row)
        view["failed"] = data.failed_items(ctx.store, chosen.agents_hash, slide_id)
        try:
            history = review_history(ctx.store, chosen.agents_hash, slide_id, problems=[])
        except ValueError as exc:
            view["review_error"] = str(exc)
            return view
        view["reviews"] = [r.model_dump(mode="json") for r in history if r.patch_id == patch_id]
        current = latest(history).get(patch_id)  # by time, as the exports apply it
        view["review"] = current.model_dump(mode="json") if current else None
    return view


def _pair(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "description": row.get("description"),
        "revised_description": row.get("revised_description"),
        "revise_diff": word_diff(row.get("description") or "", row.get("revised_description") or ""),
        "revise_changed": row.get("revise_changed"),
        "revise_change": row.get("revise_change"),
        "caption": row.get("caption"),
        "caption_tokens": row.get("caption_tokens"),
        "caption_trimmed": row.get("caption_trimmed"),
        "models": {role: row.get(f"{role}_model") for role in ("describe", "revise", "summarize")},
        "prompt_versions": data.parse_json(row.get("prompt_versions")),
        "sampling": data.parse_json(row.get("sampling")),
        "hashes": {k: row.get(k) for k in ("agents_hash", "extraction_hash")},
        "factory_version": row.get("factory_version"),
        "created_at": row.get("created_at"),
        "random_weights": bool(row.get("random_weights")),
    }


def pairs_view(ctx: ServeContext, flt: PairFilter, page: int, size: int) -> dict[str, Any]:
    ctx.reviews.refresh()
    result = page_pairs(ctx.index, flt, page, size, ctx.reviews.verdicts, ctx.counts, ctx.reviews.version)
    for row in result.rows:
        verdict = ctx.reviews.verdicts(row["agents_hash"], row["slide_id"]).get(row["patch_id"])
        query = urlencode({"slide": row["slide_id"], "agents_hash": row["agents_hash"]})
        row["review"] = verdict
        row["url"] = f"/patches/{quote(row['patch_id'], safe='')}?{query}"
        row["image_url"] = f"/api/patches/{quote(row['patch_id'], safe='')}/image.jpg?{query}&size=thumb"
    shards = [s for s in ctx.index.shards() if not flt.agents_hash or s.agents_hash == flt.agents_hash]
    last = -(-result.total // size) if result.total is not None else None
    # captions: any shard of the listing; patch picks: the slide records of the pairs on this page
    selection = data.random_selection(ctx.store, {row["slide_id"] for row in result.rows})
    return {
        "rows": result.rows,
        "page": page,
        "page_size": size,
        "total": result.total,
        "last_page": last,
        "upper_bound": result.upper_bound,
        "has_next": result.has_next,
        "rows_read": result.rows_read,
        "filter": flt.as_query(),
        "agents_hashes": ctx.index.agents_hashes(),
        "random_weights": _random_note(selection, any(s.random_weights for s in shards)),
    }
