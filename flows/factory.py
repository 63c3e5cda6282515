"""The whole chain for a source set: extract, caption, train-clip, evaluate (and, when chosen, PathGen-LLaVA's
instruct and train-llava, and the whole-slide path: features of every tissue patch, then train-mil on
``mil.task``), each stage switchable.

Every stage runs as a subflow (its own run, table and progress in the UI) and skips what the store already holds:
committed slides and pairs, finished CLIP stages. The evaluate stage evaluates ``datasets`` (else clip.evaluate);
with ``eval.suite`` set it runs the benchmark instead (flows/benchmark.py: eval.baselines and the newest
PathGen-CLIP on every dataset of the suite under eval.root; a missing root or datasets passed besides are refused
before any work). ``parts`` goes to extract and caption. Models are checked for all chosen stages before any work
(``models.allow_random_weights``); each stage's models leave the GPU when it ends (the next stage's training needs
the memory). The run ends with a ``factory-report`` markdown
artifact: each stage's state, counts and throughput, then what the store holds (``pathgen status``).
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from agents.backends import release_backends
from flows.benchmark import benchmark_flow
from flows.caption import caption_flow
from flows.evaluate import evaluate_flow
from flows.extract import extract_flow
from flows.features import features_flow
from flows.instruct import instruct_flow
from flows.train_clip import train_clip_flow
from flows.train_llava import train_llava_flow
from flows.train_mil import train_mil_flow
from pathgen.settings import Settings, SettingsError, run_settings
from tasks.contact_sheet import UnreadableShard, sample_patches, write_contact_sheet
from tasks.mil.metrics import mean_std_text
from tasks.models import DEFAULT_STAGES, STAGES, require_real_models
from tasks.report import markdown, store_report
from tasks.selection.embedding import release_clip_models
from tasks.store.objects import Store
from tasks.work.parts import name_flow_run, source_label


class FactoryStageFailed(RuntimeError):
    """A stage of the factory ended without a result; the later stages did not run."""


@flow(
    name="factory",
    description="Slides to pairs to PathGen-CLIP: extract, caption, train-clip, evaluate (and, by name, instruct, "
    "train-llava, features, train-mil).",
)
def factory_flow(
    sources: list[str] | None = None,
    store: str | None = None,
    config: str | None = None,
    overrides: dict[str, Any] | None = None,
    stages: list[str] | None = None,
    parts: int = 1,
    datasets: list[dict[str, str]] | None = None,
) -> dict[str, Any]:
    logger = get_run_logger()
    settings = run_settings(store, config, overrides)
    chosen = checked_stages(stages)
    require_real_models(settings, chosen)  # every chosen stage's models, before the first stage starts
    if "evaluate" in chosen:
        check_benchmark(datasets, settings)  # a bad eval.root would fail only after train-clip has run
    sources = list(sources or settings.sources)
    needing = [stage for stage in ("extract", "features") if stage in chosen]
    if needing and not sources:
        raise SettingsError(f"the {' and '.join(needing)} stage needs sources: pass sources or set `sources`")
    name_flow_run(f"factory-{source_label(sources)}-{'-'.join(chosen)}")
    common = {"store": store, "config": config, "overrides": overrides}
    rows: list[dict[str, Any]] = []
    for stage in chosen:
        started = time.perf_counter()
        row = _run_stage(stage, sources, common, parts, datasets or settings.clip.evaluate, settings)
        row["seconds"] = round(time.perf_counter() - started, 1)
        rows.append(row)
        logger.info("%s: %s", stage, _row_text(row))
        if row["state"] not in ("Completed", "skipped"):
            break
    summary = {"store": settings.store, "stages": rows, "report": _publish(settings, rows)}
    failed = [r for r in rows if r["state"] not in ("Completed", "skipped")]
    if failed:
        later = [s for s in chosen if s not in {r["stage"] for r in rows}]
        raise FactoryStageFailed(f"{failed[0]['stage']}: {failed[0].get('error')}; not run: {later or 'none'}")
    return summary


def checked_stages(stages: list[str] | None) -> list[str]:
    """The chosen stages in the factory's order; an unknown name is a settings error naming the known ones."""
    chosen = list(stages or DEFAULT_STAGES)
    unknown = [s for s in chosen if s not in STAGES]
    if unknown:
        raise SettingsError(f"unknown factory stages {unknown}; choose from {', '.join(STAGES)}")
    return [s for s in STAGES if s in chosen]


