"""A benchmark run, model-free: which datasets of a suite a root holds (and which it lacks), the work units that
evaluate them, the run's name, and each (task, model) cell of the summary from its outcome and result.

The evaluation of one model on one task is :func:`tasks.clip.evaluate.evaluate_dataset`, the same as
``pathgen evaluate``; a benchmark only chooses the datasets and puts the models side by side.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tasks.benchmark.datasets import DatasetFormat, find_datasets, suite_formats


@dataclass(frozen=True)
class BenchmarkPlan:
    suite: str
    root: Path
    found: list[tuple[DatasetFormat, Path]]  # in the suite's order: the datasets evaluated
    missing: list[DatasetFormat]  # of the suite, not under root
    ignored: list[tuple[DatasetFormat, Path]] = field(default_factory=list)  # a format's second folder and after

    def units(self) -> list[dict[str, str]]:
        """One work unit per dataset folder; ``name`` (the format) names its row if the folder cannot be read."""
        return [{"dataset": str(folder), "format": fmt.name, "name": fmt.name} for fmt, folder in self.found]


def plan_benchmark(root: Path, suite: str) -> BenchmarkPlan:
    """The suite's datasets under ``root``. A format found in several folders is evaluated in the first (path
    order), the others are listed as ignored: two rows of one dataset would be counted twice in the mean."""
    formats = suite_formats(suite)
    located = find_datasets(Path(root), formats)
    found, ignored = [], []
    for fmt in formats:
        folders = located.get(fmt.name, [])
        if folders:
            found.append((fmt, folders[0]))
            ignored += [(fmt, folder) for folder in folders[1:]]
    missing = [fmt for fmt in formats if not located.get(fmt.name)]
    return BenchmarkPlan(suite, Path(root), found, missing, ignored)


def default_run_name(suite: str, now: datetime | None = None) -> str:
    """``<suite>-<UTC yyyymmdd-HHMMSS>``. Not a hash of the inputs, as other runs are named: the inputs are
    folders of up to 300,000 images, and hashing them would read every byte before the first is evaluated."""
    now = now or datetime.now(UTC)
    return f"{suite}-{now.astimezone(UTC):%Y%m%d-%H%M%S}"


def cell_of(outcome: dict[str, Any], result: dict[str, Any] | None) -> dict[str, Any]:
    """One (task, model) cell: the zero-shot headline and probe of an ok outcome's result, else its status and
    reason."""
    if outcome["status"] != "ok" or result is None:
        return {"status": outcome["status"], "error": outcome.get("error") or "no result"}
    zero = result["zero_shot"]
    return {
        "status": "ok",
        "n": zero["n"],
        "accuracy": zero["accuracy"],
        "balanced_accuracy": zero["balanced_accuracy"],
        "weighted_f1": zero["weighted_f1"],
        "probe": probe_headline(result.get("linear_probe")),
        "random_weights": bool(result.get("random_weights")),
        "json": outcome.get("json"),
    }


def probe_headline(probe: dict[str, Any] | None) -> dict[str, Any] | None:
    if not probe:
        return None
    if probe.get("error"):
        return {"method": probe.get("method"), "error": probe["error"]}
    headline = probe.get("headline") or probe.get("full") or {}
    keys = ("n", "balanced_accuracy", "weighted_f1")
    untrained = {"untrained_classes": probe["untrained_classes"]} if probe.get("untrained_classes") else {}
    return {"method": probe.get("method", "logistic"), **{k: headline.get(k) for k in keys}, **untrained}


def row_of(task: str, outcome: dict[str, Any], result: dict[str, Any] | None) -> dict[str, Any]:
    """What a summary row says about its dataset, from whichever model's outcome knows it."""
    result = result or {}
    return {
        "task": task,
        "format": result.get("format") or outcome.get("format"),
        "folder": result.get("folder") or outcome.get("folder"),
        "split": result.get("split"),
    }
