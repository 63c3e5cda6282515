"""The one work-unit runner every stage flow uses: submit groups of units as Prefect tasks with bounded
concurrency, collect their outcomes, keep a progress artifact and a terminal bar, and publish one table artifact.

A group whose task fails after its retries never sinks the run: its units are reported ``pending`` with the
error (infrastructure failed, nothing was committed for them), and the next run picks them up.

:func:`run_stage` is a whole run of a stage that plans from the store: the parent of ``parts=N`` runs its parts
(tasks/work/parts.py); any other run records its worker, plans (the units still to do, and those done, which count
as skipped), runs the pending units in groups, and finishes: the summary, its log lines and its ``summary`` artifact.
A flow reads: resolve its inputs, build the stage, run it.
"""

from __future__ import annotations

import logging
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.futures import as_completed
from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from pathgen.errors import short_error
from pathgen.processes import bound_threads, worker_process_setup
from pathgen.settings import Settings
from tasks.store.objects import Store, remove_stale_staging
from tasks.work.parts import name_flow_run, publish_summary, record_worker, run_parts
from tasks.work.units import (
    NoUnitSucceeded,
    PendingWork,
    UnitOutcome,
    UnitPlan,
    counts_text,
    groups_of,
    summarize,
    tally,
)


@dataclass
class Parts:
    """A run's share of a stage: part ``part`` of ``count`` (None: every unit, or the parent of ``count`` parts)."""

    count: int = 1
    part: int | None = None
    flow: Any = None  # the stage's flow, which the parent runs once per part
    parameters: dict[str, Any] = field(default_factory=dict)  # the flow's parameters, but parts and part

    @property
    def parent(self) -> bool:
        return self.count > 1 and self.part is None


@dataclass
class Finish:
    """How a run of a stage is summed up: what its items are, where they went, what the summary adds."""

    items: str = "items"  # what a unit's items are called in the summary and the log: patches, pairs...
    where: str = ""  # where the output went, for the log
    random_warning: str = ""  # logged when random weights made the output
    random_weights: bool = False  # known before the run: the stage's model has random weights
    required: bool = False  # the run fails (NoUnitSucceeded) when no unit is done
    fields: dict[str, Any] = field(default_factory=dict)  # the stage's own summary entries: store, hashes, prefixes
    tallies: tuple[str, ...] = ()  # "name: count" columns of the units, added up into the summary
    maxima: tuple[str, ...] = ()  # number columns of the units whose largest value goes into the summary


@dataclass
class Stage:
    """How one stage runs its units: the task, its tags, how many groups at once, and in what."""

    name: str  # extract | caption | ...
    task: Any  # a Prefect task taking (units=list, settings=Settings, **extra) -> list[UnitOutcome]
    unit_id: Callable[[Any], str]
    concurrency: int = 1
    processes: bool = False
    tags: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    table_description: str = ""
    units: str = "slides"  # what a unit is, in artifact keys, progress text and summary keys
    unit_column: str = "slide"  # the first column of the table artifact
    unit_key: str = "slide_id"  # the id's key in the summary's lists of failed and pending units
    group_size: int = 1  # units to a task
    run_name: str = ""  # the flow run's name: the count of units to do (and the part) are added
    parts: Parts = field(default_factory=Parts)
    finish: Finish = field(default_factory=Finish)


def _task_options(stage: Stage, settings: Settings) -> Any:
    retry = settings.retries
    delays = [retry.task_retry_delay_seconds * 4**i for i in range(retry.task_retries)]
    return stage.task.with_options(
        tags=sorted(set(stage.tags) | {stage.name}), retries=retry.task_retries, retry_delay_seconds=delays or 0
    )


# The units of the runs in this process that have not reported back yet, by (stage, kind of unit): what a command
# names as pending when it must stop early (pathgen/local_api.py: its Prefect API lost). A run cut short by an
# exception keeps its entry until the stage runs again here, so that the command can still name them.
_unfinished: dict[tuple[str, str], list[str]] = {}


def unfinished_units() -> dict[tuple[str, str], list[str]]:
    """(stage, kind of unit) -> the ids of its units that have no outcome yet, for the runs in this process."""
    return {key: sorted(units) for key, units in list(_unfinished.items()) if units}


