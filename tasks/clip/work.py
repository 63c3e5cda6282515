"""The CLIP stages as work units for the shared runner: export a pair set, train a stage, evaluate a model.

A unit is a dict (a stage's pair set, a stage to train, a dataset to evaluate on). Bad content (no pairs, a dataset
folder that is not one folder per class) fails its unit with the reason; anything else (storage, the trainer,
the device) raises, so the unit stays pending and the runner retries it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task

from pathgen.settings import PairSetSettings, Settings
from tasks.clip.evaluate import evaluate, publish, table_rows
from tasks.clip.lease import RunBusy
from tasks.clip.spec import ModelSpec, parse_model_spec
from tasks.clip.stages import data_digest, export_set, stage_plan, train_stage
from tasks.clip.webdataset import ExportSummary
from tasks.errors import retry_infrastructure, short_error
from tasks.selection.embedding import load_clip_model, release_clip_models
from tasks.store.objects import Store
from tasks.work.units import UnitOutcome


def export_units(units: list[dict[str, Any]], settings: Settings, logger) -> list[UnitOutcome]:
    store = Store(settings.store, settings.s3)
    outcomes = []
    for unit in units:
        pair_set = PairSetSettings.model_validate(unit["set"])
        try:
            summary = export_set(store, pair_set, settings, logger)
        except ValueError as exc:  # the set itself is wrong: a missing folder, an unreadable captions file
            outcomes.append(UnitOutcome(unit["stage"], "failed", error=short_error(exc)))
            continue
        logger.info(
            "%s: %d training pairs in %d tars, %d held out, %.0f pairs/s -> %s",
            unit["stage"],
            summary.pairs,
            summary.tars,
            summary.holdout_pairs,
            summary.pairs_per_s,
            summary.out,
        )
        columns = {
            "out": summary.out,
            "tars": summary.tars,
            "holdout_pairs": summary.holdout_pairs,
            "written": summary.written,
            "digest": data_digest(Path(summary.out)),
        }
        status = "ok" if summary.pairs else "failed"
        error = None if summary.pairs else _no_training_pairs(summary, settings.clip.holdout_fraction)
        outcomes.append(
            UnitOutcome(unit["stage"], status, summary.pairs, summary.seconds, error, summary.random_weights, columns)
        )
    return outcomes


def _no_training_pairs(summary: ExportSummary, holdout_fraction: float) -> str:
    if summary.holdout_pairs:  # every case or slide fell into the holdout: too few of them for this fraction
        return (
            f"no training pairs in {', '.join(summary.sources)}: clip.holdout_fraction={holdout_fraction} holds out "
            f"every case or slide ({summary.holdout_pairs} pairs); lower it or add slides"
        )
    return f"no training pairs in {', '.join(summary.sources)}"


@task(name="clip-export", retry_condition_fn=retry_infrastructure, tags=["clip"])
def export_task(units: list[dict[str, Any]], settings: Settings) -> list[UnitOutcome]:
    return export_units(units, settings, get_run_logger())


def train_units(
    units: list[dict[str, Any]], settings: Settings, run: str, model: str, pretrained: str | None, logger
) -> list[UnitOutcome]:
    store = Store(settings.store, settings.s3)
    outcomes = []
    for unit in units:
        started = time.perf_counter()
        spec = ModelSpec(model, pretrained)  # stage 2 starts from stage 1's checkpoint
        try:
            plan = stage_plan(settings, run, unit["stage"], Path(unit["data"]), spec, logger)
        except ValueError as exc:
            outcomes.append(UnitOutcome(unit["stage"], "failed", error=short_error(exc)))
            continue
        try:
            result = train_stage(plan, store, logger)
        except RunBusy as exc:  # another trainer holds the run: nothing of it is ours to touch
            outcomes.append(UnitOutcome(unit["stage"], "pending", error=str(exc)))
            continue
        logger.info(
            "%s %s: %s (%d steps, final loss %s)",
            run,
            unit["stage"],
            result.checkpoint,
            result.steps,
            result.final_loss,
        )
        status = "failed" if result.metrics_error else "ok" if result.trained else "skipped"
        seconds = time.perf_counter() - started
        row = result.row()
        outcomes.append(
            UnitOutcome(unit["stage"], status, plan.samples, seconds, row.pop("metrics_error"), plan.random_start, row)
        )
    return outcomes


@task(name="clip-train", retry_condition_fn=retry_infrastructure, tags=["clip", "gpu"])
def train_task(
    units: list[dict[str, Any]], settings: Settings, run: str, model: str, pretrained: str | None
) -> list[UnitOutcome]:
    return train_units(units, settings, run, model, pretrained, get_run_logger())


def evaluate_units(
    units: list[dict[str, Any]], settings: Settings, model: str, eval_run: str, logger
) -> list[UnitOutcome]:
    """Each unit: {dataset, classes[, holdout]} or {holdout} alone (retrieval on held-out pairs only)."""
    from prefect.artifacts import create_table_artifact

    store = Store(settings.store, settings.s3)
    loaded = load_clip_model(parse_model_spec(model), settings.eval.device, logger)
    outcomes = []
    for unit in units:
        started = time.perf_counter()
        name = Path(unit.get("dataset") or "holdout").name
        try:
            result = _evaluate_unit(loaded, unit, settings)
        except ValueError as exc:
            outcomes.append(UnitOutcome(name, "failed", error=short_error(exc)))
            continue
        uri = publish(store, eval_run, result, logger)
        rows = table_rows(eval_run, result)
        create_table_artifact(rows, key=_artifact_key(f"eval-{eval_run}-{name}"), description=f"{eval_run} on {name}")
        headline = rows[0] if rows else {}
        columns = {
            "json": uri,
            **{k: headline.get(k) for k in ("accuracy", "balanced_accuracy", "R@1") if k in headline},
        }
        n = int(headline.get("n", 0))
        seconds = time.perf_counter() - started
        outcomes.append(UnitOutcome(name, "ok", n, seconds, None, bool(result["random_weights"]), columns))
    release_clip_models()  # the next stage's training wants the GPU memory back
    return outcomes


def _evaluate_unit(model, unit: dict[str, Any], settings: Settings) -> dict[str, Any]:
    holdout = Path(unit["holdout"]) if unit.get("holdout") else None
    if unit.get("dataset"):
        return evaluate(model, Path(unit["dataset"]), Path(unit["classes"]), settings.eval, holdout)
    from tasks.clip.evaluate import holdout_retrieval

    retrieval = holdout_retrieval(model, holdout, settings.eval) if holdout else None
    if retrieval is None:
        raise ValueError(f"fewer than 2 held-out pairs in {holdout}: raise clip.holdout_fraction for retrieval")
    about = model.describe()
    return {"dataset": "holdout", "model": about, "random_weights": about["random_weights"], "retrieval": retrieval}


def _artifact_key(text: str) -> str:
    import re

    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:100]


@task(name="clip-evaluate", retry_condition_fn=retry_infrastructure, tags=["clip", "gpu"])
def evaluate_task(units: list[dict[str, Any]], settings: Settings, model: str, eval_run: str) -> list[UnitOutcome]:
    return evaluate_units(units, settings, model, eval_run, get_run_logger())
