"""What one device holds while a PathGen-LLaVA stage trains, estimated before it starts, and the refusal of a
configuration that cannot fit, naming the setting to change.

The model is counted on the meta device (no weights are read), so the estimate of LLaVA-v1.5-13B costs seconds and no
download: :func:`paper_estimate` gives the paper's configuration without any settings or command line. The terms
follow what the trainer keeps: fp32 weights (the model is loaded in fp32; bf16/fp16 is autocast for compute), fp32
gradients and AdamW's two fp32 moments for every trainable parameter, all three divided by the number of devices
under ``llava.sharding=full_shard`` (FSDP2, as DeepSpeed ZeRO-3 in LLaVA's own framework); activations per device in
the compute precision (Korthikanti et al. 2022: about 34 bytes x batch x tokens x hidden per 16-bit decoder layer,
without the attention matrix, which SDPA does not keep; with gradient checkpointing only each layer's input stays,
plus one layer recomputed), the logits (compute precision, their fp32 copy for the loss and its fp32 gradient) and,
sharded, the layers FSDP gathers at a time (the current and the prefetched one, plus the root's embeddings).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from typing import Any

from tasks.llava.plan import TrainPlan
from tasks.llava.train import lora_model, set_trainable

GIB = 1024**3
COMPUTE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
WEIGHT_BYTES = 4  # fp32 weights, gradients, AdamW moments: mixed precision keeps fp32 masters
ADAM_MOMENTS = 2
LAYER_ACTIVATION_FACTOR = 17  # 34 bytes per (token x hidden) at 2 bytes an element: 17 elements
CONTEXT_BYTES = 1 * GIB  # CUDA context, NCCL buffers and the allocator's slack, roughly


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs from a model: parameter counts and the language model's shape."""

    total: int  # every parameter of the trained model (LoRA adapters and the projector's trainable copy included)
    trainable: int
    largest_layer: int  # parameters of one decoder layer (FSDP gathers a layer at a time)
    root: int  # parameters outside the decoder layers (embeddings, lm_head, tower, projector)
    hidden: int
    layers: int
    vocab: int


