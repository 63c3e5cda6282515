"""The pages: ``/slides``, ``/slides/<slide_id>``, ``/patches/<patch_id>``, ``/pairs?page=N&...``; Jinja2 templates
(autoescaped) over the same views the JSON API returns."""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import HTMLResponse

from pathgen.serve import data, views
from pathgen.serve.api import MAX_PAGE_SIZE, pair_filter
from pathgen.serve.context import PROXY_HELP, ServeContext
from pathgen.serve.queries import REVIEW_STATES, PairFilter

router = APIRouter()


def _render(request: Request, template: str, title: str, **values: Any) -> HTMLResponse:
    ctx: ServeContext = request.app.state.ctx
    page = ctx.templates.get_template(template).render(
        ctx=ctx,
        title=title,
        reviewer=ctx.reviewer_of(request),
        proxy_help=PROXY_HELP.format(header=ctx.reviewer_header),
        **values,
    )
    return HTMLResponse(page)


@router.get("/slides", response_class=HTMLResponse)
def slides_page(request: Request, query: Annotated[data.SlideQuery, Depends()]) -> HTMLResponse:
    view = views.slides_view(request.app.state.ctx, query)

    def sort_link(column: str) -> str:
        flip = "desc" if query.sort == column and query.order == "asc" else "asc"
        filters = {k: v for k, v in query.as_query().items() if k not in ("sort", "order")}
        return "/slides?" + urlencode(filters | {"sort": column, "order": flip})

    return _render(request, "slides.html", "Slides", view=view, sort=query.sort, order=query.order,
                   sort_link=sort_link, random_weights=view["random_weights"])  # fmt: skip


@router.get("/slides/{slide_id}", response_class=HTMLResponse)
def slide_page(request: Request, slide_id: str) -> HTMLResponse:
    view = views.slide_view(request.app.state.ctx, data.check_slide_id(slide_id))
    return _render(request, "slide.html", f"Slide {slide_id}", view=view, random_weights=view["random_weights"])


@router.get("/patches/{patch_id}", response_class=HTMLResponse)
def patch_page(
    request: Request, patch_id: str, slide: str | None = None, agents_hash: str | None = None
) -> HTMLResponse:
    view = views.patch_view(request.app.state.ctx, data.check_patch_id(patch_id), slide or None, agents_hash or None)
    return _render(request, "patch.html", f"Patch {patch_id}", view=view, random_weights=view["random_weights"])


@router.get("/pairs", response_class=HTMLResponse)
def pairs_page(
    request: Request,
    flt: Annotated[PairFilter, Depends(pair_filter)],
    page: Annotated[int, Query(ge=1)] = 1,
    size: Annotated[int | None, Query(ge=1, le=MAX_PAGE_SIZE)] = None,
) -> HTMLResponse:
    ctx: ServeContext = request.app.state.ctx
    view = views.pairs_view(ctx, flt, page, size or ctx.settings.serve.page_size)
    query = flt.as_query() | ({"size": str(size)} if size else {})
    # the filter's field names as the query spells them (PairFilter.slide_id is ?slide=)
    query = {("slide" if k == "slide_id" else k): v for k, v in query.items()}

    def page_link(number: int) -> str:
        return "/pairs?" + urlencode(query | {"page": str(number)})

    return _render(request, "pairs.html", "Pairs", view=view, page_link=page_link, query=query,
                   review_states=REVIEW_STATES, random_weights=view["random_weights"])  # fmt: skip
