"""LLaVA conversation data to PathGen-LLaVA: stage 1 trains the projector on caption pairs, stage 2 tunes on the
instruction conversations (fully or with LoRA), each a work unit of the shared runner on the GPU pool.

The data is a folder in LLaVA's JSON format (``stage1.json``, ``stage2.json``, images beside), as ``pathgen export
llava`` writes it; without one the flow runs that export on the store first. Everything lands under
``models/llava/<run>/`` (per stage: the Hugging Face folder ``model/``, ``metrics.jsonl``, ``stage.json``;
``run.json``); a re-run with the same inputs skips finished stages and resumes an interrupted one from its last
checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from pathgen.settings import Settings, run_settings
from tasks.llava.data import data_digest, empty_stage
from tasks.llava.plan import RUNS
from tasks.llava.spec import random_llava_models, require_real_llava
from tasks.llava.stages import data_stages, run_name, work_root, write_run_record
from tasks.llava.vision import VisionSource, vision_source
from tasks.llava.work import export_task, train_task
from tasks.store.objects import Store
from tasks.work.parts import name_flow_run
from tasks.work.runner import Stage, finish_training, open_store, run_units

MAKE_DATA = "run pathgen export llava --out DIR first, then pass --data DIR"


def default_vision(store: Store) -> str | None:
    """The newest PathGen-CLIP checkpoint in the store, if it holds any."""
    from flows.evaluate import newest_checkpoint

    try:
        return newest_checkpoint(store)
    except ValueError:
        return None


@flow(name="train-llava", description="LLaVA conversations to PathGen-LLaVA (models/llava/<run>/ in the store).")
def train_llava_flow(
    store: str | None = None,
    config: str | None = None,
    overrides: dict[str, Any] | None = None,
    data: str | None = None,
) -> dict[str, Any]:
    logger = get_run_logger()
    settings = run_settings(store, config, overrides)
    target = open_store(settings, [RUNS], logger)
    vision = vision_source(settings.llava.vision or default_vision(target))
    require_real_llava(settings, vision)  # before any work: production refuses random weights
    folder = Path(data).expanduser().resolve() if data else _export(settings, target, logger)
    stages = data_stages(folder)
    run = run_name(settings.llava, data_digest(folder, stages), vision)
    name_flow_run(f"train-llava-{run}")
    summary: dict[str, Any] = {"store": settings.store, "run": run, "vision": vision.label, "stages": []}
    random = random_llava_models(settings, vision) + _random_data(folder)
    empty = {stage: reason for stage in stages if (reason := empty_stage(folder, stage))}
    if len(empty) == len(stages):
        raise ValueError("; ".join(empty.values()))
    for stage in stages:
        if stage in empty:
            logger.warning("%s: NOT TRAINED, %s", stage, empty[stage])
            summary["stages"].append({"stage": stage, "status": "no-data", "error": empty[stage]})
            continue
        outcome = _train(settings, run, stage, folder, vision)
        summary["stages"].append(outcome.row("stage"))
        if outcome.status not in ("ok", "skipped"):
            return _finish(summary, random, logger, f"{stage}: {outcome.error}")
    write_run_record(target, run, settings, vision, summary["stages"])
    return _finish(summary, random, logger)


def _export(settings: Settings, store: Store, logger) -> Path:
    """No data given: export the store's pairs and instruction data, incrementally (a store with nothing new writes
    nothing, so a re-run reaches its finished stages at once)."""
    import hashlib

    # Named by the absolute URL: two checkouts' ./store are two stores.
    out = work_root(settings.llava) / "data" / f"export-{hashlib.sha256(store.url.encode()).hexdigest()[:12]}"
    stage = Stage("llava-export", export_task, unit_id=lambda u: "llava", units="exports", unit_column="export")
    (outcome,) = run_units(stage, [[{"out": str(out)}]], settings, logger)
    if outcome.status != "ok":
        raise ValueError(f"no data given and the store's export failed ({outcome.error}); {MAKE_DATA}")
    return Path(outcome.columns["out"])


def _train(settings: Settings, run: str, stage: str, folder: Path, vision: VisionSource):
    train_stage = Stage(
        "llava-train",
        train_task,
        unit_id=lambda u: u["stage"],
        tags=["gpu"],
        extra={"run": run, "vision": vision.text},
        units="stages",
        unit_column="stage",
        table_description=f"PathGen-LLaVA {run}",
    )
    return run_units(train_stage, [[{"stage": stage, "data": str(folder)}]], settings, get_run_logger())[0]


def _random_data(folder: Path) -> list[str]:
    """An export's provenance.json says whether its captions and conversations came from random-weight models."""
    import json

    try:
        provenance = json.loads((folder / "provenance.json").read_text())
    except (OSError, ValueError):
        return []
    if isinstance(provenance, dict) and provenance.get("random_weights"):
        return [f"the data in {folder} was written by random-weight models (provenance.json)"]
    return []


def _finish(summary: dict[str, Any], random: list[str], logger, error: str | None = None) -> dict[str, Any]:
    summary["random_weights"] = bool(random)
    summary["random_models"] = random
    warning = f"PathGen-LLaVA has RANDOM WEIGHTS: {'; '.join(random)}" if random else ""
    return finish_training(summary, "train-llava", logger, warning, error)
