"""The JSON API under ``/api/``, which the pages use: slides, a slide's overlay and DeepZoom tiles, a patch and its
image, a page of pairs, and reviews (``POST /api/reviews``, the app's one write)."""

from __future__ import annotations

import errno
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pathgen.errors import SlideError, short_error
from pathgen.serve import data, views
from pathgen.serve.context import PROXY_HELP, ServeContext
from pathgen.serve.queries import REVIEW_STATES, PairFilter
from tasks.reviews.store import (
    MAX_CAPTION_CHARS,
    MAX_REASON_CHARS,
    Review,
    ReviewConflictError,
    review_key,
    save_review,
)

router = APIRouter(prefix="/api")
MAX_PAGE_SIZE = 500
MAX_TOKENS = 10_000
IMAGE_CACHE = "private, max-age=3600"  # a patch's pixels never change under its id


def _ctx(request: Request) -> ServeContext:
    return request.app.state.ctx


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


@router.get("/slides")
def slides(request: Request, query: Annotated[data.SlideQuery, Depends()]) -> Any:
    return views.slides_view(_ctx(request), query)


@router.get("/slides/{slide_id}")
def slide(request: Request, slide_id: str) -> Any:
    return views.slide_view(_ctx(request), data.check_slide_id(slide_id))


def _slide_uri(ctx: ServeContext, slide_id: str) -> str:
    record = data.slide_record(ctx.store, slide_id)
    if not record.get("width") or not record.get("source_uri"):
        raise data.NotFound(f"slide {slide_id!r} was never opened (its record has no dimensions): no tiles")
    return record["source_uri"]


def _unreachable(slide_id: str, exc: Exception) -> JSONResponse:
    return _error(404, f"slide {slide_id!r} cannot be read from this server: {short_error(exc)}")


@router.get("/slides/{slide_id}/slide.dzi")
def slide_dzi(request: Request, slide_id: str) -> Response:
    ctx = _ctx(request)
    uri = _slide_uri(ctx, data.check_slide_id(slide_id))
    try:
        return Response(ctx.tiles.dzi(uri), media_type="application/xml")
    except (SlideError, OSError) as exc:
        return _unreachable(slide_id, exc)


@router.get("/slides/{slide_id}/slide_files/{level}/{tile}")
def slide_tile(request: Request, slide_id: str, level: int, tile: str) -> Response:
    ctx = _ctx(request)
    uri = _slide_uri(ctx, data.check_slide_id(slide_id))
    col, _, row = tile.removesuffix(".jpeg").partition("_")
    if not (col.isdigit() and row.isdigit() and tile.endswith(".jpeg")):
        return _error(400, f"tile {tile[:40]!r} is not <col>_<row>.jpeg")
    try:
        jpeg = ctx.tiles.tile(uri, level, int(col), int(row))
    except ValueError as exc:
        return _error(404, str(exc))
    except (SlideError, OSError) as exc:
        return _unreachable(slide_id, exc)
    return Response(jpeg, media_type="image/jpeg", headers={"Cache-Control": IMAGE_CACHE})


@router.get("/slides/{slide_id}/outline")
def slide_outline(request: Request, slide_id: str) -> Any:
    ctx = _ctx(request)
    record = data.slide_record(ctx.store, data.check_slide_id(slide_id))
    uri = _slide_uri(ctx, slide_id)
    try:
        polygons, note = ctx.tiles.outline(uri, record.get("mpp"))
    except (SlideError, OSError) as exc:
        return _unreachable(slide_id, exc)
    return {"slide_id": slide_id, "polygons": polygons, "note": note}


@router.get("/patches/{patch_id}")
def patch(request: Request, patch_id: str, slide: str | None = None, agents_hash: str | None = None) -> Any:
    return views.patch_view(_ctx(request), data.check_patch_id(patch_id), slide, agents_hash)


@router.get("/patches/{patch_id}/image.jpg")
def patch_image(
    request: Request,
    patch_id: str,
    slide: str | None = None,
    agents_hash: str | None = None,
    size: Literal["full", "thumb"] = "full",
) -> Response:
    ctx = _ctx(request)
    locations = data.locate_patch(ctx.store, ctx.index, ctx.locations, patch_id, slide, agents_hash)
    jpeg = ctx.images.image(ctx.store, locations[0])
    if size == "thumb":
        jpeg = data.thumbnail(jpeg)
    return Response(jpeg, media_type="image/jpeg", headers={"Cache-Control": IMAGE_CACHE})


def _flag(name: str, value: str | None) -> bool | None:
    if value in (None, ""):
        return None
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise data.BadRequest(f"{name}={value[:20]!r} is not true or false")


def _count(name: str, value: str | None) -> int | None:
    if value in (None, ""):
        return None
    if not value.isdigit() or int(value) > MAX_TOKENS:
        raise data.BadRequest(f"{name}={value[:20]!r} is not a whole number of tokens from 0 to {MAX_TOKENS}")
    return int(value)


