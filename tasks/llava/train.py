"""One PathGen-LLaVA training stage on transformers' ``Trainer`` (:mod:`tasks.llava.trainer`), in this process for
one device or in each process ``torchrun --nproc-per-node N`` starts, parameters, gradients and AdamW states
sharded over the N devices (FSDP2) unless ``llava.sharding=none``.

Stage 1 trains the projector only; stage 2 the projector and the language model, fully or with LoRA (merged into the
saved model). Every ``save_steps`` optimizer steps the trainer's checkpoint (rotated: the newest only) is mirrored
to the store (:mod:`tasks.llava.checkpoints`) and a stage resumes from the newest one, here or in the store, with the
data it had not seen yet; at the end the whole model goes to ``model/`` as a Hugging Face folder, then
``stage.json`` marks the stage done.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import json
import logging
import os
from pathlib import Path
from typing import Any

from tasks.llava import checkpoints
from tasks.llava.data import ConversationDataset, Encoder, collate, read_records
from tasks.llava.plan import TrainPlan
from tasks.store.objects import Store

LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)"  # the LM's attention, not the vision tower's


def set_trainable(model, mode: str):
    """Freeze what the stage does not train; LoRA wraps the model (peft) and trains its adapters and the projector."""
    model.requires_grad_(False)
    if mode == "lora":
        return model  # peft marks its own trainable parameters (lora_model)
    model.model.multi_modal_projector.requires_grad_(True)
    if mode == "full":
        model.model.language_model.requires_grad_(True)
        model.lm_head.requires_grad_(True)
    return model


def lora_model(model, r: int, alpha: int, dropout: float):
    """The model wrapped with LoRA adapters (peft): the one configuration training and the memory estimate use."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=LORA_TARGETS,
        modules_to_save=["multi_modal_projector"],  # LLaVA-1.5's LoRA recipe trains the projector in full
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def prepare_model(plan: TrainPlan):
    """(model, processor) from the stage's start folder, with exactly the stage's parameters trainable."""
    from tasks.llava.model import load_llava

    model, processor = load_llava(plan.start)
    model = set_trainable(model, plan.mode)
    if plan.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if plan.mode == "lora":
        model = lora_model(model, plan.lora_r, plan.lora_alpha, plan.lora_dropout)
    return model, processor


def build_trainer(plan: TrainPlan, rows: list[dict], logger: logging.Logger):
    """The stage's Trainer over its data, its metric rows continuing ``rows``."""
    from accelerate.utils import set_seed

    from tasks.llava.trainer import StageLog, StageOrder, StageTrainer, total_steps, training_arguments

    world = int(os.environ.get("WORLD_SIZE", "1"))
    records = read_records(Path(plan.data), plan.stage)
    set_seed(plan.seed)
    model, processor = prepare_model(plan)
    dataset = ConversationDataset(Path(plan.data), records, Encoder(processor, int(model.config.image_seq_length),
                                                                    plan.max_length))  # fmt: skip
    order = StageOrder(len(records), plan.batch_size, world, plan.seed)
    total = total_steps(plan, len(records), world)
    text_only = any(not r.get("image") for r in records)
    trainer = StageTrainer(
        model=model,
        args=training_arguments(plan, world, total, model, text_only),
        train_dataset=dataset,
        data_collator=functools.partial(collate, pad_id=processor.tokenizer.pad_token_id),
        order=order,
    )
    trainer.add_callback(StageLog(plan, trainer, rows, logger))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("%s %s: %d conversations, %d steps on %d device(s) (%s), %d trainable parameters", plan.run,
                plan.stage, len(records), total, world, trainer.accelerator.distributed_type, trainable)  # fmt: skip
    return trainer, processor


def run_training(plan: TrainPlan, logger: logging.Logger | None = None) -> dict[str, Any] | None:
    """Train the stage to its last step, resuming from the newest checkpoint; rank 0 returns the stage record."""
    logger = logger or logging.getLogger("pathgen.llava")
    rows: list[dict] = []
    trainer, processor = build_trainer(plan, rows, logger)
    store, main = plan.open_store(), trainer.accelerator.is_main_process
    if main:
        checkpoints.fetch_newest(plan, store, logger)
    trainer.accelerator.wait_for_everyone()
    newest = checkpoints.local_checkpoints(plan)
    if newest:
        rows += checkpoints.resumed_rows(newest[-1])
        logger.info("%s %s: resuming from step %d", plan.run, plan.stage, checkpoints.step_of(newest[-1]))
    trainer.train(resume_from_checkpoint=str(newest[-1]) if newest else None)
    sharding = sharding_record(trainer)
    model = final_model(trainer, plan)  # every process takes part in gathering a sharded model
    trainer.accelerator.wait_for_everyone()
    return finish(plan, store, model, processor, rows, sharding) if main else None


