"""transformers' ``Trainer`` as one PathGen-LLaVA stage uses it (the trainer LLaVA-1.5 itself trains with).

What is ours: the data order (a seeded permutation per epoch; with several devices only whole global batches, so each
global batch is the one a single process would take), the arguments (LLaVA-1.5's schedule, clipping and checkpoint
rotation; FSDP2 full sharding over the devices), a callback that writes the metric rows and mirrors each
checkpoint to the store, and on CPU the promotion of accelerate's data parallelism to the FSDP2 it would run on GPUs
(accelerate offers FSDP on accelerators only; FSDP2 itself runs on gloo, so the CPU tests shard for real).

The loss is weighted by tokens under gradient accumulation and across devices: the trainer counts the assistant
tokens of every micro-batch of an optimizer step on every device (``num_items_in_batch``) and the model divides its
summed loss by that count, so a step's loss and gradient are those of one batch holding all its conversations.
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any

import torch
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from safetensors.torch import save_file
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.utils import SAFE_WEIGHTS_NAME

from tasks.llava import checkpoints
from tasks.llava.plan import TrainPlan

MAX_GRAD_NORM = 1.0  # LLaVA-1.5's
SAVE_TOTAL_LIMIT = 1  # LLaVA-1.5's scripts keep the newest checkpoint only
# How long a process waits in a collective (the Trainer's default is 30 minutes). Rank 0 uploads each whole
# checkpoint to the store while the others wait in the next collective: stage 2 of the 13B in full is about 160 GB
# (fp32 weights and AdamW's two moments), 45 minutes at 60 MB/s. Six hours allow for slow links to S3; a process that
# truly hangs is found that much later.
COLLECTIVE_TIMEOUT_S = 6 * 3600


class StageOrder(torch.utils.data.Sampler):
    """The conversations of an epoch in a seeded permutation (seed + epoch). With several devices only whole global
    batches (batch_size x devices) are used, so every device takes the same number of steps and each global batch
    holds what one process with that batch would take; one device keeps the epoch's short last batch."""

    def __init__(self, size: int, batch_size: int, world: int, seed: int) -> None:
        span = batch_size * world
        self.size, self.seed, self.epoch = size, seed, 0
        self.usable = size if world == 1 else size // span * span
        if not self.usable:
            raise ValueError(f"{size} conversations make no batch of {batch_size} x {world} devices")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.usable

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.size, generator=generator)[: self.usable].tolist())


def steps_per_epoch(size: int, batch_size: int, world: int, grad_accum: int) -> int:
    usable = size if world == 1 else size // (batch_size * world) * (batch_size * world)
    return math.ceil(math.ceil(usable / (batch_size * world)) / grad_accum)


def total_steps(plan: TrainPlan, size: int, world: int) -> int:
    steps = plan.epochs * steps_per_epoch(size, plan.batch_size, world, plan.grad_accum)
    return min(steps, plan.max_steps) if plan.max_steps else steps


def layer_classes(model) -> list[str]:
    """The language model's decoder layers, which FSDP shards as units. The vision tower stays in the root unit,
    gathered at every step: a batch without images on one device and with images on another would otherwise gather
    different units and hang both."""
    lm = next(module for name, module in model.named_modules() if name.endswith("language_model"))
    names = set(getattr(lm, "_no_split_modules", None) or [])
    return sorted(names & {type(module).__name__ for module in lm.modules()})


def projector_of(model):
    """The projector (under LoRA, peft's wrapper that runs its trainable copy)."""
    return next(module for name, module in model.named_modules() if name.endswith("multi_modal_projector"))


def projector_touch(model) -> torch.Tensor:
    """A zero that depends on every projector weight: added to the loss of a batch without images, so the projector
    has a (zero) gradient on every device, as LLaVA's own trainer keeps its image path in every step's graph."""
    projector = projector_of(model)
    first = projector.linear_1 if hasattr(projector, "linear_1") else projector_of(projector.modules_to_save)
    zeros = torch.zeros(1, first.in_features, device=first.weight.device, dtype=first.weight.dtype)
    return projector(zeros).sum() * 0.0


def sharding_config(plan: TrainPlan, world: int, model) -> dict[str, Any]:
    """TrainingArguments' FSDP part: FSDP2 full sharding (parameters, gradients and AdamW states split over the
    devices, as DeepSpeed ZeRO-3 in LLaVA's framework), sharded checkpoints. Nothing for one device, ``none``, or
    LoRA: its adapters are small, and peft's wrappers do not shard cleanly with FSDP2 (LoRA is data parallel)."""
    if world == 1 or plan.sharding == "none" or plan.mode == "lora":
        return {}
    config = {
        "version": 2,
        "reshard_after_forward": True,  # full shard: a layer's weights are gathered for its use only
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "transformer_layer_cls_to_wrap": layer_classes(model),
        "state_dict_type": "SHARDED_STATE_DICT",  # each device writes its shard; resumable on the same devices
    }
    return {"fsdp": True, "fsdp_config": config}


