"""The PathGen-LLaVA run: its name, the model stage 1 starts from, and one stage trained (or skipped) end to end.

A run is named by a hash of what changes the model it produces: the data (the stage files and the images they
name), the vision tower and the language model (local files by content), and the training settings. The same inputs
resume the same run under ``models/llava/<run>/``; a stage whose ``stage.json`` is in the store is skipped.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agents.tiny import TINY_LM, TINY_VERSION
from pathgen.settings import LlavaSettings, Settings
from tasks.llava.data import STAGE_FILES
from tasks.llava.memory import check_stage
from tasks.llava.plan import RUNS, TrainPlan
from tasks.llava.spec import model_identity
from tasks.llava.train import run_training
from tasks.llava.vision import VisionSource
from tasks.store.objects import Store

STAGE_MODES = {"stage1": "projector"}  # stage 2: full or lora, from llava.lora
# Settings that change neither the weights nor the data order: a run with other values resumes the same run.
NOT_IN_NAME = {"run", "work_dir", "workers", "save_steps", "vision", "language_model", "gradient_checkpointing",
               "sharding", "gpu_memory_gb"}  # fmt: skip
# In a run's name only when set, so that the runs named before these settings existed keep their names.
GLOBAL_BATCHES = ("global_batch_stage1", "global_batch_stage2")


def work_root(cfg: LlavaSettings) -> Path:
    return Path(cfg.work_dir).expanduser() if cfg.work_dir else Path.home() / ".cache" / "pathgen" / "llava"


def resolved_precision(precision: str) -> str:
    if precision != "auto":
        return precision
    import torch

    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"


def data_stages(folder: Path) -> list[str]:
    """The stages a LLaVA data folder has files for, in order."""
    found = [stage for stage, name in STAGE_FILES.items() if (Path(folder) / name).is_file()]
    if not found:
        raise ValueError(f"{folder} holds neither stage1.json nor stage2.json (LLaVA conversation JSON)")
    return found


def run_name(cfg: LlavaSettings, data_digest: str, vision: VisionSource) -> str:
    if cfg.run:
        return cfg.run
    train = cfg.model_dump(exclude=NOT_IN_NAME)
    for key in GLOBAL_BATCHES:
        if train[key] is None:
            del train[key]
    train["precision"] = resolved_precision(cfg.precision)
    inputs = {
        "data": data_digest,
        "vision": model_identity(vision.text, vision.text),
        "language_model": model_identity(cfg.language_model, f"{TINY_LM}-v{TINY_VERSION}"),
        "train": train,
    }
    return "llava-" + hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:12]


def build_base(settings: Settings, vision: VisionSource, folder: Path, logger: logging.Logger) -> dict[str, float]:
    """The untrained LLaVA stage 1 starts from (tower, new projector, LM) as a local Hugging Face folder; returns the
    vision conversion's max abs differences. Built once per run and machine: the same inputs give the same model."""
    from tasks.llava.model import build_llava, load_language_model, save_llava
    from tasks.llava.vision import load_vision_tower

    marker = folder / "conversion.json"
    if marker.is_file():
        return json.loads(marker.read_text())
    cfg = settings.llava
    tower = load_vision_tower(vision, logger)
    cache = Path(settings.agents.model_cache) if settings.agents.model_cache else None
    lm = load_language_model(cfg.language_model, cache)
    model, processor = build_llava(tower, lm, cfg.vision_feature_layer, cfg.seed)
    folder.parent.mkdir(parents=True, exist_ok=True)
    save_llava(model, processor, folder)
    check = tower.check or {}
    marker.write_text(json.dumps(check))
    return check