def sharding_record(trainer) -> dict[str, Any]:
    """How the devices held the model: the strategy, and the share of the parameters this process held."""
    plugin = trainer.accelerator.state.fsdp_plugin if trainer.is_fsdp_enabled else None
    params = list(trainer.model.parameters())
    local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in params)
    return {
        "strategy": "fsdp" if plugin else ("ddp" if trainer.accelerator.num_processes > 1 else "single"),
        "fsdp_version": plugin.fsdp_version if plugin else None,
        "reshard_after_forward": plugin.reshard_after_forward if plugin else None,
        "devices": trainer.accelerator.num_processes,
        "local_share": round(local / max(1, sum(p.numel() for p in params)), 4),
    }


def final_model(trainer, plan: TrainPlan):
    """The trained model, whole, on rank 0 (None elsewhere), LoRA merged: sharded, its full state is gathered from
    the devices into rank 0's memory (the 13B's fp32 state: about 53 GB of RAM) and becomes the model itself;
    otherwise it is the trainer's own model."""
    main = trainer.accelerator.is_main_process
    if not trainer.is_fsdp_enabled:
        model = trainer.accelerator.unwrap_model(trainer.model)
    else:
        state = gathered_state(trainer.model, keep=main)
        if not main:
            return None
        model = model_holding(state, plan.start)
    return model.merge_and_unload() if plan.mode == "lora" else model  # LoRA: a plain LLaVA again, adapters folded in


def model_holding(state: dict[str, Any], start: str):
    """The start folder's model with ``state``'s tensors as its weights: built without weights (meta) and given the
    tensors themselves, so the gathered state is held once, not copied into a second whole model."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText, GenerationConfig

    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(start))
    model.load_state_dict(state, assign=True)
    model.generation_config = GenerationConfig.from_pretrained(start)  # the start folder's defaults, as loaded
    return model


def gathered_state(model, keep: bool) -> dict[str, Any]:
    """The full state of a sharded model, gathered one tensor at a time (a collective: every process calls it, in the
    same order); only the process that keeps it holds more than one whole tensor at a time."""
    state = {}
    for name, value in model.state_dict().items():
        whole = value.full_tensor() if hasattr(value, "full_tensor") else value
        if keep:
            state[name] = whole.detach().cpu()
    return state


def finish(plan: TrainPlan, store: Store, model, processor, rows: list[dict], sharding: dict) -> dict[str, Any]:
    """Save the trained model as a Hugging Face folder, upload it, then stage.json: done."""
    from tasks.llava.model import save_llava

    folder = save_llava(model, processor, plan.stage_dir / "model")
    checkpoints.write_rows(plan.stage_dir / "metrics.jsonl", rows)
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        store.put_file(file, f"{plan.prefix}/model/{file.relative_to(folder).as_posix()}")
    store.put_file(plan.stage_dir / "metrics.jsonl", f"{plan.prefix}/metrics.jsonl")
    record = stage_record(plan, store, rows) | {"sharding": sharding}
    store.write_json(f"{plan.prefix}/stage.json", record)  # last: marks the stage done
    (plan.stage_dir / "stage.json").write_text(json.dumps(record, indent=2))
    checkpoints.drop_older(plan, store, record["steps"] + 1)  # a finished stage resumes from nothing
    return record


def stage_record(plan: TrainPlan, store: Store, rows: list[dict]) -> dict[str, Any]:
    return {
        "run": plan.run,
        "stage": plan.stage,
        "mode": plan.mode,
        "steps": rows[-1]["step"] if rows else 0,
        "first_loss": rows[0]["loss"] if rows else None,
        "last_loss": rows[-1]["loss"] if rows else None,
        "model": store.uri(f"{plan.prefix}/model"),
        "random_weights": plan.random_weights,
        "plan": {k: v for k, v in dataclasses.asdict(plan).items() if k not in ("s3", "store", "out")},
        "written_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
