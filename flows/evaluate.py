"""Evaluate a CLIP model on labelled patch datasets: zero-shot, linear probe (when a dataset has a train split) and
retrieval on held-out pairs; results to ``eval/<run>/<task>.json`` and a table artifact per task. A dataset is
``{dataset: DIR, classes: FILE}`` (one folder per class) or ``{dataset: DIR[, format: NAME]}`` (a benchmark dataset
as downloaded: ``tasks/benchmark/readers/``, its format detected when not named).

The model is any open_clip name with ``pretrained`` (``ViT-B-16:openai``) or a checkpoint, so PathGen-CLIP sits
beside its baselines on the same folders; without one, the newest PathGen-CLIP checkpoint in the store.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from pathgen.settings import run_settings
from tasks.clip.evaluate import dataset_entry, random_weights_why
from tasks.clip.spec import ModelSpec, parse_model_spec
from tasks.clip.stages import RUNS
from tasks.clip.stages import newest_checkpoint as newest_stage_checkpoint
from tasks.clip.train import epoch_of
from tasks.clip.work import evaluate_task
from tasks.models import require_real_models
from tasks.store.objects import Store
from tasks.work.parts import name_flow_run
from tasks.work.runner import Stage, open_store, run_units
from tasks.work.units import summarize


def newest_checkpoint(store: Store) -> str:
    """The last checkpoint of the most recently trained PathGen-CLIP stage; an error naming what to do when none."""
    found = newest_stage_checkpoint(store)
    if found is None:
        raise ValueError(f"no PathGen-CLIP checkpoint under {store.uri(RUNS)}: run pathgen train-clip or pass --model")
    return found


def eval_run_name(model: str) -> str:
    """``models/clip/<run>/<stage>/checkpoints/epoch_N.pt`` -> ``<run>-<stage>`` for the stage's last epoch (where
    the train flow's own evaluation goes), ``<run>-<stage>-epoch<N>`` for an earlier one; other models by label."""
    match = re.search(r"(?:models/clip|clip/runs)/([^/]+)/([^/]+)/checkpoints/epoch_(\d+)\.pt$", model)
    if not match:
        return re.sub(r"[^A-Za-z0-9_.-]+", "-", model.replace("://", "-")).strip("-.")[-80:]
    name = f"{match[1]}-{match[2]}"
    return name if int(match[3]) >= _last_epoch(model) else f"{name}-epoch{match[3]}"


def eval_run_of(spec: ModelSpec) -> str:
    """Where a model's results go: ``eval/<eval_run>/``; a checkpoint's by its run and stage."""
    return eval_run_name(spec.pretrained if spec.pretrained and "/" in spec.pretrained else spec.label)


def _last_epoch(checkpoint: str) -> int:
    import fsspec

    from tasks.store.objects import storage_options

    fs, path = fsspec.core.url_to_fs(checkpoint, **storage_options(checkpoint))
    return max((epoch_of(p) for p in fs.glob(path.rsplit("/", 1)[0] + "/epoch_*.pt")), default=0)


@flow(name="evaluate", description="Zero-shot, linear probe and retrieval of a CLIP model (eval/<run>/ in the store).")
def evaluate_flow(
    datasets: list[dict[str, str]],
    model: str | None = None,
    holdout: str | None = None,
    store: str | None = None,
    config: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    logger = get_run_logger()
    settings = run_settings(store, config, overrides)
    units = [{**dataset_entry(d), "holdout": holdout} for d in datasets]  # a malformed entry: before any work
    require_real_models(settings, ["evaluate"], model)
    target = open_store(settings, ["eval"], logger)
    model = model or newest_checkpoint(target)
    spec = parse_model_spec(model)
    eval_run = eval_run_of(spec)
    name_flow_run(f"evaluate-{eval_run}-{len(datasets)}-datasets")
    logger.info("evaluating %s as %s", spec.label, eval_run)
    stage = Stage(
        "evaluate",
        evaluate_task,
        unit_id=lambda u: Path(u["dataset"]).name,
        tags=["gpu"],
        extra={"model": spec.label, "eval_run": eval_run},
        units="datasets",
        unit_column="dataset",
        unit_key="dataset",
    )
    outcomes = run_units(stage, [units], settings, logger)
    summary = summarize("evaluate", outcomes, stage.units, stage.unit_key)
    summary.update(model=spec.label, eval_run=eval_run, results=[o.row("dataset") for o in outcomes])
    summary["eval_prefix"] = target.uri(f"eval/{eval_run}")
    summary["random_weights"] = bool(spec.random_weights or summary["random_weights"])
    summary["random_why"] = random_weights_why(spec, summary["random_weights"])
    if summary["random_weights"]:
        logger.warning("%s has RANDOM WEIGHTS: %s", spec.label, summary["random_why"])
    return summary