def pair_filter(
    agents_hash: str | None = None,
    slide: str | None = None,
    project: Annotated[str | None, Query(max_length=200)] = None,
    min_tokens: str | None = None,
    max_tokens: str | None = None,
    trimmed: str | None = None,
    revise_changed: str | None = None,
    review: str | None = None,
    text: Annotated[str | None, Query(max_length=200)] = None,
) -> PairFilter:
    """The query parameters of ``/pairs`` and ``/api/pairs``; an empty one (a form's blank field) is unset."""
    if agents_hash:
        data.check_agents_hash(agents_hash)
    if slide:
        data.check_slide_id(slide)
    if review and review not in REVIEW_STATES:
        raise data.BadRequest(f"review {review[:40]!r} is not one of {', '.join(REVIEW_STATES)}")
    return PairFilter(
        agents_hash=agents_hash or None,
        slide_id=slide or None,
        project=project or None,
        min_tokens=_count("min_tokens", min_tokens),
        max_tokens=_count("max_tokens", max_tokens),
        trimmed=_flag("trimmed", trimmed),
        revise_changed=_flag("revise_changed", revise_changed),
        review=review or None,  # type: ignore[arg-type]  # checked above
        text=text or None,
    )


@router.get("/pairs")
def pairs(
    request: Request,
    flt: Annotated[PairFilter, Depends(pair_filter)],
    page: Annotated[int, Query(ge=1)] = 1,
    size: Annotated[int | None, Query(ge=1, le=MAX_PAGE_SIZE)] = None,
) -> Any:
    ctx = _ctx(request)
    return views.pairs_view(ctx, flt, page, size or ctx.settings.serve.page_size)


class ReviewRequest(BaseModel):
    """``POST /api/reviews``: a verdict on one pair. ``agents_hash`` and ``slide_id`` say which pair when the patch
    was captioned under several agents_hashes (the patch page always sends them)."""

    model_config = ConfigDict(extra="forbid")

    patch_id: str = Field(min_length=1, max_length=200)
    verdict: Literal["accept", "reject", "correct"]
    reason: str | None = Field(None, max_length=MAX_REASON_CHARS)
    caption: str | None = Field(None, max_length=MAX_CAPTION_CHARS)
    agents_hash: str | None = Field(None, max_length=64)
    slide_id: str | None = Field(None, max_length=300)


@router.get("/reviews")
def reviews(request: Request, agents_hash: str, slide: str) -> Any:
    ctx = _ctx(request)
    ctx.reviews.refresh()
    latest = ctx.reviews.slide(data.check_agents_hash(agents_hash), data.check_slide_id(slide))
    return {
        "agents_hash": agents_hash,
        "slide_id": slide,
        "reviews": [r.model_dump(mode="json") for r in latest.values()],
    }


@router.post("/reviews")
async def post_review(request: Request, body: ReviewRequest) -> Any:
    ctx = _ctx(request)
    if ctx.read_only:
        return _error(403, f"this browser is read-only ({ctx.read_only_reason}): reviews cannot be saved")
    reviewer = ctx.reviewer_of(request)
    if not reviewer:
        return _error(403, f"no reviewer: {ctx.no_reviewer()} " + PROXY_HELP.format(header=ctx.reviewer_header))
    return await run_in_threadpool(_save, ctx, body, reviewer)


def _save(ctx: ServeContext, body: ReviewRequest, reviewer: str) -> Any:
    locations = data.locate_patch(ctx.store, ctx.index, ctx.locations, body.patch_id, body.slide_id, body.agents_hash)
    pairs = [loc for loc in locations if loc.agents_hash]
    if not pairs:
        return _error(404, f"patch {body.patch_id!r} has no caption yet: only a pair can be reviewed")
    if len(pairs) > 1:
        hashes = ", ".join(loc.agents_hash or "" for loc in pairs)
        return _error(409, f"patch {body.patch_id!r} was captioned under several agents_hashes ({hashes}): "
                           "say which with agents_hash")  # fmt: skip
    pair = pairs[0]
    try:
        review = Review(
            patch_id=body.patch_id, verdict=body.verdict, reason=body.reason, caption=body.caption, reviewer=reviewer
        )
    except ValidationError as exc:
        return _error(422, "; ".join(str(e.get("msg")).removeprefix("Value error, ") for e in exc.errors()))
    try:
        save_review(ctx.store, pair.agents_hash, pair.slide_id, review)
    except ReviewConflictError as exc:
        return _error(409, str(exc))
    except ValueError as exc:  # the slide's review file is not one (corrupt, foreign): nothing is overwritten
        return _error(409, str(exc))
    except PermissionError as exc:
        return _refused(ctx, exc)
    except OSError as exc:
        if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            return _refused(ctx, exc)
        raise
    ctx.reviews.refresh()
    saved = {"review": review.model_dump(mode="json"), "key": review_key(pair.agents_hash, pair.slide_id)}
    return JSONResponse(saved | {"agents_hash": pair.agents_hash, "slide_id": pair.slide_id}, status_code=201)


def _refused(ctx: ServeContext, exc: OSError) -> JSONResponse:
    """The store refused the write: the browser turns read-only (buttons disabled) and says why."""
    ctx.read_only, ctx.read_only_reason = True, f"the store refused a review ({type(exc).__name__})"
    why = exc.strerror or short_error(exc)
    return _error(403, f"the store {ctx.store.url} is read-only: the review was not saved ({why})")
