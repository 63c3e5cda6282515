"""Settings of the caption agents (describe, revise, summarize) and their backends."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from pathgen.settings.base import (
    MAX_SEED,
    ModelName,
    Section,
)


class RoleSettings(Section):
    backend: Literal["transformers", "openai", "vllm"] = "transformers"
    model: ModelName = Field(
        None, description="hub id, local folder or served model name; unset: a tiny random-weight model (offline)"
    )
    prompt: str = Field(..., description="versioned prompt under agents/prompts (e.g. describe.v1) or a .txt path")
    temperature: float = Field(0.2, ge=0.0, le=2.0)
    top_p: float = Field(0.9, gt=0.0, le=1.0)
    max_new_tokens: int = Field(..., ge=1, le=8192)
    max_words: int = Field(..., ge=1, le=100_000, description="a longer reply is rejected as over-long")
    seed: int = Field(0, ge=0, le=MAX_SEED)
    revision: str | None = Field(
        None, description="hub revision (branch, tag or commit) of a hub model; part of the model's identity"
    )


class AgentsSettings(Section):
    describe: RoleSettings = Field(
        default_factory=lambda: RoleSettings(prompt="describe.v1", max_new_tokens=384, max_words=400)
    )
    revise: RoleSettings = Field(
        default_factory=lambda: RoleSettings(prompt="revise.v1", max_new_tokens=448, max_words=450)
    )
    summarize: RoleSettings = Field(
        default_factory=lambda: RoleSettings(prompt="summarize.v1", max_new_tokens=96, max_words=120)
    )
    shorten_prompt: str = "shorten.v1"
    max_caption_tokens: int = Field(77, ge=8, le=77, description="CLIP tokens, start and end included")
    shorten_attempts: int = Field(2, ge=0, le=5, description="re-asks with the measured count before trimming")
    slides_per_task: int = Field(
        4, ge=1, le=10_000, description="slides captioned by one Prefect task (their patches share model batches)"
    )
    concurrency: int = Field(
        1,
        ge=1,
        le=256,
        description="caption tasks at once in one worker; above 1 only for the openai backend (a local "
        "model, vLLM or transformers, serves one batch at a time)",
    )
    batch_size: int = Field(16, ge=1, le=4096, description="transformers backend: requests per generate call")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$")
    openai_base_url: str | None = Field(None, description="e.g. http://gpu-node:8000/v1; key from OPENAI_API_KEY")
    openai_concurrency: int = Field(16, ge=1, le=1024)
    openai_timeout_seconds: float = Field(120.0, gt=0.0, le=3600.0)
    vllm_max_model_len: int = Field(4096, ge=256, le=2**21)
    max_image_pixels: int = Field(
        672 * 672,
        ge=64 * 64,
        le=8192 * 8192,
        description="vllm and openai backends: images are shrunk to at most this many pixels",
    )
    vllm_gpu_memory_utilization: float = Field(0.9, gt=0.0, le=1.0)
    vllm_tensor_parallel_size: int = Field(1, ge=1, le=64)
    model_cache: str | None = Field(None, description="where tiny offline models are built (default ~/.cache)")
