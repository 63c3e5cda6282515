"""Slide features and a task file to a whole-slide classifier: ABMIL, ACMIL or mean pooling trained with the paper's
recipe (the lr grid chosen on validation, ``mil.seeds`` repeats), evaluated on the test split with a confusion PNG
and an attention heatmap per test slide.

Runs land in ``models/mil/<run>/`` and ``eval/mil/<run>/`` (tasks/mil/run.py); a finished run is skipped and an
interrupted one resumes from the store on any worker. The task file and its slides are checked before any work,
so a wrong file fails the flow at once with a message naming it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from pathgen.settings import run_settings
from tasks.mil.models import MIL_MODELS
from tasks.mil.run import (
    EVAL,
    HEADLINE,
    RUNS,
    check_task,
    flow_summary,
    headline_text,
    resolve_features,
    train_mil_task,
)
from tasks.models import require_real_models
from tasks.work.parts import name_flow_run
from tasks.work.runner import Stage, open_store, run_units

RANDOM_FEATURES = (
    "RANDOM WEIGHTS: the slide features come from an encoder with random weights, so these slide metrics and "
    "heatmaps measure noise; feature the slides with a trained encoder (pathgen features --encoder SPEC)"
)


@flow(name="train-mil", description="Slide features + task CSV to an attention-MIL classifier (models/mil/<run>/).")
def train_mil_flow(
    task: str,
    features: str | None = None,
    model: str | None = None,
    store: str | None = None,
    config: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    logger = get_run_logger()
    settings = run_settings(store, config, overrides)
    model = model or settings.mil.model
    if model not in MIL_MODELS:
        raise ValueError(f"unknown MIL model {model!r}; choose one of {', '.join(sorted(MIL_MODELS))}")
    target = open_store(settings, [RUNS, EVAL], logger)
    source = resolve_features(settings, target, features)
    # before any work: production refuses features of a random-weight encoder (their manifest says so)
    chosen = settings.mil.model_copy(update={"task": str(task), "features": source, "model": model})
    require_real_models(settings.model_copy(update={"mil": chosen}), ["train-mil"])
    check_task(task, source, target)  # a wrong task file or unknown slides: the flow fails here, nothing trained
    name_flow_run(f"train-mil-{Path(task).stem}-{model}")
    stage = Stage(
        "train-mil",
        train_mil_task,
        unit_id=lambda unit: Path(unit["task"]).stem,
        tags=["train-mil", "gpu"],
        units="tasks",
        unit_column="task",
        table_description=f"train-mil {model} on {source}",
    )
    outcome = run_units(stage, [[{"task": str(task), "features": source, "model": model}]], settings, logger)[0]
    if outcome.status not in ("ok", "skipped"):
        logger.error("train-mil %s: %s %s", outcome.unit, outcome.status, outcome.error)
        return _unfinished(task, source, model, settings.store, outcome)
    evaluated = target.read_json(outcome.columns["eval"])
    summary = flow_summary(evaluated, target, "trained" if outcome.status == "ok" else "skipped")
    summary["store"] = settings.store
    _report(summary, logger)
    return summary


def _unfinished(task: str, source: str, model: str, store: str, outcome) -> dict[str, Any]:
    """The summary of a run that did not finish: failed for its input (final), or pending (run again)."""
    return {
        "run": None,
        "model": model,
        "task": str(task),
        "features": source,
        "eval": None,
        "mean": {},
        "std": {},
        "chosen_lr": None,
        "status": outcome.status,
        "error": outcome.error,
        "random_weights": outcome.random_weights,
        "store": store,
    }


def _report(summary: dict[str, Any], logger) -> None:
    """Log the headline and publish it as a markdown artifact (mean ± std over seeds, each seed, where things are)."""
    headline = headline_text(summary["mean"], summary["std"])
    logger.info(
        "train-mil %s (%s): chosen lr %s; %s",
        summary["run"],
        summary["status"],
        summary["chosen_lr"],
        ", ".join(f"{k} {v}" for k, v in headline.items()),
    )
    if summary["random_weights"]:
        logger.warning(RANDOM_FEATURES)
    create_markdown_artifact(markdown_report(summary), key="train-mil-metrics", description=f"{summary['run']}")


def markdown_report(summary: dict[str, Any]) -> str:
    headline = headline_text(summary["mean"], summary["std"])
    lines = [f"# train-mil {summary['run']}", ""]
    if summary["random_weights"]:
        lines += [f"**{RANDOM_FEATURES}**", ""]
    lines += [
        f"Task `{summary['task']}`, features `{summary['features']}`, model **{summary['model']}**, chosen lr "
        f"**{summary['chosen_lr']}** ({summary['status']}). Test metrics: mean ± {summary['std_definition']}.",
        "",
        "| metric | mean ± std | " + " | ".join(f"seed {s}" for s in summary["per_seed"]) + " |",
        "| --- | --- | " + " | ".join("---" for _ in summary["per_seed"]) + " |",
    ]
    for name in HEADLINE:
        seeds = [_cell(per.get(name)) for per in summary["per_seed"].values()]
        lines.append(f"| {name} | {headline[name]} | " + " | ".join(seeds) + " |")
    lines += ["", f"Evaluation: {summary['eval_uri']}", f"Confusion: {summary['confusion_png']}"]
    lines.append(f"Heatmaps: {len(summary['heatmaps'])} ({len(summary['heatmaps_skipped'])} skipped)")
    return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    return "n/a" if value is None else f"{value:.4f}"
