"""The CLIP stages as work units for the shared runner: export a pair set, train a stage, evaluate a model.

A unit is a dict (a stage's pair set, a stage to train, a dataset to evaluate on). Bad content (no pairs, a dataset
folder that is not one folder per class) fails its unit with the reason; anything else (storage, the trainer,
the device) raises, so the unit stays pending and the runner retries it.
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task

from pathgen.errors import retry_infrastructure, short_error
from pathgen.settings import PairSetSettings, Settings
from tasks.clip.evaluate import CLASS_FOLDERS, evaluate_dataset, holdout_retrieval, publish, read_tasks, table_rows
from tasks.clip.lease import RunBusy
from tasks.clip.spec import ModelSpec, parse_model_spec
from tasks.clip.stages import data_digest, export_set, stage_plan, train_stage
from tasks.clip.webdataset import ExportSummary
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
    units: list[dict[str, Any]], settings: Settings, model: str, eval_run: str, logger, benchmark: str | None = None
) -> list[UnitOutcome]:
    """Each unit: {dataset, classes | format[, name][, holdout]}, or {holdout} alone (retrieval on held-out pairs
    only). One outcome per task a dataset holds (LC25000 holds two); a dataset that cannot be read is one failed
    outcome named by the unit's ``name`` (its format in a benchmark), else its folder's name. In a ``benchmark``
    run each result is also kept as that run's own copy, which the outcome's ``json`` names."""
    store = Store(settings.store, settings.s3)
    loaded = load_clip_model(parse_model_spec(model), settings.eval.device, logger)
    outcomes = []
    for unit in units:
        if not unit.get("dataset"):
            evaluate = partial(_holdout_only, loaded, Path(unit["holdout"]), settings.eval)
            outcomes.append(_evaluated(store, eval_run, "holdout", evaluate, logger))
            continue
        try:
            found = read_tasks(Path(unit["dataset"]), _path(unit.get("classes")), unit.get("format"))
        except ValueError as exc:
            name = unit.get("name") or Path(unit["dataset"]).name
            outcomes.append(UnitOutcome(name, "failed", error=short_error(exc), columns=_unit_columns(unit)))
            continue
        for index, benchmark_task in enumerate(found):
            holdout = _path(unit.get("holdout")) if index == 0 else None  # retrieval does not depend on the dataset
            evaluate = partial(_evaluate_task, loaded, benchmark_task, settings.eval, holdout)
            columns = {"format": benchmark_task.format, "folder": str(benchmark_task.folder)}
            published = _evaluated(store, eval_run, benchmark_task.name, evaluate, logger, columns, benchmark)
            outcomes.append(published)
    release_clip_models()  # the next stage's training wants the GPU memory back
    return outcomes


def _evaluate_task(model, benchmark_task, cfg, holdout: Path | None) -> dict[str, Any]:
    result = evaluate_dataset(model, benchmark_task, cfg)
    if holdout is not None:
        result["retrieval"] = holdout_retrieval(model, holdout, cfg)
    return result


def _path(value: str | None) -> Path | None:
    return Path(value) if value else None


def _unit_columns(unit: dict[str, Any]) -> dict[str, Any]:
    """A dataset that could not be read: the format it was read as (None: none detected) and its folder."""
    return {"format": unit.get("format") or (CLASS_FOLDERS if unit.get("classes") else None), "folder": unit["dataset"]}


def _evaluated(
    store: Store, eval_run: str, name: str, evaluate, logger, columns=None, benchmark: str | None = None
) -> UnitOutcome:
    """Run one evaluation, publish its result and table artifact; a ValueError (the data's fault) fails it."""
    from prefect.artifacts import create_table_artifact

    started = time.perf_counter()
    try:
        result = evaluate()
    except ValueError as exc:
        return UnitOutcome(name, "failed", error=short_error(exc), columns=dict(columns or {}))
    unseen = (result.get("linear_probe") or {}).get("untrained_classes")
    if unseen:  # a derived split put every image of these classes on the scored side
        logger.warning("%s: the linear probe is scored on classes its training side lacks: %s", name, ", ".join(unseen))
    copy = None
    if benchmark:
        from tasks.benchmark.summary import result_copy_key

        copy, result = result_copy_key(benchmark, eval_run, name), result | {"benchmark": benchmark}
    uri = publish(store, eval_run, result, logger, copy)
    rows = table_rows(eval_run, result)
    create_table_artifact(rows, key=_artifact_key(f"eval-{eval_run}-{name}"), description=f"{eval_run} on {name}")
    headline = rows[0] if rows else {}
    found = {k: headline.get(k) for k in ("accuracy", "balanced_accuracy", "weighted_f1", "R@1") if k in headline}
    seconds = time.perf_counter() - started
    n = int(headline.get("n", 0))
    columns = {"json": uri, **found, **(columns or {})}
    return UnitOutcome(name, "ok", n, seconds, None, bool(result["random_weights"]), columns)


def _holdout_only(model, holdout: Path, cfg) -> dict[str, Any]:
    retrieval = holdout_retrieval(model, holdout, cfg)
    if retrieval is None:
        raise ValueError(f"fewer than 2 held-out pairs in {holdout}: raise clip.holdout_fraction for retrieval")
    about = model.describe()
    return {"dataset": "holdout", "model": about, "random_weights": about["random_weights"], "retrieval": retrieval}


def _artifact_key(text: str) -> str:
    import re

    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:100]


@task(name="clip-evaluate", retry_condition_fn=retry_infrastructure, tags=["clip", "gpu"])
def evaluate_task(
    units: list[dict[str, Any]], settings: Settings, model: str, eval_run: str, benchmark: str | None = None
) -> list[UnitOutcome]:
    return evaluate_units(units, settings, model, eval_run, get_run_logger(), benchmark)
