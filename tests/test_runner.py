"""The one runner every slide stage goes through (tasks/work/runner.py): a parent of parts runs its parts and plans
nothing; any other run plans from the store, runs only the pending units in groups, counts the done ones as skipped,
and finishes the summary one way: ``failed`` counts units, ``failed_items`` the items that failed inside them.
Extraction plans like the other stages: a slide whose current extraction is committed never reaches a task."""

from __future__ import annotations

import logging

import pytest

import tasks.work.runner as runner
from pathgen.errors import StorageError
from tasks.work.planning import read_committed
from tasks.work.runner import Finish, Parts, Stage, finish_stage, run_stage
from tasks.work.units import NoUnitSucceeded, UnitOutcome, UnitPlan, summarize

from .conftest import CMU

log = logging.getLogger("test-runner")


def _stage(**kwargs) -> Stage:
    return Stage("caption", task=None, unit_id=str, **kwargs)


def test_summaries_count_failed_units_and_failed_items_apart():
    outcomes = [
        UnitOutcome("a", "ok", 5, columns={"failed": 2}),
        UnitOutcome("b", "failed", error="unreadable"),
        UnitOutcome("c", "pending", error="store down"),
        UnitOutcome("d", "skipped", 3),
    ]
    slides = summarize("caption", outcomes)
    counts = (slides["slides"], slides["ok"], slides["failed"], slides["failed_items"], slides["items"])
    assert counts == (4, 1, 1, 2, 8)
    assert slides["failed_slides"] == [{"slide_id": "b", "error": "unreadable"}]
    assert slides["pending_slides"] == [{"slide_id": "c", "error": "store down"}]
    datasets = summarize("evaluate", outcomes, "datasets", "dataset")
    assert datasets["datasets"] == 4 and "slides" not in datasets and "failed_slides" not in datasets
    assert datasets["failed_datasets"] == [{"dataset": "b", "error": "unreadable"}]


def test_finish_names_items_adds_up_columns_and_requires_a_done_unit_only_of_a_whole_run():
    outcomes = [
        UnitOutcome("a", "ok", 4, columns={"failed": 1, "failures": "describe:empty: 1", "max_tokens": 40}),
        UnitOutcome("b", "ok", 2, columns={"failed": 2, "failures": "describe:empty: 2", "max_tokens": 70}),
    ]
    finish = Finish(items="pairs", fields={"agents_hash": "h"}, tallies=("failures",), maxima=("max_tokens",))
    summary = finish_stage(_stage(finish=finish), summarize("caption", outcomes), outcomes, log)
    assert (summary["pairs"], summary["failed_items"], summary["agents_hash"]) == (6, 3, "h")
    assert summary["failures"] == {"describe:empty": 3} and summary["max_tokens"] == 70
    failed = [UnitOutcome("a", "failed", error="no tissue")]
    required = _stage(finish=Finish(required=True))
    with pytest.raises(NoUnitSucceeded, match="no slide succeeded"):
        finish_stage(required, summarize("extract", failed), failed, log)
    a_part = _stage(finish=Finish(required=True), parts=Parts(4, 1))
    assert finish_stage(a_part, summarize("extract", failed), failed, log)["failed"] == 1  # its parent judges


@pytest.fixture
def no_prefect(monkeypatch):
    """The runner's Prefect calls recorded instead of made."""
    calls: dict[str, list] = {"groups": [], "published": [], "parts": []}
    monkeypatch.setattr(runner, "record_worker", lambda *args: None)
    monkeypatch.setattr(runner, "name_flow_run", lambda *args: None)
    monkeypatch.setattr(runner, "publish_summary", lambda summary, units: calls["published"].append(units))

    def run_units(stage, groups, settings, logger):
        calls["groups"].append(groups)
        return [UnitOutcome(unit, "ok", 1) for group in groups for unit in group]

    def run_parts(name, flow, parameters, count, logger, timeout, units):
        calls["parts"].append((name, flow, parameters, count, units))
        return summarize(name, [UnitOutcome("a", "ok", 1)], units)

    monkeypatch.setattr(runner, "run_units", run_units)
    monkeypatch.setattr(runner, "run_parts", run_parts)
    return calls


def test_a_run_runs_only_its_pending_units_in_groups_and_counts_the_done_ones_skipped(no_prefect):
    from pathgen.settings import load_settings

    settings = load_settings(environ={})
    plan = UnitPlan(["b", "c", "d"], ["a"], {"a": UnitOutcome("a", "skipped", 7)})
    summary = run_stage(_stage(group_size=2, finish=Finish(items="pairs")), lambda: plan, settings, log)
    assert no_prefect["groups"] == [[["b", "c"], ["d"]]] and no_prefect["published"] == ["slides"]
    assert (summary["ok"], summary["skipped"], summary["pairs"], summary["slides"]) == (3, 1, 10, 4)


def test_the_parent_of_parts_runs_its_parts_and_plans_nothing(no_prefect):
    from pathgen.settings import load_settings

    def plan() -> UnitPlan:
        raise AssertionError("a parent of parts plans nothing: each part plans its own share")

    stage = _stage(parts=Parts(3, None, flow="the flow", parameters={"store": "s"}))
    summary = run_stage(stage, plan, load_settings(environ={}), log)
    assert no_prefect["parts"] == [("caption", "the flow", {"store": "s"}, 3, "slides")] and summary["ok"] == 1
    assert no_prefect["groups"] == []


def test_extraction_plans_from_the_store_a_committed_slide_never_reaches_a_task(extracted_store):
    from pathgen.settings import load_settings
    from tasks.slides.extract import plan_extraction
    from tasks.slides.sources import resolve_sources
    from tasks.store.objects import Store

    as_extracted = {"store": str(extracted_store), "patch.patch_px": 224, "selection.max_per_slide": 12}
    settings = load_settings(overrides=as_extracted, environ={})
    refs = resolve_sources([str(CMU)], settings)
    plan = plan_extraction(refs, settings, Store(settings.store))
    assert plan.pending == [] and plan.done == [CMU.stem]
    (skipped,) = plan.skipped()
    assert (skipped.status, skipped.items) == ("skipped", 12)  # its kept patches count in the run's summary
    other = load_settings(overrides={**as_extracted, "patch.patch_px": 256}, environ={})
    replanned = plan_extraction(resolve_sources([str(CMU)], other), other, Store(other.store))
    assert [ref.slide_id for ref in replanned.pending] == [CMU.stem] and replanned.done == []


def test_a_plan_leaves_unreadable_slides_to_their_tasks_and_stops_reading_a_store_that_does_not_answer(caplog):
    logger = logging.getLogger("test.planning")

    def read(unit: str):
        if unit == "bad":
            raise ValueError("its record's created_at is not a time")
        return f"record of {unit}"

    units = ["a", "bad", "c"]
    assert read_committed(units, read, str, logger) == ["record of a", None, "record of c"]
    assert "bad: cannot be planned" in caplog.text

    tried: list[str] = []

    def down(unit: str):
        tried.append(unit)
        raise StorageError("the store does not answer")

    many = [f"s{i:03d}" for i in range(200)]
    assert read_committed(many, down, str, logger) == [None] * 200
    assert len(tried) < 50  # after the first infrastructure error the rest are not read, each with its retries
    assert f"{200 - len(tried)} more slides are left to their tasks" in caplog.text