def training_arguments(plan: TrainPlan, world: int, total: int, model, text_only: bool) -> TrainingArguments:
    gpu = torch.cuda.is_available()
    return TrainingArguments(
        output_dir=str(plan.checkpoint_dir),
        per_device_train_batch_size=plan.batch_size,
        gradient_accumulation_steps=plan.grad_accum,
        max_steps=total,
        learning_rate=plan.lr,
        weight_decay=plan.weight_decay,
        warmup_steps=plan.warmup_ratio,  # below 1: a share of the steps
        lr_scheduler_type="cosine",
        max_grad_norm=MAX_GRAD_NORM,
        optim="adamw_torch",
        bf16=plan.precision == "bf16",
        fp16=plan.precision == "fp16",
        tf32=True if gpu and torch.cuda.get_device_capability()[0] >= 8 else None,  # LLaVA-1.5's, Ampere on
        use_cpu=not gpu,
        seed=plan.seed,
        logging_steps=1,
        save_strategy="steps",
        save_steps=plan.save_steps,
        save_total_limit=SAVE_TOTAL_LIMIT,
        dataloader_num_workers=plan.workers,
        remove_unused_columns=False,
        ddp_timeout=COLLECTIVE_TIMEOUT_S,
        ddp_find_unused_parameters=text_only,  # a text-only batch leaves the projector without a gradient
        report_to="none",
        disable_tqdm=True,
        **sharding_config(plan, world, model),
    )


class StageTrainer(Trainer):
    """The Trainer with the stage's data order, a guard for a step without tokens to learn, and FSDP on CPU."""

    def __init__(self, *args, order: StageOrder, **kwargs) -> None:
        self.order = order
        self.samples = 0  # conversations of the current step on this device
        super().__init__(*args, **kwargs)
        self.projector_trains = any(p.requires_grad for p in projector_of(self.model).parameters())
        self.remove_callback(PrinterCallback)
        self.remove_callback(ProgressCallback)

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        state = self.accelerator.state
        if self.args.fsdp_plugin_args and state.distributed_type == DistributedType.MULTI_CPU:
            state.distributed_type = DistributedType.FSDP
            state.fsdp_plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
            self.is_fsdp_enabled = True

    def _save(self, output_dir=None, state_dict=None) -> None:
        """Unsharded, a checkpoint holds the trained weights only (LLaVA's own trainer saves stage 1's projector
        alone; the frozen ones are the start folder's), under the names the trainer loads them by: save_pretrained
        would write LLaVA's original checkpoint names, which a resume's load_state_dict does not find. Sharded
        checkpoints are FSDP's; LoRA's are peft's adapters."""
        model = self.accelerator.unwrap_model(self.model)
        if self.is_fsdp_enabled or hasattr(model, "peft_config") or output_dir is None:
            return super()._save(output_dir, state_dict)
        trained = self.trained_names(model)
        weights = {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k in trained}
        os.makedirs(output_dir, exist_ok=True)
        save_file(weights, os.path.join(output_dir, SAFE_WEIGHTS_NAME), metadata={"format": "pt"})

    def _issue_warnings_after_load(self, load_result) -> None:
        """A checkpoint of trained weights lacks the frozen ones by design: only others are worth a warning."""
        trained = self.trained_names(self.accelerator.unwrap_model(self.model))
        load_result.missing_keys[:] = [k for k in load_result.missing_keys if k in trained]
        super()._issue_warnings_after_load(load_result)

    @staticmethod
    def trained_names(model) -> set[str]:
        return {name for name, p in model.named_parameters() if p.requires_grad}

    def _get_train_sampler(self, train_dataset=None) -> StageOrder:
        return self.order

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.samples += len(inputs["input_ids"])
        return super().training_step(model, inputs, num_items_in_batch)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if torch.is_tensor(num_items_in_batch):  # a step whose truncation left nothing to learn: a zero gradient
            num_items_in_batch = num_items_in_batch.clamp(min=1)
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if "pixel_values" in inputs or return_outputs or not self.projector_trains:
            return loss
        return loss + projector_touch(model)


class StageLog(TrainerCallback):
    """One metric row per optimizer step (rank 0 keeps them), each checkpoint committed to the store, no checkpoint
    at the last step (the finished model follows at once)."""

    def __init__(self, plan: TrainPlan, trainer: StageTrainer, rows: list[dict], logger: logging.Logger) -> None:
        self.plan, self.trainer, self.rows, self.logger = plan, trainer, rows, logger
        self.started = time.perf_counter()
        self.store = plan.open_store()

    def on_step_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()
        self.trainer.samples = 0

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            control.should_save = False
        self.seconds = time.perf_counter() - self.started
        self.step_samples = self.trainer.samples * args.world_size

    def on_log(self, args, state, control, logs=None, **kwargs):
        if "loss" not in (logs or {}) or not state.is_world_process_zero:
            return
        step = state.global_step
        self.rows.append({"stage": self.plan.stage, "step": step, "epoch": round(state.epoch, 4),
                          "loss": logs["loss"], "lr": logs["learning_rate"],
                          "samples_per_s": round(self.step_samples / max(self.seconds, 1e-9), 2)})  # fmt: skip
        if step % 10 == 0 or step == state.max_steps:
            self.logger.info("%s %s step %d/%d loss %.4f", self.plan.run, self.plan.stage, step, state.max_steps,
                             logs["loss"])  # fmt: skip

    def on_save(self, args, state, control, **kwargs):
        self.trainer.accelerator.wait_for_everyone()  # every device's shard is written
        if state.is_world_process_zero:
            folder = self.plan.checkpoint_dir / f"checkpoint-{state.global_step}"
            checkpoints.commit(self.plan, self.store, folder, self.rows)
