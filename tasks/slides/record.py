"""The typed record of one slide's extraction, written as ``slides/<slide_id>/slide.json`` (last, so that a record
with ``status: ok`` means everything it names is committed and whole)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class LevelInfo(BaseModel):
    level: int
    width: int
    height: int
    downsample: float


class SlideRecord(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    slide_id: str
    status: Literal["ok", "failed"] = "failed"
    error: str | None = None
    # where the slide came from
    source_uri: str
    origin: str
    project: str | None = None
    file_id: str | None = None
    md5: str | None = None
    # what was asked for
    target_mpp: float
    patch_px: int
    selection: dict[str, Any] = Field(default_factory=dict)
    tissue_threshold: float
    extraction_hash: str
    # what the slide turned out to be (kept in a failed record when it was learned before the failure)
    vendor: str | None = None
    backend: str | None = None
    tile_reader: bool | None = None
    width: int | None = None
    height: int | None = None
    levels: list[LevelInfo] = Field(default_factory=list)
    mpp: float | None = None
    mpp_source: str | None = None
    objective_power: float | None = None
    upsampled: bool | None = None
    read_level: int | None = None
    # what was made
    random_weights: bool = False
    counts: dict[str, Any] = Field(default_factory=lambda: {"kept": 0})
    seconds: dict[str, float] = Field(default_factory=dict)
    shard: str | None = None
    thumbnail: str | None = None
    selection_png: str | None = None
    schema_version: str
    factory_version: str
    created_at: str | None = None

    @property
    def kept(self) -> int:
        return int(self.counts.get("kept", 0))

    def failed(self, error: str) -> SlideRecord:
        """This record as a failure: what was learned about the slide stays, counts and outputs go."""
        return self.model_copy(
            update={"status": "failed", "error": error, "counts": {"kept": 0}, "seconds": {}, "shard": None}
        )
