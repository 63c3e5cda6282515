"""The paper's benchmark in one run: every dataset of a suite found under a root folder, evaluated for every model
the same way ``pathgen evaluate`` evaluates one (zero-shot on the test split, the linear probe on the train split),
then side by side in ``eval/benchmark/<run>/summary.json`` and ``summary.md``.

Datasets are recognised by their files (``tasks/benchmark/readers/``), under any folder name; the suite's datasets
that are not there are listed with where to download them. Each model is one Prefect task that loads it once and
evaluates every dataset (a dataset is a unit: one that cannot be read is a failed cell and the others go on); its
per-task results go to ``eval/<eval_run>/<task>.json`` as ``pathgen evaluate`` writes them, and the summary is
built from those results; each is copied under ``eval/benchmark/<run>/<eval_run>/``, where the summary links it, as
a later evaluation of the model rewrites ``eval/<eval_run>/``. Models: as ``pathgen evaluate --model`` takes them;
unset, ``eval.baselines`` and then the newest PathGen-CLIP checkpoint in the store, so the difference column is
"trained minus baseline".
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.evaluate import eval_run_of, newest_checkpoint
from pathgen.settings import Settings, run_settings
from tasks.benchmark.run import BenchmarkPlan, cell_of, default_run_name, plan_benchmark, row_of
from tasks.benchmark.summary import ModelResults, build_summary, markdown, publish_summary, result_copy_key
from tasks.clip.evaluate import random_weights_why
from tasks.clip.spec import ModelSpec, has_random_weights, parse_model_spec
from tasks.clip.work import evaluate_task
from tasks.models import require_real_models
from tasks.store.objects import Store
from tasks.work.parts import name_flow_run
from tasks.work.runner import Stage, open_store, run_units


def missing_text(plan: BenchmarkPlan) -> list[str]:
    """One line per dataset of the suite that is not under the root: what it is and where to get it."""
    return [f"{fmt.name} ({fmt.title}): not under {plan.root}; download it from {fmt.source}" for fmt in plan.missing]


def checked_models(models: list[str]) -> list[ModelSpec]:
    """The models as specs; the same model (or two with one results folder) twice is an error."""
    specs = [parse_model_spec(m) for m in models]
    labels, eval_runs = [s.label for s in specs], [eval_run_of(s) for s in specs]
    for index, spec in enumerate(specs):
        if labels[index] in labels[:index]:
            raise ValueError(f"model {spec.label} is given twice; give each model once")
        if eval_runs[index] in eval_runs[:index]:
            other = specs[eval_runs.index(eval_runs[index])].label
            raise ValueError(f"models {other} and {spec.label} would share eval/{eval_runs[index]}/; give one of them")
    return specs


@flow(name="benchmark", description="Every dataset of a suite under a root, for every model, side by side.")
def benchmark_flow(
    suite: str | None = None,
    root: str | None = None,
    models: list[str] | None = None,
    run: str | None = None,
    store: str | None = None,
    config: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    logger = get_run_logger()
    settings = run_settings(store, config, overrides)
    suite = suite or settings.eval.suite or "paper"
    root = root or settings.eval.root
    if not root:
        raise ValueError("no benchmark root: pass root (--root DIR) or set eval.root to the folder of the datasets")
    plan = plan_benchmark(Path(root), suite)
    if not plan.found:
        raise ValueError(f"no dataset of suite {suite} under {root}: " + "; ".join(missing_text(plan)))
    target = open_store(settings, ["eval"], logger)
    specs = checked_models(list(models) if models else [*settings.eval.baselines, newest_checkpoint(target)])
    for spec in specs:
        require_real_models(settings, ["evaluate"], spec.label)
    run = run or default_run_name(suite)
    name_flow_run(f"benchmark-{run}")
    for line in missing_text(plan):
        logger.warning("missing: %s", line)
    columns = [_benchmark_model(spec, plan, run, settings, target, logger) for spec in specs]
    summary = build_summary(plan, run, datetime.now(UTC).isoformat(timespec="seconds"), columns)
    files = publish_summary(target, summary)
    create_markdown_artifact(markdown(summary), key="benchmark-summary", description=f"benchmark {run}")
    logger.info("benchmark %s: %s, %s", run, files["json"], files["markdown"])
    for column in columns:
        if column.random_weights:
            logger.warning("%s has RANDOM WEIGHTS: %s", column.model, column.random_why)
    return summary | {"files": files}


def _benchmark_model(
    spec: ModelSpec, plan: BenchmarkPlan, run: str, settings: Settings, store: Store, logger
) -> ModelResults:
    """One model on every dataset found: one task that loads the model once; its cells from the published
    per-task results."""
    eval_run = eval_run_of(spec)
    stage = Stage(
        "benchmark",
        evaluate_task,
        unit_id=lambda unit: unit["name"],
        tags=["gpu"],
        extra={"model": spec.label, "eval_run": eval_run, "benchmark": run},
        table_description=f"benchmark {run}: {spec.label}",
        units="datasets",
        unit_column="dataset",
    )
    cells, rows = {}, {}
    outcomes = run_units(stage, [plan.units()], settings, logger)
    for outcome in outcomes:
        found = outcome.row("dataset")
        # the run's own copy the task wrote: a later evaluation of this model rewrites eval/<eval_run>/
        result = store.read_json(result_copy_key(run, eval_run, outcome.unit)) if outcome.status == "ok" else None
        cells[outcome.unit] = cell_of(found, result)
        rows[outcome.unit] = row_of(outcome.unit, found, result)
    random_weights = has_random_weights(spec) or any(o.random_weights for o in outcomes)
    why = random_weights_why(spec, random_weights)
    return ModelResults(spec.label, eval_run, random_weights, cells, rows, why)
