"""The plan of one PathGen-LLaVA training stage: everything its processes need, JSON-serialisable so that every
process torchrun starts reads the same one."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pathgen.settings import S3Settings
from tasks.store.objects import Store

RUNS = "models/llava"


@dataclass
class TrainPlan:
    run: str
    stage: str  # stage1 | stage2
    data: str  # the LLaVA data folder
    start: str  # the Hugging Face folder this stage starts from
    out: str  # local stage folder: checkpoints/, model/, metrics.jsonl
    store: str
    s3: dict[str, Any]
    mode: str  # projector | full | lora
    lr: float
    epochs: int
    max_steps: int | None
    batch_size: int
    grad_accum: int
    max_length: int
    warmup_ratio: float
    weight_decay: float
    lora_r: int
    lora_alpha: int
    lora_dropout: float
    precision: str  # bf16 | fp16 | fp32
    gradient_checkpointing: bool
    devices: int
    workers: int
    save_steps: int
    seed: int
    random_weights: bool
    sharding: str = "full_shard"  # full_shard (FSDP2 over the devices) | none (a full copy on each)
    gpu_memory_gb: float | None = None  # the memory a device holds; unset: the GPU's own

    @property
    def prefix(self) -> str:
        return f"{RUNS}/{self.run}/{self.stage}"

    @property
    def stage_dir(self) -> Path:
        return Path(self.out)

    @property
    def checkpoint_dir(self) -> Path:
        """Where the trainer writes its ``checkpoint-N`` folders."""
        return self.stage_dir / "checkpoints"

    def open_store(self) -> Store:
        return Store(self.store, S3Settings(**self.s3))