def run_units(stage: Stage, groups: list[list[Any]], settings: Settings, logger: logging.Logger) -> list[UnitOutcome]:
    """Run every group; one outcome per unit, sorted by unit id."""
    key = (stage.name, stage.units)
    _unfinished[key] = [stage.unit_id(u) for group in groups for u in group]
    outcomes = _run_groups(stage, groups, settings, logger)
    _unfinished.pop(key, None)
    return outcomes


def _run_groups(stage: Stage, groups: list[list[Any]], settings: Settings, logger: logging.Logger) -> list[UnitOutcome]:
    bound_threads()  # a flow run started by a worker never went through the CLI: bound its threads here too
    total = sum(len(g) for g in groups)
    # Runs that overlap (two workers, a run started while another goes) start on different groups and then skip
    # what the other committed, instead of racing through the same slides in the same order.
    start = random.randrange(len(groups)) if groups else 0
    groups = groups[start:] + groups[:start]
    progress_id = create_progress_artifact(
        0.0 if total else 100.0, key=f"{stage.name}-progress", description=f"{stage.units} done"
    )
    outcomes: list[UnitOutcome] = []
    workers = max(1, min(stage.concurrency, len(groups)))
    if stage.processes and workers > 1:
        # Workers die with this process and keep to their thread budget, even while idle on the call queue.
        runner = ProcessPoolTaskRunner(max_workers=workers, initializer=worker_process_setup)
    else:
        runner = ThreadPoolTaskRunner(max_workers=workers)
    task = _task_options(stage, settings)
    with runner, _progress_bar(stage.name, total, stage.units) as (bar, bar_task):
        futures = {
            runner.submit(task, {"units": group, "settings": settings, **stage.extra}): group for group in groups
        }
        for future in as_completed(list(futures)):
            group = futures[future]
            done = _collect(future, group, stage, logger)
            outcomes.extend(done)
            _reported(stage, done)
            bar.update(bar_task, advance=len(group))
            # a unit can give several outcomes (a dataset holding two tasks): the share done never passes 100%
            update_progress_artifact(progress_id, min(100.0, 100.0 * len(outcomes) / max(total, 1)))
    outcomes.sort(key=lambda o: o.unit)
    create_table_artifact(
        [o.row(stage.unit_column) for o in outcomes],
        key=f"{stage.name}-{stage.units}",
        description=stage.table_description or stage.name,
    )
    return outcomes


def _reported(stage: Stage, outcomes: list[UnitOutcome]) -> None:
    """Units with a final outcome (committed, skipped, failed) leave the unfinished list; pending ones stay on it."""
    finished = {o.unit for o in outcomes if o.status != "pending"}
    key = (stage.name, stage.units)
    _unfinished[key] = [u for u in _unfinished.get(key, []) if u not in finished]


def _collect(future: Any, group: list[Any], stage: Stage, logger: logging.Logger) -> list[UnitOutcome]:
    try:
        return list(future.result())
    except PendingWork as exc:  # some units finished before infrastructure failed for the rest
        logger.error("%s: %s", stage.name, exc)
        return exc.outcomes
    except Exception as exc:  # noqa: BLE001 - a lost group is reported pending; the other groups go on
        error = short_error(exc)
        logger.error("%s: a task for %d %s failed, they stay pending: %s", stage.name, len(group), stage.units, error)
        return [UnitOutcome(stage.unit_id(u), "pending", error=error) for u in group]


class _progress_bar:
    """A terminal bar on stderr while units finish; silent when stderr is not a terminal."""

    def __init__(self, name: str, total: int, units: str = "slides") -> None:
        self.progress = Progress(
            TextColumn(name),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            disable=not sys.stderr.isatty(),
            transient=False,
        )
        self.total, self.units = total, units

    def __enter__(self):
        self.progress.start()
        return self.progress, self.progress.add_task(self.units, total=self.total)

    def __exit__(self, *exc) -> None:
        self.progress.stop()


def open_store(settings: Settings, prefixes: list[str], logger: logging.Logger) -> Store:
    """The run's store, checked; temporary objects and staged files that crashed runs left behind are removed."""
    store = Store(settings.store, settings.s3)
    store.check()
    grace = settings.cleanup.stale_temp_grace_seconds
    removed = store.remove_stale_temporaries(prefixes, grace) + remove_stale_staging(grace)
    if removed:
        logger.info("removed %d temporary objects left by crashed runs", removed)
    return store


