"""Pairs to PathGen-CLIP: export each stage's pairs as WebDataset tars, train with open_clip's own trainer, and
evaluate after each stage (the configured class folders, and retrieval on the held-out pairs).

Stage 2 starts from stage 1's last checkpoint. Everything lands under ``models/clip/<run>/`` (checkpoints, params,
out.log, metrics.jsonl, run.json) and ``eval/<run>-<stage>/``; a re-run with the same inputs skips finished stages
and resumes an interrupted one from its newest checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from pathgen.settings import Settings, run_settings
from tasks.clip.evaluate import dataset_entry
from tasks.clip.spec import ModelSpec, has_random_weights
from tasks.clip.stages import (
    RUNS,
    random_start_warning,
    resolve_pair_set,
    run_name,
    stage_sets,
    start_spec,
    write_run_record,
)
from tasks.clip.webdataset import HOLDOUT
from tasks.clip.work import evaluate_task, export_task, train_task
from tasks.models import require_real_models
from tasks.work.parts import name_flow_run
from tasks.work.runner import Stage, finish_training, open_store, run_units
from tasks.work.units import UnitOutcome


@flow(name="train-clip", description="Pairs to PathGen-CLIP (models/clip/<run>/ in the store), evaluated per stage.")
def train_clip_flow(
    store: str | None = None, config: str | None = None, overrides: dict[str, Any] | None = None
) -> dict[str, Any]:
    logger = get_run_logger()
    settings = run_settings(store, config, overrides)
    require_real_models(settings, ["train-clip"])  # before any work: production refuses a random start
    evaluations = [dataset_entry(d) for d in settings.clip.evaluate]  # a malformed entry fails before training
    target = open_store(settings, [RUNS, "eval"], logger)
    sets = [(name, resolve_pair_set(target, pair_set)) for name, pair_set in stage_sets(settings.clip)]
    export_stage = Stage("clip-export", export_task, unit_id=lambda u: u["stage"], units="sets", unit_column="stage")
    exports = run_units(export_stage, [[{"stage": n, "set": s.model_dump()} for n, s in sets]], settings, logger)
    summary: dict[str, Any] = {"store": settings.store, "exports": [o.row("stage") for o in exports], "stages": []}
    if any(o.status != "ok" for o in exports):
        return _finish(summary, settings, logger, "export failed: " + "; ".join(str(o.error) for o in exports))
    run = run_name(settings.clip, [o.columns["digest"] for o in exports])
    summary["run"] = run
    name_flow_run(f"train-clip-{run}")
    start = start_spec(settings.clip)
    for (stage, _), export in zip(sets, exports, strict=True):
        trained = _train(settings, run, stage, export, start, logger)
        summary["stages"].append(trained.row("stage"))
        if trained.status not in ("ok", "skipped"):
            return _finish(summary, settings, logger, f"{stage}: {trained.error}")
        start = ModelSpec(start.name, trained.columns["local_checkpoint"])
        summary["stages"][-1]["evaluations"] = _evaluate(settings, evaluations, run, stage, export, trained, logger)
    write_run_record(target, run, settings.clip, summary["stages"], summary["exports"])
    return _finish(summary, settings, logger)


def _train(settings: Settings, run: str, stage: str, export: UnitOutcome, start: ModelSpec, logger) -> UnitOutcome:
    train_stage = Stage(
        "clip-train",
        train_task,
        unit_id=lambda u: u["stage"],
        tags=["gpu"],
        extra={"run": run, "model": start.name, "pretrained": start.pretrained},
        units="stages",
        unit_column="stage",
        table_description=f"PathGen-CLIP {run}",
    )
    return run_units(train_stage, [[{"stage": stage, "data": export.columns["out"]}]], settings, logger)[0]


def _evaluate(
    settings: Settings,
    datasets: list[dict[str, str]],
    run: str,
    stage: str,
    export: UnitOutcome,
    trained: UnitOutcome,
    logger,
) -> list:
    """After a stage: ``clip.evaluate``'s datasets (``{dataset, classes}`` or ``{dataset[, format]}``, as
    ``pathgen evaluate`` takes them) with retrieval on the held-out pairs, else retrieval alone."""
    holdout = str(Path(export.columns["out"]) / HOLDOUT) if export.columns.get("holdout_pairs") else None
    units = [{**entry, "holdout": holdout} for entry in datasets]
    if not units and holdout and int(export.columns["holdout_pairs"]) >= 2:
        units = [{"holdout": holdout}]
    if not units:
        logger.info("%s %s: nothing to evaluate on (set clip.evaluate or clip.holdout_fraction)", run, stage)
        return []
    model = f"{_model_name(settings)}:{trained.columns['local_checkpoint']}"
    evaluate_stage = Stage(
        "clip-evaluate",
        evaluate_task,
        unit_id=lambda u: Path(u.get("dataset") or "holdout").name,
        tags=["gpu"],
        extra={"model": model, "eval_run": f"{run}-{stage}"},
        units="datasets",
        unit_column="dataset",
    )
    return [o.row("dataset") for o in run_units(evaluate_stage, [units], settings, logger)]


def _model_name(settings: Settings) -> str:
    return start_spec(settings.clip).name


def _finish(summary: dict[str, Any], settings: Settings, logger, error: str | None = None) -> dict[str, Any]:
    start = start_spec(settings.clip)
    summary["model"] = start.name
    summary["random_weights"] = has_random_weights(start)  # as run.json records it
    warning = random_start_warning("PathGen-CLIP", start.name) if summary["random_weights"] else ""
    return finish_training(summary, "train-clip", logger, warning, error)
