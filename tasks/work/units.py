"""Work units: one slide per unit, for every stage, and what became of each.

A unit's output under one settings hash is one object whose existence marks it done. A unit ends in one of four
states: ``ok`` (committed now), ``skipped`` (already committed), ``failed`` (its content is the problem: final,
recorded with the reason) or ``pending`` (infrastructure failed: nothing committed, the next run does it).
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
from dataclasses import dataclass, field
from typing import Any, Literal

Status = Literal["ok", "skipped", "failed", "pending"]
DONE: tuple[Status, ...] = ("ok", "skipped")


@dataclass
class UnitOutcome:
    unit: str  # the slide id
    status: Status
    items: int = 0  # patches kept, pairs written
    seconds: float = 0.0
    error: str | None = None
    random_weights: bool = False
    columns: dict[str, Any] = field(default_factory=dict)  # the stage's own columns for the run's table

    def row(self, unit_column: str = "slide") -> dict[str, Any]:
        """Unit, status, items, seconds and error first: what a person scans for in the UI."""
        return {
            unit_column: self.unit,
            "status": self.status,
            "items": self.items,
            "seconds": round(self.seconds, 3),
            "error": self.error or "",
            **self.columns,
            "random_weights": self.random_weights,
        }


class PendingWork(RuntimeError):
    """Raised by a task when infrastructure failed for some of its units, so that Prefect retries the task; it
    carries the outcomes of the units that did finish, which the runner keeps if the retries fail too."""

    def __init__(self, message: str, outcomes: list[UnitOutcome]) -> None:
        super().__init__(message)
        self.outcomes = outcomes


def part_of(unit: str, parts: int) -> int:
    """The part a unit belongs to: a stable hash of its id, the same on every machine and in every run."""
    return int(hashlib.sha256(unit.encode()).hexdigest()[:12], 16) % parts


def in_part(units: list[Any], part: int | None, parts: int, key=str) -> list[Any]:
    if part is None or parts <= 1:
        return list(units)
    if not 0 <= part < parts:
        raise ValueError(f"part {part} is outside 0..{parts - 1}; parts are numbered from 0")
    return [u for u in units if part_of(key(u), parts) == part]


def groups_of(units: list[Any], size: int) -> list[list[Any]]:
    return [units[i : i + size] for i in range(0, len(units), size)]


def summarize(stage: str, outcomes: list[UnitOutcome]) -> dict[str, Any]:
    by = {s: [o for o in outcomes if o.status == s] for s in ("ok", "skipped", "failed", "pending")}
    return {
        "stage": stage,
        "slides": len(outcomes),
        **{status: len(found) for status, found in by.items()},
        "items": sum(o.items for o in outcomes if o.status in DONE),
        "failed_slides": [{"slide_id": o.unit, "error": o.error} for o in by["failed"]],
        "pending_slides": [{"slide_id": o.unit, "error": o.error} for o in by["pending"]],
        "random_weights": any(o.random_weights for o in outcomes),
    }


class NoSlideSucceeded(RuntimeError):
    """A slide stage's run in which no slide succeeded (or none was found): the run fails."""


def finish_slides(
    summary: dict[str, Any], where: str, logger: logging.Logger, random_warning: str | None, required: bool = True
) -> dict[str, Any]:
    """Log a slide stage's failed and pending slides, its counts and (when random weights made its output)
    ``random_warning``; NoSlideSucceeded when ``required`` and no slide is done. ``items`` become ``patches``."""
    summary["patches"] = summary["items"]
    for failed in summary["failed_slides"]:
        logger.warning("failed: %s: %s", failed["slide_id"], failed["error"])
    for pending in summary["pending_slides"]:
        logger.warning("pending (run again): %s: %s", pending["slide_id"], pending["error"])
    counts = (summary["ok"], summary["skipped"], summary["failed"], summary["pending"], summary["patches"], where)
    logger.info("%d ok, %d already done, %d failed, %d pending; %d patches in %s", *counts)
    if summary["random_weights"] and random_warning:
        logger.warning(random_warning)
    if required and summary["ok"] + summary["skipped"] == 0:
        raise NoSlideSucceeded(
            f"no slide succeeded ({summary['failed']} failed, {summary['pending']} pending); see the errors above"
        )
    return summary


def log_pending(summary: dict[str, Any], logger: logging.Logger, random_weights_warning: str) -> None:
    """Log each slide a run left pending, and warn when random weights made its data."""
    for pending in summary["pending_slides"]:
        logger.error("pending (run again): %s: %s", pending["slide_id"], pending["error"])
    if summary["random_weights"]:
        logger.warning(random_weights_warning)


def counts_text(counts: dict[str, int]) -> str:
    """Counts as one table cell, "name: count, ...", sorted by name; :func:`tally` adds such cells up."""
    return ", ".join(f"{name}: {count}" for name, count in sorted(counts.items()))


def tally(outcomes: list[UnitOutcome], column: str) -> dict[str, int]:
    """Add up a "name: count, ..." column of the slides' outcomes."""
    counts: dict[str, int] = {}
    for outcome in outcomes:
        for item in filter(None, str(outcome.columns.get(column, "")).split(", ")):
            name, count = item.rsplit(": ", 1)
            counts[name] = counts.get(name, 0) + int(count)
    return counts


def worker_identity() -> dict[str, str]:
    """Which machine, process and GPU did the work: recorded with every shard and in the run's artifacts."""
    return {
        "host": socket.gethostname(),
        "pid": str(os.getpid()),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
    }