@dataclass(frozen=True)
class MemoryPlan:
    """The settings that decide a device's share."""

    devices: int
    sharding: str  # full_shard | none
    precision: str  # bf16 | fp16 | fp32
    mode: str  # projector | full | lora
    batch_size: int
    max_length: int
    gradient_checkpointing: bool

    @property
    def sharded(self) -> bool:
        return self.sharding == "full_shard" and self.devices > 1 and self.mode != "lora"  # LoRA: data parallel


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per device, by what holds them."""

    plan: MemoryPlan
    parameters: float
    gradients: float
    optimizer: float
    activations: float
    gathered: float
    context: float = CONTEXT_BYTES

    @property
    def total(self) -> float:
        return self.parameters + self.gradients + self.optimizer + self.activations + self.gathered + self.context

    def describe(self) -> str:
        p = self.plan
        sharding = f"{p.sharding} over {p.devices} devices" if p.sharded else f"{p.devices} device(s), unsharded"
        return (
            f"about {self.total / GIB:.1f} GiB per device ({p.mode}, {p.precision}, {sharding}, batch {p.batch_size} x "
            f"{p.max_length} tokens, gradient checkpointing {'on' if p.gradient_checkpointing else 'off'}): "
            f"parameters {self.parameters / GIB:.1f}, gradients {self.gradients / GIB:.1f}, optimizer states "
            f"{self.optimizer / GIB:.1f}, activations {self.activations / GIB:.1f}, gathered layers "
            f"{self.gathered / GIB:.1f}, context {self.context / GIB:.1f} GiB"
        )


def estimate(shape: ModelShape, plan: MemoryPlan) -> MemoryEstimate:
    share = plan.devices if plan.sharded else 1
    compute = COMPUTE_BYTES[plan.precision]
    return MemoryEstimate(
        plan=plan,
        parameters=shape.total * WEIGHT_BYTES / share,
        gradients=shape.trainable * WEIGHT_BYTES / share,
        optimizer=shape.trainable * WEIGHT_BYTES * ADAM_MOMENTS / share,
        activations=activation_bytes(shape, plan, compute),
        gathered=(2 * shape.largest_layer + shape.root) * compute if plan.sharded else 0.0,
    )


def activation_bytes(shape: ModelShape, plan: MemoryPlan, compute: int) -> float:
    """Activations of one micro-batch at full length. Every mode keeps the language model's: stage 1's gradient
    reaches the projector through it."""
    tokens = plan.batch_size * plan.max_length
    layer = LAYER_ACTIVATION_FACTOR * tokens * shape.hidden * compute
    if plan.gradient_checkpointing:
        decoder = shape.layers * tokens * shape.hidden * compute + layer
    else:
        decoder = shape.layers * layer
    logits = tokens * shape.vocab * (compute + 2 * WEIGHT_BYTES)
    return float(decoder + logits)


# -- fitting ------------------------------------------------------------------------------------------------------


def remedies(shape: ModelShape, plan: MemoryPlan, capacity: float) -> list[str]:
    """The single setting changes that would fit, in the order a user would try them."""
    candidates: list[tuple[str, MemoryPlan]] = []
    if plan.sharding != "full_shard" and plan.devices > 1:
        candidates.append(("llava.sharding=full_shard", replace(plan, sharding="full_shard")))
    more = [d for d in (2, 4, 8, 16, 32, 64) if d > plan.devices]
    sharded = [(d, replace(plan, devices=d, sharding="full_shard")) for d in more]
    enough = next(((d, p) for d, p in sharded if _fits(shape, p, capacity)), None)
    if enough and not (candidates and _fits(shape, candidates[0][1], capacity)):  # sharding alone is enough
        candidates.append((f"llava.devices={enough[0]} with llava.sharding=full_shard", enough[1]))
    if not plan.gradient_checkpointing:
        candidates.append(("llava.gradient_checkpointing=true", replace(plan, gradient_checkpointing=True)))
    smaller = [replace(plan, batch_size=b) for b in _halvings(plan.batch_size)]
    if fitting := next((p for p in smaller if _fits(shape, p, capacity)), None):
        candidates.append((f"llava.batch_size={fitting.batch_size} (and more accumulation for the same global batch)",
                           fitting))  # fmt: skip
    fitting = [(change, p) for change, p in candidates if _fits(shape, p, capacity)]
    if not fitting:  # no single change is enough: the smallest sharded, checkpointed set of devices that is
        together = [replace(plan, devices=d, sharding="full_shard", gradient_checkpointing=True) for d in
                    (plan.devices, *more)]  # fmt: skip
        if enough := next((p for p in together if _fits(shape, p, capacity)), None):
            fitting.append((f"llava.devices={enough.devices} with llava.sharding=full_shard and "
                            "llava.gradient_checkpointing=true", enough))  # fmt: skip
    return [f"{change} ({estimate(shape, p).total / GIB:.1f} GiB)" for change, p in fitting]


def _halvings(value: int) -> list[int]:
    return [value // 2**i for i in range(1, int(math.log2(value)) + 1)] if value > 1 else []


def _fits(shape: ModelShape, plan: MemoryPlan, capacity: float) -> bool:
    return estimate(shape, plan).total <= capacity


def refusal(shape: ModelShape, plan: MemoryPlan, capacity: float, where: str) -> str | None:
    """Why the plan cannot train on devices of ``capacity`` bytes, naming the settings to change, or None."""
    found = estimate(shape, plan)
    if found.total <= capacity:
        return None
    fixes = remedies(shape, plan, capacity)
    if plan.mode == "full":
        fixes.append("llava.lora=true (LLaVA-1.5's LoRA recipe: llava.lr_stage2 2e-4; estimate it again)")
    advice = "; or ".join(fixes) if fixes else "a larger GPU (no single setting fits it)"
    return (
        f"{where} needs {found.describe()}, more than the {capacity / GIB:.1f} GiB a device holds "
        f"(llava.gpu_memory_gb, or the GPU's own): set {advice}"
    )


def memory_plan(plan: TrainPlan) -> MemoryPlan:
    return MemoryPlan(devices=plan.devices, sharding=plan.sharding, precision=plan.precision, mode=plan.mode,
                      batch_size=plan.batch_size, max_length=plan.max_length,
                      gradient_checkpointing=plan.gradient_checkpointing)  # fmt: skip


def check_stage(plan: TrainPlan, logger: logging.Logger) -> MemoryEstimate:
    """Log the stage's per-device estimate before it trains; refuse (ValueError: the stage fails with the reason,
    nothing retries it) a plan that does not fit the devices."""
    shape = folder_shape(plan.start, plan.mode, {"r": plan.lora_r, "alpha": plan.lora_alpha,
                                                   "dropout": plan.lora_dropout})  # fmt: skip
    found = estimate(shape, memory_plan(plan))
    logger.info("%s %s memory: %s", plan.run, plan.stage, found.describe())
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count() < plan.devices:
        raise ValueError(f"llava.devices is {plan.devices} but this worker sees {torch.cuda.device_count()} GPU(s): "
                         "run it where CUDA_VISIBLE_DEVICES names that many, or lower llava.devices")  # fmt: skip
    capacity = device_capacity(plan.gpu_memory_gb)
    if capacity and (reason := refusal(shape, memory_plan(plan), capacity, f"PathGen-LLaVA {plan.stage}")):
        raise ValueError(reason)
    return found


# -- counting a model ---------------------------------------------------------------------------------------------


def model_shape(model: Any, mode: str, lora: dict[str, Any] | None = None) -> ModelShape:
    """Counts of a LlavaForConditionalGeneration (on the meta device is enough) as the stage trains it."""
    text = model.config.text_config
    layers = model.model.language_model.layers
    largest = max(sum(p.numel() for p in layer.parameters()) for layer in layers)
    in_layers = sum(p.numel() for p in layers.parameters())
    set_trainable(model, mode)
    if mode == "lora":
        lora = lora or {}
        model = lora_model(model, lora.get("r", 128), lora.get("alpha", 256), lora.get("dropout", 0.05))
    total = sum(p.numel() for p in model.parameters())
    return ModelShape(
        total=total,
        trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
        largest_layer=largest,
        root=total - in_layers,
        hidden=int(text.hidden_size),
        layers=int(text.num_hidden_layers),
        vocab=int(text.vocab_size),
    )


def meta_model(config: Any):
    """The model of ``config`` without weights: shapes only, whatever its size."""
    import torch
    from transformers import LlavaForConditionalGeneration

    with torch.device("meta"):
        return LlavaForConditionalGeneration(config)


def folder_shape(folder: str, mode: str, lora: dict[str, Any] | None = None) -> ModelShape:
    """The shape of a saved LLaVA folder's model, read from its config.json only."""
    from transformers import AutoConfig

    return model_shape(meta_model(AutoConfig.from_pretrained(folder)), mode, lora)