def run_stage(stage: Stage, plan: Callable[[], UnitPlan], settings: Settings, logger: logging.Logger) -> dict:
    """A run of the stage: its parts when it is their parent, else ``plan()``'s pending units in groups of
    ``stage.group_size``, its done ones counting as skipped; returns the finished summary."""
    parts = stage.parts
    if parts.parent:
        timeout = settings.parts.timeout_seconds
        summary = run_parts(stage.name, parts.flow, parts.parameters, parts.count, logger, timeout, stage.units)
        return finish_stage(stage, summary, [], logger)
    record_worker(stage.name, parts.part, parts.count)
    planned = plan()
    if stage.run_name:
        name_flow_run(f"{stage.run_name}-{len(planned.pending)}-{stage.units}", parts.part, parts.count)
    logger.info("%s: %d %s done, %d to do", stage.name, len(planned.done), stage.units, len(planned.pending))
    outcomes = run_units(stage, groups_of(planned.pending, stage.group_size), settings, logger) + planned.skipped()
    summary = finish_stage(stage, summarize(stage.name, outcomes, stage.units, stage.unit_key), outcomes, logger)
    publish_summary(summary, stage.units)
    return summary


def finish_stage(stage: Stage, summary: dict, outcomes: list[UnitOutcome], logger: logging.Logger) -> dict:
    """The summary with the stage's own entries (``stage.finish``), logged; NoUnitSucceeded when the stage requires
    a unit done and none is (a part's run never requires it: its parent judges the whole)."""
    finish = stage.finish
    summary.update(finish.fields)
    summary[finish.items] = summary["items"]
    for column in finish.tallies:  # a parent's outcomes are its parts': their tallies are not in its summary
        summary[column] = tally(outcomes, column) or summary.get(column, {})
    for column in finish.maxima:
        summary[column] = max([int(o.columns.get(column, 0)) for o in outcomes] + [int(summary.get(column, 0) or 0)])
    summary["random_weights"] = bool(summary.get("random_weights")) or finish.random_weights
    _log_summary(stage, summary, logger)
    done = summary["ok"] + summary["skipped"]
    if finish.required and stage.parts.part is None and done == 0:
        raise NoUnitSucceeded(
            f"no {stage.units[:-1]} succeeded ({summary['failed']} failed, {summary['pending']} pending); "
            "see the errors above"
        )
    return summary


def _log_summary(stage: Stage, summary: dict, logger: logging.Logger) -> None:
    for failed in summary.get(f"failed_{stage.units}", []):
        logger.warning("failed: %s: %s", failed[stage.unit_key], failed["error"])
    for pending in summary.get(f"pending_{stage.units}", []):
        logger.warning("pending (run again): %s: %s", pending[stage.unit_key], pending["error"])
    finish = stage.finish
    failed_items = summary.get("failed_items", 0)
    # the failures by reason (caption, instruct) and the other tallies: what a person watching a worker looks for
    tallies = "".join(f"; {column}: {counts_text(summary[column])}" for column in finish.tallies if summary[column])
    logger.info(
        "%d ok, %d already done, %d failed, %d pending; %d %s%s in %s%s",
        *(summary["ok"], summary["skipped"], summary["failed"], summary["pending"], summary["items"], finish.items),
        f" ({failed_items} failed items)" if failed_items else "",
        *(finish.where, tallies),
    )
    if summary["random_weights"] and finish.random_warning:
        logger.warning(finish.random_warning)


def finish_training(
    summary: dict[str, Any], name: str, logger: logging.Logger, random_warning: str = "", error: str | None = None
) -> dict[str, Any]:
    """A training flow's summary (its units are its stages, run one after another), logged: the error that stopped
    it (None when every stage is done), the random-weights warning, and each stage with what it made."""
    summary["error"] = error
    if error:
        logger.error("%s: %s", name, error)
    if random_warning:
        logger.warning(random_warning)
    for stage in summary["stages"]:
        made = stage.get("checkpoint") or stage.get("model") or stage.get("error") or ""
        logger.info("%s: %s %s", stage["stage"], stage["status"], made)
    return summary
