"""The review browser: a FastAPI app over one store (``create_app``), its pages (pages.py) and JSON API (api.py).

It reads the store through ``Store`` (file:// or s3://) and writes nothing but reviews (``reviews/``, through
tasks/reviews/store.py). Reviewer identity: ``--reviewer NAME``; or, only when the app runs behind an authenticating
proxy (``--behind-proxy``, ``serve.trust_reviewer_header``), the request header the proxy sets
(``serve.reviewer_header``, ``X-Forwarded-User`` by default; the proxy must overwrite any value a client sends), which
then wins over ``--reviewer``. Without it the header is ignored: any client can send it. The app binds to 127.0.0.1
unless told otherwise, answers only requests whose Host is this machine's loopback name or one of
``serve.allowed_hosts`` (a page of another site cannot reach it by DNS rebinding), and anyone who can reach it can
review under the ``--reviewer`` name.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import jinja2
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.middleware.trustedhost import TrustedHostMiddleware

from pathgen.serve import api, pages
from pathgen.serve.context import ServeContext
from pathgen.serve.data import BadRequest, NotFound, ReviewCache, SlideRecords
from pathgen.serve.queries import PairIndex
from pathgen.serve.tiles import SlideTiles
from pathgen.settings import Settings, load_settings
from tasks.store.objects import Store

log = logging.getLogger("pathgen.serve")
HERE = Path(__file__).resolve().parent
LOOPBACK_HOSTS = ("127.0.0.1", "localhost")
WILDCARD_BINDS = ("0.0.0.0", "::", "")
REPO_OPENSEADRAGON = HERE.parents[1] / ".vendor" / "node_modules" / "openseadragon" / "build" / "openseadragon"


def store_read_only(store: Store) -> str | None:
    """Why the store cannot take reviews, when that can be told without writing: a local store whose folder (or its
    reviews/ folder) this process may not write. An S3 store is found read-only by its first refused review."""
    if store.remote:
        return None
    for folder in (os.path.join(store.root, "reviews"), store.root):
        if os.path.isdir(folder):
            return None if os.access(folder, os.W_OK) else f"{folder} is not writable by this process"
    return f"{store.root} does not exist"


def _openseadragon(settings: Settings) -> Path | None:
    folder = Path(settings.serve.openseadragon_dir).expanduser() if settings.serve.openseadragon_dir else None
    folder = folder or REPO_OPENSEADRAGON
    return folder if (folder / "openseadragon.min.js").is_file() else None


def _templates() -> jinja2.Environment:
    # autoescape on for every template: captions and reasons are untrusted text
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(HERE / "templates")), autoescape=True, undefined=jinja2.StrictUndefined
    )
    env.filters["pct"] = lambda value: f"{value:.1%}" if isinstance(value, float) else value
    return env


def allowed_hosts(settings: Settings, host: str | None = None) -> list[str]:
    """The Host names the app answers: loopback, ``serve.allowed_hosts``, and the address it binds to (unless that is
    a wildcard, which no client sends)."""
    named = [host] if host and host not in WILDCARD_BINDS and host not in LOOPBACK_HOSTS else []
    return [*LOOPBACK_HOSTS, *settings.serve.allowed_hosts, *named]


def create_app(
    store: Store, reviewer: str | None, read_only: bool, settings: Settings | None = None, host: str | None = None
) -> FastAPI:
    """The app over ``store``; ``read_only`` (or a store this process cannot write) disables reviews. ``host``: the
    address it is bound to, a Host the app answers besides loopback and ``serve.allowed_hosts``."""
    settings = settings or load_settings(environ={})
    why = "started with --read-only" if read_only else store_read_only(store)
    ctx = ServeContext(
        store=store,
        reviewer=reviewer,
        read_only=why is not None,
        read_only_reason=why,
        settings=settings,
        index=PairIndex(store),
        records=SlideRecords(store),
        reviews=ReviewCache(store),
        tiles=SlideTiles(settings.serve.open_slides, settings.s3, settings.tissue),
        templates=_templates(),
        openseadragon=_openseadragon(settings),
    )
    # No Swagger/ReDoc pages: they load their scripts from a CDN. The schema itself is at /api/openapi.json.
    app = FastAPI(title="PathGen review browser", docs_url=None, redoc_url=None, openapi_url="/api/openapi.json")
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts(settings, host))
    app.state.ctx = ctx
    if not settings.serve.trust_reviewer_header:
        log.info(
            "the %s header is ignored (no --behind-proxy): reviews are by --reviewer %s",
            settings.serve.reviewer_header,
            reviewer or "(none: reviews are refused)",
        )
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    if ctx.openseadragon is not None:
        app.mount("/vendor/openseadragon", StaticFiles(directory=str(ctx.openseadragon)), name="openseadragon")
    app.include_router(api.router)
    app.include_router(pages.router)
    app.add_api_route("/", lambda: RedirectResponse("/slides"), include_in_schema=False)
    _errors(app, ctx)
    app.router.on_shutdown.append(ctx.tiles.close)
    return app


def _errors(app: FastAPI, ctx: ServeContext) -> None:
    """An API request gets ``{"error": sentence}``; a page gets the error page. Bad ids: 400; unknown: 404."""

    def respond(request: Request, status: int, message: str) -> Response:
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": message}, status_code=status)
        page = ctx.templates.get_template("error.html").render(
            status=status, message=message, ctx=ctx, reviewer=ctx.reviewer_of(request)
        )
        return HTMLResponse(page, status_code=status)

    @app.exception_handler(BadRequest)
    async def bad_request(request: Request, exc: BadRequest) -> Response:
        return respond(request, 400, str(exc))

    @app.exception_handler(NotFound)
    async def not_found(request: Request, exc: NotFound) -> Response:
        return respond(request, 404, str(exc))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Response:
        parts = []
        for error in exc.errors():
            where = ".".join(str(p) for p in error.get("loc", ()) if p not in ("body", "query", "path"))
            parts.append(f"{where}: {error.get('msg')}" if where else str(error.get("msg")))
        return respond(request, 422, "invalid request: " + "; ".join(parts))