def device_capacity(gpu_memory_gb: float | None) -> float | None:
    """Bytes one device holds: ``llava.gpu_memory_gb`` when set, else the smallest visible GPU's; None on CPU."""
    if gpu_memory_gb:
        return gpu_memory_gb * GIB
    import torch

    if not torch.cuda.is_available():
        return None
    return float(min(torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count())))


# -- the paper's configuration ------------------------------------------------------------------------------------


def paper_shape() -> ModelShape:
    """LLaVA-v1.5-13B as the paper trains it: CLIP ViT-L/14 at 336 px (PathGen-CLIP-L), the mlp2x_gelu projector
    and Vicuna-13B v1.5 (Llama-2-13B's shape), stage 2 in full."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    text = LlamaConfig(vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                       num_attention_heads=40, num_key_value_heads=40, max_position_embeddings=4096)  # fmt: skip
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768)  # fmt: skip
    config = LlavaConfig(vision_config=vision, text_config=text, projector_hidden_act="gelu", image_seq_length=576)
    return model_shape(meta_model(config), "full")


PAPER_PLAN = MemoryPlan(devices=8, sharding="full_shard", precision="bf16", mode="full", batch_size=16,
                        max_length=2048, gradient_checkpointing=True)  # fmt: skip
A100_80G = 80 * GIB


def paper_estimate() -> MemoryEstimate:
    """The paper's stage 2: LLaVA-v1.5-13B tuned in full on 8 x A100-80G, FSDP full shard (ZeRO-3), bf16, 16
    conversations of up to 2048 tokens per device (global batch 128), gradient checkpointing. Print it with
    ``python -c "from tasks.llava.memory import paper_estimate; print(paper_estimate().describe())"``."""
    return estimate(paper_shape(), PAPER_PLAN)