def stage_plan(settings: Settings, run: str, stage: str, data: Path, start: Path, random: bool) -> TrainPlan:
    cfg = settings.llava
    return TrainPlan(
        run=run,
        stage=stage,
        data=str(data),
        start=str(start),
        out=str(work_root(cfg) / "runs" / run / stage),
        store=settings.store,
        s3=settings.s3.model_dump(),
        mode=STAGE_MODES.get(stage, "lora" if cfg.lora else "full"),
        lr=cfg.lr_stage1 if stage == "stage1" else cfg.lr_stage2,
        epochs=cfg.epochs_stage1 if stage == "stage1" else cfg.epochs_stage2,
        max_steps=cfg.max_steps,
        batch_size=cfg.batch_size,
        grad_accum=cfg.grad_accum_of(stage),
        max_length=cfg.max_length,
        warmup_ratio=cfg.warmup_ratio,
        weight_decay=cfg.weight_decay,
        lora_r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        precision=resolved_precision(cfg.precision),
        gradient_checkpointing=cfg.gradient_checkpointing,
        devices=cfg.devices,
        workers=cfg.workers,
        save_steps=cfg.save_steps,
        seed=cfg.seed,
        random_weights=random,
        sharding=cfg.sharding,
        gpu_memory_gb=cfg.gpu_memory_gb,
    )


@dataclass
class StageResult:
    stage: str
    trained: bool  # False: the store already held the finished stage
    steps: int
    first_loss: float | None
    last_loss: float | None
    model: str  # the store URI of the stage's Hugging Face folder
    local_model: str
    random_weights: bool

    def row(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def launch(plan: TrainPlan, logger: logging.Logger) -> None:
    """The trainer in this process for one device; under torchrun, one process per device, for more. A plan whose
    estimate does not fit the devices is refused first, naming the setting to change."""
    check_stage(plan, logger)
    plan.stage_dir.mkdir(parents=True, exist_ok=True)
    if plan.devices == 1:
        run_training(plan, logger)
        return
    plan_file = plan.stage_dir / "plan.json"
    plan_file.write_text(json.dumps(dataclasses.asdict(plan)))
    # --standalone: a rendezvous on a free local port, so two trainings on one machine do not collide.
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={plan.devices}",
               "-m", "tasks.llava.train_entry", "--plan", str(plan_file)]  # fmt: skip
    logger.info("torchrun on %d devices: %s", plan.devices, " ".join(command))
    done = subprocess.run(command, check=False)
    if done.returncode:
        raise RuntimeError(f"torchrun exited with {done.returncode} training {plan.run} {plan.stage}")


def train_stage(plan: TrainPlan, logger: logging.Logger) -> StageResult:
    """Train the stage unless the store marks it done; either way the model is here afterwards."""
    store = plan.open_store()
    trained = not store.exists(f"{plan.prefix}/stage.json")
    if trained:
        if plan.random_weights:
            logger.warning("%s %s trains RANDOM WEIGHTS: set llava.vision and llava.language_model", plan.run,
                           plan.stage)  # fmt: skip
        launch(plan, logger)
    local = fetch_model(store, plan)
    record = store.read_json(f"{plan.prefix}/stage.json")
    return StageResult(
        stage=plan.stage,
        trained=trained,
        steps=record["steps"],
        first_loss=record["first_loss"],
        last_loss=record["last_loss"],
        model=record["model"],
        local_model=str(local),
        random_weights=record["random_weights"],
    )


def fetch_model(store: Store, plan: TrainPlan) -> Path:
    """The stage's Hugging Face folder here: as trained on this machine, or brought from the store."""
    folder = plan.stage_dir / "model"
    if (folder / "config.json").is_file():
        return folder
    partial = folder.with_name(".model.partial")
    shutil.rmtree(partial, ignore_errors=True)  # a crashed fetch's leftovers
    shutil.rmtree(folder, ignore_errors=True)  # a folder without config.json is incomplete
    for key in store.list(f"{plan.prefix}/model"):
        target = partial / key[len(f"{plan.prefix}/model/") :]
        target.parent.mkdir(parents=True, exist_ok=True)
        store.fs.get(store.path(key), str(target))
    partial.rename(folder)
    return folder


def write_run_record(store: Store, run: str, settings: Settings, vision: VisionSource, stages: list[dict]) -> None:
    """``models/llava/<run>/run.json``: what the run trained on and from, and each stage's model."""
    record = {
        "run": run,
        "vision": vision.label,
        "language_model": settings.llava.language_model or f"{TINY_LM}-v{TINY_VERSION}",
        "random_weights": any(s.get("random_weights") for s in stages),
        "llava": settings.llava.model_dump(),
        # A stage an earlier run finished is "skipped" by this one, but done all the same.
        "stages": [s | {"status": "ok"} if s.get("status") == "skipped" else s for s in stages],
        "written_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    store.write_json(f"{RUNS}/{run}/run.json", record)