def check_benchmark(datasets: list[dict] | None, settings: Settings) -> None:
    """With ``eval.suite`` set, the evaluate stage runs the benchmark on ``eval.root``: a settings error before any
    work when the root is unset, still deploy/paper.yaml's /FILL-IN/ placeholder, not there, or holds none of the
    suite's datasets, and when datasets are passed too (the benchmark would leave them unevaluated)."""
    from pathlib import Path

    from tasks.benchmark.run import plan_benchmark

    suite, root = settings.eval.suite, settings.eval.root
    if not suite:
        return
    if datasets:
        raise SettingsError(
            f"eval.suite={suite} makes the evaluate stage run the benchmark on eval.root, so the datasets passed "
            f"({', '.join(str(d.get('dataset')) for d in datasets)}) would not be evaluated: unset eval.suite to "
            "evaluate them, or leave them out"
        )
    if not root:
        raise SettingsError(f"eval.suite={suite} needs eval.root: the folder holding the downloaded datasets")
    if "/FILL-IN/" in root:
        raise SettingsError(
            f"eval.root is still the placeholder {root}: set it to the folder of the downloaded datasets"
        )
    if not Path(root).is_dir():
        raise SettingsError(f"eval.root {root} does not exist: set it to the folder of the downloaded datasets")
    if not plan_benchmark(Path(root), suite).found:
        raise SettingsError(
            f"no dataset of suite {suite} under eval.root {root}; pathgen benchmark --root {root} lists where to "
            "download them"
        )


def release_models() -> None:
    """Release every model a stage loaded in this process: the caption, instruct and evaluate-mc backends (a vLLM
    engine shuts down) and the CLIP models of selection and evaluation. CLIP and LLaVA training run in processes of
    their own, which give their memory back when they exit."""
    release_clip_models()
    release_backends()  # last: it collects garbage, then empties the CUDA cache


def _run_stage(
    stage: str, sources: list[str], common: dict, parts: int, datasets: list[dict], settings: Settings
) -> dict[str, Any]:
    """One stage as a subflow, its row for the report; its models are released when it ends, however it ends."""
    try:
        return _stage_row(stage, sources, common, parts, datasets, settings)
    finally:
        release_models()  # the next stage (train-clip after caption) gets the GPU memory back


def _skip_note(stage: str, datasets: list[dict], settings: Settings) -> str | None:
    """Why a chosen stage has nothing to do in this run (its row says so), or None."""
    if stage == "evaluate" and not datasets and not settings.eval.suite:
        return "no datasets: pass datasets, set clip.evaluate, or set eval.suite and eval.root (the benchmark)"
    if stage == "train-mil" and not settings.mil.task:
        return "no task: set mil.task to a task CSV (pathgen mil-task builds one)"
    return None


def _start_stage(stage: str, sources: list[str], common: dict, parts: int, datasets: list[dict], settings: Settings):
    """The stage's flow as a subflow; its final state."""
    if stage == "extract":
        return extract_flow(sources=sources, parts=parts, return_state=True, **common)
    if stage == "caption":
        return caption_flow(parts=parts, return_state=True, **common)
    if stage == "instruct":
        return instruct_flow(parts=parts, return_state=True, **common)
    if stage == "train-llava":
        return train_llava_flow(return_state=True, **common)
    if stage == "train-clip":
        return train_clip_flow(return_state=True, **common)
    if stage == "features":
        return features_flow(sources=sources, parts=parts, return_state=True, **common)
    if stage == "train-mil":
        mil = settings.mil
        return train_mil_flow(task=mil.task, features=mil.features, model=mil.model, return_state=True, **common)
    if settings.eval.suite:  # the benchmark: eval.baselines, then the newest PathGen-CLIP, on every dataset found
        return benchmark_flow(suite=settings.eval.suite, root=settings.eval.root, return_state=True, **common)
    return evaluate_flow(datasets, return_state=True, **common)


