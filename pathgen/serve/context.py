"""What every request of the review browser shares (``ServeContext``), and the help texts its pages and API give;
apart from app.py so that the pages and the API, which app.py mounts, import it and not the app."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import jinja2
from fastapi import Request

from pathgen.serve.data import ImageColumns, ReviewCache, ShardLocations, SlideRecords
from pathgen.serve.queries import MatchCounts, PairIndex
from pathgen.serve.tiles import SlideTiles
from pathgen.settings import Settings
from tasks.store.objects import Store

OPENSEADRAGON_FETCH = "make setup (or: npm install --prefix .vendor --no-save openseadragon@6.1.1)"
PROXY_HELP = (
    "To let a team review, keep the app on 127.0.0.1 and put an authenticating reverse proxy in front of it (e.g. "
    "nginx with auth_request, oauth2-proxy, Apache mod_auth_openidc) that sets {header} to the signed-in user and "
    "overwrites any {header} a client sends, and start pathgen serve with --behind-proxy; reviews are then stored "
    "under that name."
)


@dataclass
class ServeContext:
    """Everything a request needs, shared by all requests of the app."""

    store: Store
    reviewer: str | None
    read_only: bool
    read_only_reason: str | None
    settings: Settings
    index: PairIndex
    records: SlideRecords
    reviews: ReviewCache
    tiles: SlideTiles
    counts: MatchCounts = field(default_factory=MatchCounts)
    locations: ShardLocations = field(default_factory=ShardLocations)
    images: ImageColumns = field(default_factory=ImageColumns)
    templates: jinja2.Environment | None = None
    openseadragon: Path | None = None

    @property
    def reviewer_header(self) -> str:
        return self.settings.serve.reviewer_header

    @property
    def trusts_header(self) -> bool:
        return self.settings.serve.trust_reviewer_header

    def reviewer_of(self, request: Request) -> str | None:
        """Behind a proxy (``--behind-proxy``) its header wins; else ``--reviewer``; else nobody (a review is refused,
        saying how to name one). Without ``--behind-proxy`` the header is ignored: a client could send any name."""
        named = (request.headers.get(self.reviewer_header) or "").strip() if self.trusts_header else ""
        return named or self.reviewer

    def no_reviewer(self) -> str:
        """Why a request has no reviewer."""
        if self.trusts_header:
            return f"the request has no {self.reviewer_header} header and the app was started without --reviewer NAME."
        return "the app was started without --reviewer NAME (and without --behind-proxy, so no header names one)."
