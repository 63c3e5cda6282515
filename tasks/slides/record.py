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


class SourceIdentity(BaseModel):
    """What the slide's bytes were when they were extracted: a changed source at the same path is extracted again.

    ``md5`` is the manifest's digest when it gives one (the content itself, so a re-download of the same bytes is
    still the same slide); otherwise a local file is known by its size and modification time and an S3 object by its
    ETag and version id. ``key`` is what the extraction hash covers."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["md5", "file", "object", "folder"]
    size: int | None = None
    mtime_ns: int | None = None
    etag: str | None = None
    version_id: str | None = None
    md5: str | None = None
    files: int | None = None  # a folder (a DICOM series, an MRXS's data files): how many files its stamp covers
    stamp: str | None = None  # a folder: sha256 of its files' names, sizes and modification times
    # When the bytes were last written (seconds since the epoch): told, and compared with the ``created_at`` of a
    # record that predates source identities; not part of ``key`` (an object uploaded again with the same ETag is
    # the same slide).
    modified: float | None = None

    @property
    def key(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True, exclude={"modified"})


class PositionProblem(BaseModel):
    """A PathGen JSON position that yielded no patch, and why."""

    x: int
    y: int
    reason: str


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
    source: SourceIdentity | None = None  # None: the source could not be examined, or extracted before it was kept
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
    mpp: float | None = None  # the mean of mpp_x and mpp_y: one figure for the slide
    mpp_x: float | None = None  # µm per level-0 pixel across; patches are read with each axis at its own scale
    mpp_y: float | None = None  # µm per level-0 pixel down (None in records written before it was kept)
    mpp_source: str | None = None
    objective_power: float | None = None
    upsampled: bool | None = None
    read_level: int | None = None
    # what was made
    failed_positions: list[PositionProblem] = Field(default_factory=list)
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
