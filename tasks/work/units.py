"""Work units and what became of each: a slide for the slide stages (extract, features, caption, instruct), a
dataset, a training stage or an export for the others.

A unit's output under one settings hash is one object whose existence marks it done. A unit ends in one of four
states: ``ok`` (committed now), ``skipped`` (already committed), ``failed`` (its content is the problem: final,
recorded with the reason) or ``pending`` (infrastructure failed: nothing committed, the next run does it).

In every summary ``failed`` counts failed units; items that failed inside a unit that was committed (a patch no
caption could be written for) are counted apart, as ``failed_items``.
"""

from __future__ import annotations

import hashlib
import os
import socket
from dataclasses import dataclass, field
from typing import Any, Literal

from pathgen.errors import WorkPending

Status = Literal["ok", "skipped", "failed", "pending"]
DONE: tuple[Status, ...] = ("ok", "skipped")


@dataclass
class UnitOutcome:
    unit: str  # the unit's id: a slide id, a dataset's name, a training stage
    status: Status
    items: int = 0  # what the unit made: patches kept, pairs written
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


class PendingWork(WorkPending):
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


@dataclass(frozen=True)
class UnitPlan:
    """What a run of a stage has to do, from the store: the units still to do, and the ids of those whose outcome the
    store already holds (committed: skipped; or, where a stage records them, a content failure for the same inputs)."""

    pending: list[Any]  # the units themselves (slide ids, slide references), sorted by id
    done: list[str]  # ids of units with a final outcome in the store: reported skipped unless ``committed`` says else
    committed: dict[str, UnitOutcome] = field(default_factory=dict)  # a done unit's outcome when the store says more

    def skipped(self) -> list[UnitOutcome]:
        """The done units' outcomes: skipped, or what the store says of them."""
        return [self.committed.get(unit, UnitOutcome(unit, "skipped")) for unit in self.done]


def summarize(stage: str, outcomes: list[UnitOutcome], units: str = "slides", unit_key: str = "slide_id") -> dict:
    """A run's counts by status, named after what a unit is (``units``: ``slides`` gives ``slides``,
    ``failed_slides``, ``pending_slides`` with ``slide_id`` entries). ``failed`` counts units; ``failed_items`` the
    items that failed inside committed units (a unit's ``failed`` column)."""
    by = {s: [o for o in outcomes if o.status == s] for s in ("ok", "skipped", "failed", "pending")}
    return {
        "stage": stage,
        units: len(outcomes),
        **{status: len(found) for status, found in by.items()},
        "items": sum(o.items for o in outcomes if o.status in DONE),
        "failed_items": sum(int(o.columns.get("failed", 0) or 0) for o in outcomes),
        f"failed_{units}": [{unit_key: o.unit, "error": o.error} for o in by["failed"]],
        f"pending_{units}": [{unit_key: o.unit, "error": o.error} for o in by["pending"]],
        "random_weights": any(o.random_weights for o in outcomes),
    }


class NoUnitSucceeded(RuntimeError):
    """A run in which no unit succeeded (or none was found), where the stage needs one: the run fails."""


def counts_text(counts: dict[str, int]) -> str:
    """Counts as one table cell, "name: count, ...", sorted by name; :func:`tally` adds such cells up."""
    return ", ".join(f"{name}: {count}" for name, count in sorted(counts.items()))


def tally(outcomes: list[UnitOutcome], column: str) -> dict[str, int]:
    """Add up a "name: count, ..." column of the units' outcomes."""
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
