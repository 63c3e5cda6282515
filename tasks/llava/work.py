"""The PathGen-LLaVA stages as work units for the shared runner: one unit per stage, ``{stage, data}``.

Bad data (a malformed record, a missing image, too few conversations for a batch) fails its unit with the reason;
anything else (storage, the device, torchrun) raises, so the unit stays pending and the runner retries it.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task

from pathgen.errors import retry_infrastructure, short_error
from pathgen.settings import Settings
from tasks.llava.plan import RUNS
from tasks.llava.spec import random_llava_models
from tasks.llava.stages import build_base, fetch_model, stage_plan, train_stage, work_root
from tasks.llava.vision import vision_source
from tasks.store.objects import Store
from tasks.work.units import UnitOutcome


def start_folder(
    settings: Settings, run: str, stage: str, data: Path, vision: str, random: bool, logger
) -> tuple[Path, dict]:
    """Where a stage starts: stage 1 from the untrained model (built here), stage 2 from stage 1's model (brought
    here from the store when stage 1 ran elsewhere; the untrained model when the data has no stage 1)."""
    base = work_root(settings.llava) / "runs" / run / "base"
    store = Store(settings.store, settings.s3)
    if stage == "stage2" and store.exists(f"{RUNS}/{run}/stage1/stage.json"):
        return fetch_model(store, stage_plan(settings, run, "stage1", data, base, random)), {}
    if stage == "stage2":
        logger.warning("%s: no stage 1 in this run; stage 2 starts from an untrained projector", run)
    plan = stage_plan(settings, run, stage, data, base, random)
    if store.exists(f"{plan.prefix}/stage.json"):
        return base, {}  # done: nothing will start from it
    return base, build_base(settings, vision_source(vision), base, logger)


def train_units(
    units: list[dict[str, Any]], settings: Settings, run: str, vision: str, logger: logging.Logger
) -> list[UnitOutcome]:
    # ``vision``: the tower as the flow resolved it once (an unset one is the store's newest PathGen-CLIP).
    random = bool(random_llava_models(settings, vision_source(vision)))
    outcomes = []
    for unit in units:
        started = time.perf_counter()
        data = Path(unit["data"])
        try:
            start, check = start_folder(settings, run, unit["stage"], data, vision, random, logger)
            result = train_stage(stage_plan(settings, run, unit["stage"], data, start, random), logger)
        except ValueError as exc:  # the data or the settings: the same inputs would fail again
            outcomes.append(UnitOutcome(unit["stage"], "failed", error=short_error(exc), random_weights=random))
            continue
        logger.info("%s %s: %d steps, loss %s -> %s, %s", run, unit["stage"], result.steps, result.first_loss,
                    result.last_loss, result.model)  # fmt: skip
        columns = result.row() | ({"conversion_max_abs_diff": max(check.values())} if check else {})
        status = "ok" if result.trained else "skipped"
        seconds = time.perf_counter() - started
        outcomes.append(UnitOutcome(unit["stage"], status, result.steps, seconds, None, result.random_weights, columns))
    return outcomes


@task(name="llava-train", retry_condition_fn=retry_infrastructure, tags=["llava", "gpu"])
def train_task(units: list[dict[str, Any]], settings: Settings, run: str, vision: str) -> list[UnitOutcome]:
    return train_units(units, settings, run, vision, get_run_logger())


def export_units(units: list[dict[str, Any]], settings: Settings, logger: logging.Logger) -> list[UnitOutcome]:
    """Export the store's pairs and instruction data as a LLaVA folder (``pathgen export llava``'s exporter)."""
    from tasks.instruct.export import export_llava

    store = Store(settings.store, settings.s3)
    outcomes = []
    for unit in units:
        started = time.perf_counter()
        Path(unit["out"]).parent.mkdir(parents=True, exist_ok=True)
        try:
            result = export_llava(store, unit["out"], reviews=settings.export.reviews)
        except ValueError as exc:  # nothing to export, several sets to choose from, a patch_id that is a path
            outcomes.append(UnitOutcome("llava", "failed", error=short_error(exc)))
            continue
        logger.info("exported %d caption pairs and %d conversations to %s (%d images written, %d up to date)",
                    result.stage1, result.stage2, result.out, result.written,
                    result.images - result.written)  # fmt: skip
        status, error = ("ok", None) if result.stage1 else ("failed", "no caption pairs to train stage 1 on")
        columns = {"out": str(result.out), "stage1": result.stage1, "stage2": result.stage2}
        seconds = time.perf_counter() - started
        outcomes.append(UnitOutcome("llava", status, result.stage1, seconds, error, result.random_weights, columns))
    return outcomes


@task(name="llava-export", retry_condition_fn=retry_infrastructure, tags=["llava"])
def export_task(units: list[dict[str, Any]], settings: Settings) -> list[UnitOutcome]:
    return export_units(units, settings, get_run_logger())
