"""Settings of PathGen-LLaVA training."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pathgen.settings.base import (
    MAX_SEED,
    ModelName,
    Section,
    SettingsError,
    multiples_near,
)


class LlavaSettings(Section):
    """PathGen-LLaVA: vision tower + two-layer GELU projector + causal LM; stage 1 trains the projector on caption
    pairs, stage 2 tunes on instruction conversations (fully or with LoRA)."""

    vision: ModelName = Field(
        None,
        description="vision tower: a PathGen-CLIP checkpoint, an open_clip NAME:PRETRAINED, or a transformers CLIP/"
        "SigLIP hub id or folder; unset: the newest PathGen-CLIP checkpoint in the store, else tiny-random",
    )
    language_model: ModelName = Field(
        None, description="causal LM hub id or local folder; unset: a tiny random-weight LM (offline)"
    )
    run: str | None = Field(None, description="run name under models/llava/; unset: a hash of the training inputs")
    lr_stage1: float = Field(1e-3, gt=0.0, le=1.0, description="projector learning rate (LLaVA-1.5: 1e-3)")
    lr_stage2: float = Field(2e-5, gt=0.0, le=1.0, description="instruction tuning learning rate (LLaVA-1.5: 2e-5)")
    epochs_stage1: int = Field(1, ge=1, le=1000)
    epochs_stage2: int = Field(1, ge=1, le=1000)
    max_steps: int | None = Field(None, ge=1, le=10_000_000, description="cap on optimizer steps per stage")
    batch_size: int = Field(16, ge=1, le=4096, description="conversations per device and micro-batch")
    grad_accum: int = Field(
        1, ge=1, le=1024, description="micro-batches per optimizer step of a stage without a global batch set"
    )
    global_batch_stage1: int | None = Field(
        None,
        ge=1,
        le=2**20,
        description="stage 1 conversations per optimizer step over all devices (LLaVA-1.5: 256); set, the stage's "
        "micro-batches per step are global / (batch_size x devices), which must divide; unset: grad_accum",
    )
    global_batch_stage2: int | None = Field(
        None,
        ge=1,
        le=2**20,
        description="stage 2 conversations per optimizer step over all devices (LLaVA-1.5: 128); set, the stage's "
        "micro-batches per step are global / (batch_size x devices), which must divide; unset: grad_accum",
    )
    max_length: int = Field(2048, ge=16, le=131_072, description="tokens per conversation, image tokens included")
    warmup_ratio: float = Field(0.03, ge=0.0, le=0.5, description="share of steps with a linear warmup (then cosine)")
    weight_decay: float = Field(0.0, ge=0.0, le=10.0)
    lora: bool = Field(False, description="stage 2 with LoRA on the LM's attention projections (merged when saved)")
    lora_r: int = Field(128, ge=1, le=4096)
    lora_alpha: int = Field(256, ge=1, le=65536)
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0)
    vision_feature_layer: int = Field(-2, ge=-64, le=-1, description="vision hidden layer fed to the projector")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field("auto", description="auto: bf16 on GPU, else fp32")
    gradient_checkpointing: bool = False
    devices: int = Field(1, ge=1, le=64, description="GPUs; more than one runs torchrun --nproc-per-node")
    sharding: Literal["full_shard", "none"] = Field(
        "full_shard",
        description="full_shard: parameters, gradients and AdamW states split over llava.devices (FSDP2, as LLaVA's "
        "DeepSpeed ZeRO-3; LoRA stays data parallel); none: a full copy on every device",
    )
    gpu_memory_gb: float | None = Field(
        None, gt=0, le=4096, description="memory of one device the stage must fit in; unset: the GPU's own"
    )
    workers: int = Field(2, ge=0, le=64, description="data loader workers per device")
    save_steps: int = Field(500, ge=1, le=10_000_000, description="a resumable checkpoint every N optimizer steps")
    seed: int = Field(0, ge=0, le=MAX_SEED)
    work_dir: str | None = Field(None, description="local folder for models and checkpoints; unset: ~/.cache")

    def grad_accum_of(self, stage: str) -> int:
        """Micro-batches per optimizer step of ``stage`` (stage1 | stage2): from its global batch when one is set
        (LLaVA-1.5 states its batches globally: per device x accumulation x devices), else ``grad_accum``."""
        key = f"global_batch_{stage}"
        total = getattr(self, key)
        if total is None:
            return self.grad_accum
        step = self.batch_size * self.devices
        if total % step:
            raise SettingsError(
                f"llava.{key} {total} is no multiple of llava.batch_size x llava.devices ({self.batch_size} x "
                f"{self.devices} = {step}): set it to {multiples_near(total, step)}, or change llava.batch_size or "
                "llava.devices"
            )
        return total // step

    @model_validator(mode="after")
    def _global_batches_divide(self) -> LlavaSettings:
        if self.global_batch_stage1 and self.global_batch_stage2 and self.grad_accum != 1:
            raise SettingsError(
                f"llava.grad_accum {self.grad_accum} would be ignored: both stages derive theirs from "
                "llava.global_batch_stage1 and llava.global_batch_stage2; leave llava.grad_accum at 1"
            )
        for stage in ("stage1", "stage2"):
            self.grad_accum_of(stage)  # one that does not divide fails here, before any work
        return self