def _stage_row(
    stage: str, sources: list[str], common: dict, parts: int, datasets: list[dict], settings: Settings
) -> dict[str, Any]:
    note = _skip_note(stage, datasets, settings)
    if note:
        return {"stage": stage, "state": "skipped", "note": note}
    state = _start_stage(stage, sources, common, parts, datasets, settings)
    result = state.result(raise_on_failure=False)
    row: dict[str, Any] = {"stage": stage, "state": state.name}
    if not state.is_completed():
        row["error"] = str(result)
        return row
    row.update(_counts(stage, result))
    if stage == "features" and result.get("pending"):
        # train-mil would find these slides without features and fail on the task: the chain waits instead
        row.update(state="Pending", error=f"{result['pending']} slides pending (infrastructure): run again")
    if stage in ("train-clip", "train-llava", "train-mil") and result.get("error"):
        # train-mil: a failed task (its content) or a pending one (infrastructure) ends the chain all the same
        row.update(state="Pending" if result.get("status") == "pending" else "Failed", error=result["error"])
    return row


UNIT_COUNTS = ("ok", "skipped", "failed", "pending")  # failed: units (slides), as in every stage's summary
SLIDE_STAGE_COUNTS = {  # a slide stage's own entries: its items, the items that failed inside committed slides, ...
    "extract": ("patches",),
    "features": ("patches", "features_hash", "encoder"),
    "caption": ("pairs", "failed_items", "agents_hash"),
    "instruct": ("conversations", "failed_items"),
}


def _counts(stage: str, result: dict[str, Any]) -> dict[str, Any]:
    if stage in SLIDE_STAGE_COUNTS:
        counts = {key: result.get(key) for key in (*UNIT_COUNTS, *SLIDE_STAGE_COUNTS[stage])}
    elif stage in ("train-clip", "train-llava"):
        trained = ", ".join(f"{s['stage']} {s['status']}" for s in result["stages"])
        counts = {"run": result.get("run"), "stages": trained}
    elif stage == "train-mil":
        counts = {key: result.get(key) for key in ("run", "status", "model", "features", "chosen_lr", "eval")}
        counts["auc"] = mean_std_text(*((result.get(k) or {}).get("auc") for k in ("mean", "std")), missing=None)
    elif "rows" in result:  # the benchmark
        counts = {"benchmark": result["run"], "failed_cells": result["failed"], "summary": result["files"]["markdown"]}
    else:
        counts = {"eval_run": result.get("eval_run"), "results": ", ".join(r["status"] for r in result["results"])}
    counts["random_weights"] = bool(result.get("random_weights"))
    return counts


def _row_text(row: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in row.items() if k != "stage" and v not in (None, ""))


def _throughput(row: dict[str, Any]) -> str:
    hours = max(row.get("seconds", 0), 1e-9) / 3600
    if row["stage"] in ("extract", "features") and row.get("ok"):
        return f"{row['ok'] / hours:.0f} slides/h, {(row.get('patches') or 0) / hours:.0f} patches/h"
    if row["stage"] == "caption" and row.get("pairs"):
        return f"{row['pairs'] / hours:.0f} pairs/h"
    return ""


def _publish(settings: Settings, rows: list[dict[str, Any]]) -> str:
    """The ``factory-report`` markdown artifact: the stages of this run, then what the store holds."""
    lines = ["| stage | state | seconds | throughput | details |", "|---|---|---|---|---|"]
    for row in rows:
        details = _row_text({k: v for k, v in row.items() if k not in ("state", "seconds")})
        lines.append(f"| {row['stage']} | {row['state']} | {row.get('seconds', '')} | {_throughput(row)} | {details} |")
    random = [row["stage"] for row in rows if row.get("random_weights")]
    said = f"RANDOM WEIGHTS used by: {', '.join(random)} (their output is noise)" if random else "Random weights: none"
    lines += ["", said]
    store = Store(settings.store, settings.s3)
    if any(row["stage"] in ("extract", "caption") and row["state"] == "Completed" for row in rows):
        _contact_sheet(store)
    text = markdown(store_report(store), "PathGen Factory run", lines)
    create_markdown_artifact(text, key="factory-report", description="what this factory run made, and where")
    return text


def _contact_sheet(store: Store) -> None:
    """``reports/contact-sheet.png``: sample patches (as ``pathgen inspect`` draws them), for the report; a shard
    that cannot be read as Parquet leaves the report without it."""
    shards = store.list("patches", ".parquet")
    if shards:
        with contextlib.suppress(UnreadableShard):
            write_contact_sheet(store, sample_patches(store, shards))
