"""Settings of the review: the review browser (pathgen serve) and what exports do with the reviews."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from pathgen.settings.base import (
    Section,
)


class ExportSettings(Section):
    """What every export of pairs (PathGen JSON, WebDataset, LLaVA) does with the reviews under reviews/."""

    reviews: Literal["apply", "ignore"] = Field(
        "apply",
        description="apply: leave out rejected pairs and use corrected captions (the latest review of a pair counts); "
        "ignore: export the pairs as generated. Either way the export's provenance counts the reviews",
    )


class ServeSettings(Section):
    """``pathgen serve``: the review browser (pathgen/serve/)."""

    reviewer_header: str = Field(
        "X-Forwarded-User",
        pattern=r"^[A-Za-z0-9-]{1,64}$",
        description="request header naming the reviewer, set by the authenticating proxy in front of the app (which "
        "must overwrite any value a client sends); read only with serve.trust_reviewer_header",
    )
    trust_reviewer_header: bool = Field(
        False,
        description="take the reviewer from serve.reviewer_header, over --reviewer (pathgen serve --behind-proxy): "
        "only behind an authenticating proxy that overwrites the header; off, the header is ignored",
    )
    allowed_hosts: list[Annotated[str, Field(pattern=r"^(\*|(\*\.)?[A-Za-z0-9.-]{1,253})$")]] = Field(
        default_factory=list,
        max_length=64,
        description="Host header names the app answers besides 127.0.0.1, localhost and the --host it binds to (the "
        "names a proxy or the reviewers use, e.g. review.example.org); other hosts get 400",
    )
    openseadragon_dir: str | None = Field(
        None,
        description="folder holding openseadragon.min.js and images/; unset: .vendor/node_modules/openseadragon/"
        "build/openseadragon in the checkout, where `make setup` installs it from npm",
    )
    page_size: int = Field(48, ge=1, le=500, description="pairs per page of the pairs grid")
    open_slides: int = Field(4, ge=1, le=64, description="slides kept open for DeepZoom tiles (LRU)")
