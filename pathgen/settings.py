"""One settings model for the whole factory.

Precedence, lowest to highest: defaults < YAML file < ``PATHGEN_*`` environment < ``--set key=value``.
Nested fields use dots on the command line (``patch.target_mpp=0.25``) and double underscores in the
environment (``PATHGEN_PATCH__TARGET_MPP=0.25``). One entry of a map setting is a further dot or double underscore
(``slides.mpp_overrides.<slide_id>=0.5``, ``PATHGEN_SLIDES__MPP_OVERRIDES__<SLIDE_ID>=0.5``); a list setting takes
comma-separated values (``slides.roots=/a,/b``) or a YAML list (``slides.roots=[/a, /b]``). A ``PATHGEN_*`` variable
that names no setting is an error, except the few in ``NON_SETTING_ENV_VARS``. Credentials never live here: they
come from the environment. A YAML file may hold named variants of itself (``variants: {NAME: {...settings}}``):
``FILE#NAME`` loads the file with that variant deep-merged over it; ``variants`` itself is never a setting.
"""

from __future__ import annotations

import difflib
import os
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from pathgen.errors import cut, short_repr

ENV_PREFIX = "PATHGEN_"
# PATHGEN_* variables that are not settings but are read elsewhere; every other PATHGEN_* variable must name a
# setting, so that a mistyped one fails instead of being ignored. Add a variable here when code starts reading it.
NON_SETTING_ENV_VARS = frozenset(
    {
        "PATHGEN_S3_ENDPOINT_URL",  # tasks/store/objects.py: the S3 endpoint (prefect.yaml, deploy/local-stack.sh)
        "PATHGEN_STAGING_DIR",  # tasks/store/objects.py: local copies of remote objects
        "PATHGEN_HOME",  # prefect.yaml and deploy/Dockerfile.gpu-worker: where workers find the code
        "PATHGEN_THREADS",  # pathgen/processes.py: the thread budget
        "PATHGEN_LOCAL_API_IDLE_S",  # pathgen/local_api.py: how long the shared local Prefect API waits
        "PATHGEN_API_LOST_S",  # pathgen/local_api.py: how long a command waits for a silent Prefect API
        "PATHGEN_STACK_STATE",  # deploy/local-stack.sh: marks the processes the local stack started
        "PATHGEN_DIGEST_CACHE",  # pathgen/digest.py: cache of model folder digests
        "PATHGEN_CHECKPOINT_CACHE_GB",  # tasks/clip/spec.py: the bound of the fetched-checkpoint cache
        "PATHGEN_MODEL_CACHE",  # agents/tiny.py: where the tiny random-weight models are built
        "PATHGEN_OPENAI_API_KEY",  # agents/backends/openai_compat.py: a credential, never a setting
        "PATHGEN_KILL_TRIALS",  # tests/test_exactly_once.py, which runs `pathgen` with it set
        "PATHGEN_KILL_SEED",  # tests/test_exactly_once.py
    }
)


# Finest patch resolution accepted: slide scanners stop near 0.1 µm/px (100x oil), so a finer target only upsamples,
# and the grid of a slide grows with (patch_px x target_mpp)^-2: 1e-6 µm/px would be ~10^11 cells of one slide.
MIN_TARGET_MPP = 0.05
MAX_SEED = 2**32 - 1  # numpy, torch and the OpenAI-compatible servers all take a 32-bit unsigned seed
MAX_SLIDE_MPP = 100.0  # a slide coarser than 100 µm/px holds no cells worth a caption
MAX_YAML_BYTES = 2**20  # a settings file (or prompts file) larger than this is refused before it is parsed
MAX_ERRORS_SHOWN = 10  # one settings error lists at most this many fields


def _multiples_near(value: int, factor: int) -> str:
    """The multiples of ``factor`` on either side of ``value`` (the nearest positive ones), for an error's fix."""
    below = value - value % factor
    return " or ".join(str(v) for v in (below, below + factor) if v > 0)


def _blank_is_unset(value: Any) -> Any:
    return None if isinstance(value, str) and not value.strip() else value


# A model given as "" (``--set agents.describe.model=``) means unset, as null does; never the current folder.
ModelName = Annotated[str | None, BeforeValidator(_blank_is_unset)]


class SettingsError(ValueError):
    """A setting is wrong; raised before any work starts."""


class _AliasRefused(yaml.composer.ComposerError):
    """A YAML alias (``*name``) in settings: refused, since a few hundred bytes of nested aliases expand to
    gigabytes (the "billion laughs")."""


class _NoAliasLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses aliases before composing them (anchors alone are harmless)."""

    def compose_node(self, parent, index):  # noqa: ANN001, ANN201 - PyYAML's signature
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise _AliasRefused(
                None,
                None,
                f"found the alias *{cut(str(event.anchor), 60)}: aliases are not allowed here (nested aliases "
                "expand without bound); write the value out in full",
                event.start_mark,
            )
        return super().compose_node(parent, index)


def load_yaml(text: str, what: str) -> Any:
    """Parse settings YAML without alias expansion and with a size bound; SettingsError naming ``what`` (a file,
    a variable, a ``--set`` key) and the fix otherwise."""
    if len(text) > MAX_YAML_BYTES:
        raise SettingsError(
            f"{what} is {len(text)} characters long, more than the {MAX_YAML_BYTES} allowed for settings YAML; "
            "check that it is the right file"
        )
    try:
        return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader subclass
    except _AliasRefused as exc:
        raise SettingsError(f"{what}: {cut(str(exc))}") from None


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PatchSettings(_Section):
    target_mpp: float = Field(
        0.5,
        ge=MIN_TARGET_MPP,
        le=64.0,
        description="microns per pixel of the saved patches; at least 0.05: scanners stop near 0.1 µm/px, a finer "
        "target only upsamples and multiplies the grid (and the time) by (0.5 / target_mpp)²",
    )
    patch_px: int = Field(672, ge=32, le=4096, description="side of a saved patch in pixels")
    jpeg_quality: int = Field(90, ge=50, le=100)
    positions_box_px: int = Field(
        672,
        ge=16,
        le=8192,
        description="level-0 side of the boxes named by a PathGen JSON source (the paper read 672 px)",
    )
    positions_resample: bool = Field(
        False,
        description="resample the level-0 boxes of a PathGen JSON source to patch_px (mpp = slide MPP x "
        "positions_box_px / patch_px); off keeps them as the level-0 pixels, positions_box_px wide",
    )


class TissueSettings(_Section):
    threshold: float = Field(0.5, ge=0.0, le=1.0, description="minimum tissue fraction of a grid cell")
    mask_downsample: float = Field(32.0, ge=1.0, le=1024.0, description="mask resolution relative to level 0")
    min_saturation: int = Field(
        20, ge=0, le=255, description="Otsu's threshold never goes below this (plain glass has only noise)"
    )
    median_px: int = Field(7, ge=1, le=255, description="median blur kernel on the mask image (odd)")
    closing_px: int = Field(5, ge=1, le=255, description="morphological closing kernel on the mask")
    min_area_um2: float = Field(50_000.0, ge=0.0, le=1e10, description="tissue pieces smaller than this are dropped")
    min_background_value: int = Field(
        150,
        ge=0,
        le=255,
        description="bright-field glass is bright: a slide whose background is darker is not bright-field",
    )

    @field_validator("median_px")
    @classmethod
    def _odd(cls, value: int) -> int:
        if value % 2 == 0:
            raise ValueError("must be odd (a median kernel has a centre)")
        return value


class QualitySettings(_Section):
    enabled: bool = True
    analysis_px: int = Field(224, ge=32, le=4096, description="patches are scored at this size to keep scoring cheap")
    max_background_fraction: float = Field(0.6, ge=0.0, le=1.0)
    min_sharpness: float = Field(
        25.0, ge=0.0, le=1e6, description="minimum variance of the Laplacian (at analysis_px); lower is blurred"
    )
    max_pen_fraction: float = Field(0.05, ge=0.0, le=1.0, description="maximum share of pen-mark coloured pixels")


class SelectionSettings(_Section):
    method: Literal["representative", "random", "all"] = Field(
        "representative", description="representative (CLIP clusters + prompt retrieval), seeded random, or all"
    )
    max_per_slide: int = Field(256, ge=1, le=100_000, description="cap on patches kept per slide")
    seed: int = Field(0, ge=0, le=MAX_SEED)
    clusters: int | None = Field(None, ge=1, le=100_000, description="fixed k for k-means; unset uses the paper's rule")
    cluster_rule_factor: float = Field(
        1.6, gt=0.0, le=1000.0, description="k = ceil(sqrt(factor * N / 128)) for N candidates (PathGen-1.6M)"
    )
    retrieval_top_k: int = Field(
        16, ge=0, le=100_000, description="K: top patches by attribute prompts, and by findings"
    )
    prompts_file: str | None = Field(None, description="YAML of extra or replacement attribute prompts per project")
    findings_file: str | None = Field(None, description="JSON map slide_id -> report finding sentences")
    duplicate_threshold: float = Field(
        0.88, gt=0.0, le=1.0, description="a patch this similar (cosine) to a kept one is dropped"
    )


class EmbeddingSettings(_Section):
    model: ModelName = Field(None, description="open_clip model name; unset builds the tiny-random model")
    pretrained: ModelName = Field(None, description="open_clip pretrained tag or a local checkpoint path")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$")
    batch_size: int = Field(64, ge=1, le=4096)


class SlideSettings(_Section):
    default_mpp: float | None = Field(
        None,
        gt=0.0,
        le=MAX_SLIDE_MPP,
        description="MPP assumed for slides that carry none; unset means such slides fail",
    )
    mpp_overrides: dict[str, Annotated[float, Field(gt=0.0, le=MAX_SLIDE_MPP)]] = Field(
        default_factory=dict, description="slide_id (or file name) -> MPP, wins over the slide's own metadata"
    )
    project: str | None = Field(
        None,
        description="TCGA project of every slide not in slides.projects (e.g. TCGA-BRCA), over the source's GDC "
        "metadata and the slide's barcode (tasks/slides/projects.py)",
    )
    projects: dict[str, str] = Field(default_factory=dict, description="slide_id -> TCGA project")
    roots: list[str] = Field(
        default_factory=list,
        description="folders or URLs searched for slides named by a GDC manifest or a PathGen JSON file",
    )
    verify_md5_remote: bool = Field(
        False, description="check a GDC manifest's md5 for remote slides too (reads each object once more)"
    )


class ExtractSettings(_Section):
    concurrency: int = Field(2, ge=1, le=256, description="slide groups processed at once")
    group_size: int = Field(4, ge=1, le=10_000, description="slides per Prefect task")
    thumbnail_px: int = Field(1024, ge=64, le=16384, description="longest side of thumbnail.png")
    read_ahead: int = Field(
        4, ge=0, le=64, description="patches one reader thread decodes ahead while the worker encodes (0: off)"
    )


class RetrySettings(_Section):
    """The one retry policy for storage and model backends. Only infrastructure errors are retried; bad input
    and content failures are recorded at once."""

    io_retries: int = Field(3, ge=0, le=20, description="retries of one storage or backend call, with backoff")
    backoff_seconds: float = Field(1.0, ge=0.0, le=600.0, description="first backoff; doubles with each retry")
    task_retries: int = Field(2, ge=0, le=10, description="Prefect retries of a task that failed on infrastructure")
    task_retry_delay_seconds: float = Field(
        30.0, ge=0.0, le=86400.0, description="delay before a task's first retry; x4 for each further one"
    )


class S3Settings(_Section):
    # Endpoint and keys come from the environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...), never from here.
    # Two retry loops are stacked: botocore's (max_attempts) inside s3fs's (s3fs_retries), so one S3 call that gets
    # no answer ends after about (connect_timeout + read_timeout) x max_attempts x (s3fs_retries + 1) seconds.
    connect_timeout: float = Field(
        5.0,
        gt=0.0,
        le=3600.0,
        description="seconds to open a connection; one unanswered call ends after about "
        "(connect_timeout + read_timeout) x max_attempts x (s3fs_retries + 1) seconds",
    )
    read_timeout: float = Field(
        60.0,
        gt=0.0,
        le=3600.0,
        description="seconds to wait for each read of a reply; worst case of one call: "
        "(connect_timeout + read_timeout) x max_attempts x (s3fs_retries + 1)",
    )
    max_attempts: int = Field(
        3,
        ge=1,
        le=20,
        description="botocore attempts per request, the first included (multiplies the worst case of a call)",
    )
    s3fs_retries: int = Field(
        1,
        ge=0,
        le=10,
        description="s3fs's own retries of a failed call, each with max_attempts botocore attempts; worst case of "
        "one call: (connect_timeout + read_timeout) x max_attempts x (s3fs_retries + 1) seconds",
    )
    block_size: int = Field(
        4 * 2**20,
        ge=2**16,
        le=2**30,
        description="bytes per ranged read of a remote slide (kept in an LRU block cache)",
    )


class CleanupSettings(_Section):
    stale_temp_grace_seconds: float = Field(
        3600.0,
        ge=0.0,
        le=365 * 86400.0,
        description="local temporary files and staged files untouched this long are removed; those of a dead "
        "process on this host are removed at once (S3 writes leave no temporary objects)",
    )


class PartsSettings(_Section):
    """A ``parts=N`` run as a deployment: the parent starts N child runs on the pool's workers and waits for them."""

    timeout_seconds: float = Field(
        2 * 86400.0,
        gt=0.0,
        le=30 * 86400.0,
        description="the most the parent waits for its child runs (default 2 days: above the longest part of a "
        "production job); then children that never started are cancelled and reported with Prefect's reason (no "
        "worker, pool or queue paused, concurrency slots taken), running ones are reported unfinished, and the "
        "slides of both stay pending for the next run. Why a child has not started is logged within a minute",
    )


class RoleSettings(_Section):
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


class AgentsSettings(_Section):
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


class PairSetSettings(_Section):
    """One stage's training pairs: generated pairs of an agents_hash in the store, or an external folder of images
    with a CSV/JSONL of captions (how users bring Quilt-1M or ARCH)."""

    agents_hash: str | None = Field(
        None, description="pairs/<agents_hash>/ in the store; unset: the only agents_hash there (an error if several)"
    )
    folder: str | None = Field(None, description="external set: a local folder of images (instead of agents_hash)")
    captions: str | None = Field(
        None, description="external set: CSV or JSONL beside the images with an image path and a caption per row"
    )
    image_key: str = Field("image", description="column of the captions file naming the image, relative to folder")
    caption_key: str = Field("caption", description="column of the captions file holding the caption")
    epochs: int = Field(1, ge=1, le=1000)

    @property
    def external(self) -> bool:
        return self.folder is not None


class ClipSettings(_Section):
    """PathGen-CLIP training with open_clip's own trainer (open_clip_train)."""

    model: ModelName = Field(
        None,
        description="open_clip model name; unset: ViT-B-16 with clip.pretrained, else the tiny-random model. Named "
        "without clip.pretrained, that architecture trains from random initialisation (RANDOM WEIGHTS). A tag "
        "trained with QuickGELU (openai) trains the name's -quickgelu twin (ViT-B-16-quickgelu)",
    )
    pretrained: ModelName = Field(
        None, description="open_clip pretrained tag (openai) or checkpoint path; unset trains from random weights"
    )
    run: str | None = Field(None, description="run name under models/clip/; unset: a hash of the training inputs")
    lr: float = Field(3e-5, gt=0.0, le=1.0)
    weight_decay: float = Field(0.1, ge=0.0, le=10.0)
    batch_size: int = Field(
        384,
        ge=2,
        le=65536,
        description="global batch: pairs per optimizer step over all clip.devices (the paper's 384); each device "
        "takes batch_size / devices, which must divide; lowered to the pairs available",
    )
    warmup: int = Field(100, ge=0, le=10_000_000, description="warmup steps of the cosine schedule")
    precision: str = Field("auto", pattern=r"^(auto|amp|amp_bf16|bf16|fp16|fp32)$", description="auto: amp on GPU")
    grad_checkpointing: bool = False
    devices: int = Field(1, ge=1, le=64, description="GPUs; more than one runs torchrun --nproc-per-node")
    launcher: Literal["auto", "in-process", "torchrun"] = Field(
        "auto", description="auto: the trainer in this process for one device, under torchrun for more"
    )
    workers: int = Field(
        4, ge=0, le=64, description="data loader workers per device; lowered so each worker's tars fill a batch"
    )
    seed: int = Field(0, ge=0, le=MAX_SEED)
    pairs_per_tar: int = Field(1000, ge=1, le=1_000_000, description="external sets: pairs per exported tar")
    work_dir: str | None = Field(
        None, description="local folder for exported tars and trainer logs; unset: ~/.cache/pathgen/clip"
    )
    holdout_fraction: float = Field(
        0.05, ge=0.0, lt=1.0, description="cases (TCGA barcode) or slides held out whole, for retrieval evaluation"
    )
    stage1: PairSetSettings = Field(default_factory=PairSetSettings)
    stage2: PairSetSettings | None = Field(None, description="optional second stage, e.g. curated or external pairs")
    evaluate: list[dict[str, str]] = Field(
        default_factory=list,
        description="after each stage: [{dataset: DIR, classes: FILE} (one folder per class) or {dataset: DIR[, "
        "format: NAME]} (a dataset as downloaded)] to evaluate on",
    )

    @model_validator(mode="after")
    def _batch_divides(self) -> ClipSettings:
        clip_batch_per_device(self.batch_size, self.devices)  # one that does not divide fails here, before any work
        return self


def clip_batch_per_device(batch_size: int, devices: int) -> int:
    """The batch each device trains on: the global ``clip.batch_size`` shared evenly by ``clip.devices``."""
    if batch_size % devices:
        raise SettingsError(
            f"clip.batch_size {batch_size} is the global batch, shared evenly by clip.devices {devices}: set it to a "
            f"multiple of {devices} ({_multiples_near(batch_size, devices)}) or change clip.devices"
        )
    return batch_size // devices


class LlavaSettings(_Section):
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
                f"{self.devices} = {step}): set it to {_multiples_near(total, step)}, or change llava.batch_size or "
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


class EvalSettings(_Section):
    batch_size: int = Field(64, ge=1, le=4096)
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$")
    shots: list[int] = Field(default_factory=list, description="k-shot linear probes (besides the full one)")
    seeds: int = Field(3, ge=1, le=100, description="samplings per k-shot probe, and seeds of the paper probe")
    probe_c: float = Field(1.0, gt=0.0, le=1e6, description="inverse L2 strength of the logistic regression")
    probe: Literal["logistic", "paper"] = Field(
        "logistic",
        description="linear probe: logistic (scikit-learn, full train set + eval.shots) or paper (PathGen-CLIP's "
        "nn.Linear with AdamW on eval.probe_shots per class, eval.seeds seeds)",
    )
    probe_shots: int = Field(256, ge=1, le=1_000_000, description="paper probe: training samples per class, at most")
    probe_lr: float = Field(1e-2, gt=0.0, le=10.0, description="paper probe: AdamW learning rate")
    probe_epochs: int = Field(20, ge=1, le=10_000, description="paper probe: epochs over the sampled training set")
    probe_batch_size: int = Field(32, ge=1, le=65_536, description="paper probe: samples per AdamW step")
    retrieval_pairs: int = Field(5000, ge=2, le=100_000, description="held-out pairs scored for retrieval, at most")
    suite: Literal["paper", "all"] | None = Field(
        None,
        description="the factory's evaluate stage runs this benchmark suite (pathgen benchmark) on the datasets under "
        "eval.root; unset: it evaluates clip.evaluate",
    )
    root: str | None = Field(
        None, description="benchmark root: a folder holding the downloaded datasets, one folder each, any names"
    )
    baselines: list[str] = Field(
        default_factory=list,
        max_length=16,
        description="models benchmarked before the newest PathGen-CLIP (as pathgen evaluate --model takes them, e.g. "
        "ViT-B-16:openai), so each difference column is trained minus baseline",
    )


class InstructSettings(RoleSettings):
    """The instruct role (PathGen-Instruct): conversations about a patch from its revised description. Its own
    backend, model, prompt and sampling (``instruct.model`` etc.); server, device and batch settings are shared with
    the caption roles (``agents.openai_base_url``, ``agents.batch_size``, ...)."""

    prompt: str = Field(
        "instruct.v1",
        description="versioned prompt: instruct.v1 (text: the description) or instruct-image.v1 (image too, a VLM)",
    )
    max_new_tokens: int = Field(768, ge=1, le=8192)
    max_words: int = Field(900, ge=1, le=100_000, description="a longer reply is rejected as over-long")
    conversations_per_description: int = Field(
        3, ge=1, le=20, description="conversations asked for per description; later ones in a reply are ignored"
    )
    max_turns: int = Field(3, ge=1, le=10, description="question-answer turns a conversation may have")
    min_support: float = Field(
        0.6,
        ge=0.0,
        le=1.0,
        description="share of an answer's (or correct option's) content words the description must contain",
    )
    min_question_support: float = Field(
        0.5, ge=0.0, le=1.0, description="yes/no questions: share of their content words the description must contain"
    )
    slides_per_task: int = Field(4, ge=1, le=10_000, description="slides per instruct task (one model batch)")
    concurrency: int = Field(1, ge=1, le=256, description="instruct tasks at once; above 1 only for openai")
    agents_hash: str | None = Field(
        None, description="read pairs/<agents_hash>/; unset: the only agents_hash in the store (an error if several)"
    )


class FeaturesSettings(_Section):
    encoder: ModelName = Field(
        None,
        description="open_clip NAME:PRETRAINED, a PathGen-CLIP run or checkpoint in the store; unset: the newest "
        "PathGen-CLIP in the store, else tiny-random (RANDOM WEIGHTS)",
    )
    target_mpp: float = Field(
        0.5, ge=MIN_TARGET_MPP, le=64.0, description="microns per pixel of the encoded patches (0.5: the paper's 20x)"
    )
    batch_size: int = Field(128, ge=1, le=8192, description="patches per encoder forward pass")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$")
    prefetch_batches: int = Field(
        2, ge=1, le=64, description="batches read and preprocessed ahead while the encoder runs"
    )
    concurrency: int = Field(1, ge=1, le=256, description="slide groups featured at once (one encoder per process)")
    group_size: int = Field(4, ge=1, le=10_000, description="slides per Prefect task")


class MilSettings(_Section):
    task: str | None = Field(None, description="task CSV (slide_id,label[,case_id][,split]) of the factory's train-mil")
    model: Literal["abmil", "acmil", "mean"] = Field("abmil", description="attention MIL model of train-mil")
    features: str | None = Field(
        None, description="features_hash in the store or a CLAM/TRIDENT h5 folder; unset: these settings' features"
    )
    epochs: int = Field(50, ge=1, le=10_000)
    learning_rates: list[float] = Field(
        default_factory=lambda: [1e-4, 2e-4, 5e-4], description="grid, chosen on the validation split"
    )
    weight_decay: float = Field(1e-4, ge=0.0, le=10.0, description="Adam weight decay")
    seeds: int = Field(3, ge=1, le=100, description="repeats with seeds 0..N-1; mean and std reported")
    selection_metric: Literal["auc", "balanced_accuracy"] = Field("auc", description="validation metric for the lr")
    acmil_branches: int = Field(5, ge=1, le=64, description="ACMIL M: attention branches")
    acmil_top_k: int = Field(10, ge=1, le=100_000, description="ACMIL K: top-attended instances that may be masked")
    acmil_mask_prob: float = Field(0.6, ge=0.0, le=1.0, description="ACMIL p: masking probability of the top K")
    heatmaps: bool = Field(True, description="draw eval/mil/<run>/heatmaps/<slide_id>.png for each test slide")
    heatmap_top_k: int = Field(6, ge=1, le=64, description="top-attended patches shown beside the heatmap")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$")
    work_dir: str | None = Field(
        None, description="local folder of MIL runs in training (mirrored to models/mil/); unset: ~/.cache/pathgen/mil"
    )


class ModelsSettings(_Section):
    allow_random_weights: bool = Field(
        True,
        description="let a run use random-weight models (tiny defaults, unloaded weights); false in production: "
        "such a run fails before any work, naming the setting of the missing model",
    )


class ExportSettings(_Section):
    """What every export of pairs (PathGen JSON, WebDataset, LLaVA) does with the reviews under reviews/."""

    reviews: Literal["apply", "ignore"] = Field(
        "apply",
        description="apply: leave out rejected pairs and use corrected captions (the latest review of a pair counts); "
        "ignore: export the pairs as generated. Either way the export's provenance counts the reviews",
    )


class ServeSettings(_Section):
    """``pathgen serve``: the review browser (pathgen/serve/)."""

    reviewer_header: str = Field(
        "X-Forwarded-User",
        pattern=r"^[A-Za-z0-9-]{1,64}$",
        description="request header naming the reviewer, set by the authenticating proxy in front of the app (which "
        "must overwrite any value a client sends); read only with serve.trust_reviewer_header",
    )
    trust_reviewer_header: bool = Field(
        False,
        description="take the reviewer from serve.reviewer_header, over --reviewer (pathgen serve --behind-proxy): "
        "only behind an authenticating proxy that overwrites the header; off, the header is ignored",
    )
    allowed_hosts: list[Annotated[str, Field(pattern=r"^(\*|(\*\.)?[A-Za-z0-9.-]{1,253})$")]] = Field(
        default_factory=list,
        max_length=64,
        description="Host header names the app answers besides 127.0.0.1, localhost and the --host it binds to (the "
        "names a proxy or the reviewers use, e.g. review.example.org); other hosts get 400",
    )
    openseadragon_dir: str | None = Field(
        None,
        description="folder holding openseadragon.min.js and images/; unset: .vendor/node_modules/openseadragon/"
        "build/openseadragon in the checkout, where `make setup` installs it from npm",
    )
    page_size: int = Field(48, ge=1, le=500, description="pairs per page of the pairs grid")
    open_slides: int = Field(4, ge=1, le=64, description="slides kept open for DeepZoom tiles (LRU)")


class Settings(_Section):
    store: str = Field("file://./store", description="fsspec URL of the store root")
    sources: list[str] = Field(default_factory=list)
    patch: PatchSettings = Field(default_factory=PatchSettings)
    tissue: TissueSettings = Field(default_factory=TissueSettings)
    quality: QualitySettings = Field(default_factory=QualitySettings)
    selection: SelectionSettings = Field(default_factory=SelectionSettings)
    embedding: EmbeddingSettings = Field(default_factory=EmbeddingSettings)
    agents: AgentsSettings = Field(default_factory=AgentsSettings)
    slides: SlideSettings = Field(default_factory=SlideSettings)
    extract: ExtractSettings = Field(default_factory=ExtractSettings)
    s3: S3Settings = Field(default_factory=S3Settings)
    retries: RetrySettings = Field(default_factory=RetrySettings)
    cleanup: CleanupSettings = Field(default_factory=CleanupSettings)
    parts: PartsSettings = Field(default_factory=PartsSettings)
    clip: ClipSettings = Field(default_factory=ClipSettings)
    llava: LlavaSettings = Field(default_factory=LlavaSettings)
    eval: EvalSettings = Field(default_factory=EvalSettings)
    instruct: InstructSettings = Field(default_factory=InstructSettings)
    features: FeaturesSettings = Field(default_factory=FeaturesSettings)
    mil: MilSettings = Field(default_factory=MilSettings)
    models: ModelsSettings = Field(default_factory=ModelsSettings)
    serve: ServeSettings = Field(default_factory=ServeSettings)
    export: ExportSettings = Field(default_factory=ExportSettings)


def _unwrap_optional(annotation: Any) -> Any:
    """``X | None`` -> ``X``; any other annotation unchanged."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    is_union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    return args[0] if is_union and len(args) == 1 else annotation


def _field_types(model: type[BaseModel], prefix: str = "") -> dict[str, Any]:
    """Every leaf key (``patch.target_mpp``) -> its annotation, ``| None`` removed."""
    found: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        annotation = _unwrap_optional(info.annotation)
        # An optional section (``clip.stage2``) has its keys like any other.
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            found.update(_field_types(annotation, f"{prefix}{name}."))
        else:
            found[f"{prefix}{name}"] = annotation
    return found


_FIELD_TYPES = _field_types(Settings)
ALL_KEYS = list(_FIELD_TYPES)
# Map settings (``slides.mpp_overrides``): ``<key>.<entry>`` sets one entry.
MAP_KEYS = tuple(k for k, a in _FIELD_TYPES.items() if typing.get_origin(a) is dict)
# List settings of plain values (``slides.roots``, ``eval.shots``): a string value is split on commas.
SCALAR_LIST_KEYS = tuple(
    k
    for k, a in _FIELD_TYPES.items()
    if typing.get_origin(a) is list and all(t in (str, int, float, bool) for t in typing.get_args(a))
)


def _env_name(key: str) -> str:
    """``patch.target_mpp`` -> ``PATHGEN_PATCH__TARGET_MPP``."""
    return ENV_PREFIX + key.upper().replace(".", "__")


def _resolve_key(key: str) -> tuple[str, str | None] | None:
    """A dotted key -> (setting key, map entry or None); None when it names no setting.

    ``slides.mpp_overrides.CMU-1.svs`` -> ``("slides.mpp_overrides", "CMU-1.svs")``: everything after a map setting
    is the entry, dots included (file names are entries too). A section (``patch``) is a setting key too.
    """
    if key in _FIELD_TYPES or any(k.startswith(key + ".") for k in ALL_KEYS):
        return key, None
    for map_key in MAP_KEYS:
        entry = key[len(map_key) + 1 :]
        if key.startswith(map_key + ".") and entry:
            return map_key, entry
    return None


def _suggestions(key: str) -> list[str]:
    leaf = key.split(".")[-1]
    return [k for k in ALL_KEYS if k.split(".")[-1] == leaf] or difflib.get_close_matches(key, ALL_KEYS, 3)


def _unknown_key_error(key: str) -> SettingsError:
    key = str(key)[:200]  # a long key is not one: do not spend time matching all of it
    suggestions = _suggestions(key)
    hint = f"; did you mean {' or '.join(repr(s) for s in suggestions)}?" if suggestions else ""
    return SettingsError(f"unknown setting {short_repr(key)}{hint} (see `pathgen settings` for every key)")


def _unknown_env_error(name: str, key: str) -> SettingsError:
    """The error for a ``PATHGEN_*`` variable that names no setting: the likely variable meant, and the fix."""
    # Settings first, as for --set; then the non-setting variables spelled alike, compared without the shared prefix
    # (which would make every pair of names look alike).
    others = {n[len(ENV_PREFIX) :]: n for n in NON_SETTING_ENV_VARS}
    alike = difflib.get_close_matches(name[len(ENV_PREFIX) :], list(others), 2)
    suggestions = [_env_name(s) for s in _suggestions(key)] + [others[a] for a in alike]
    hint = f"; did you mean {' or '.join(dict.fromkeys(suggestions))}?" if suggestions else ""
    return SettingsError(
        f"unknown setting {key!r} from environment variable {name}{hint} (rename or unset it; settings are "
        f"{ENV_PREFIX}<SECTION>__<KEY>, see `pathgen settings` for every key)"
    )


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    resolved = _resolve_key(key)
    if resolved is None:
        raise _unknown_key_error(key)
    setting, entry = resolved
    parts = setting.split(".") + ([entry] if entry is not None else [])
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[parts[-1]] = value


def _as_list(value: Any) -> Any:
    """A value for a list setting: a string is split on commas (``""`` is the empty list), one value is a list of
    one; a list (or tuple) and None are left as they are."""
    if isinstance(value, str):
        return [item.strip() for item in value.split(",")] if value.strip() else []
    if value is None or isinstance(value, list | tuple):
        return value
    return [value]


def _parse_value(text: str, key: str | None = None) -> Any:
    """The text of ``--set key=TEXT`` or of an environment variable -> the value for ``key``.

    YAML scalars give the natural types: 0.25, 672, true, null, [a, b], {k: v}. For a list setting of plain values
    the text is comma-separated (``/a,/b``; items stay strings, which pydantic converts) unless it is a YAML list
    (``[/a, /b]``, the way to write an item that holds a comma).
    """
    if key in SCALAR_LIST_KEYS and not text.lstrip().startswith("["):
        return _as_list(text)
    try:
        return load_yaml(text, f"the value of {cut(str(key), 100)}") if text.strip() else ""
    except yaml.YAMLError:
        return text


def parse_assignments(assignments: Iterable[str]) -> dict[str, Any]:
    """``["patch.patch_px=512", "slides.roots=/a,/b"]`` -> ``{"patch.patch_px": 512, "slides.roots": ["/a", "/b"]}``."""
    parsed: dict[str, Any] = {}
    for item in assignments:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SettingsError(
                f"--set expects key=value, got {short_repr(item)} (for example --set patch.target_mpp=0.5)"
            )
        parsed[key.strip()] = _parse_value(value, key.strip())
    return parsed


def _env_assignments(environ: Mapping[str, str]) -> dict[str, Any]:
    """``PATHGEN_*`` variables -> ``{dotted key: value}``: ``PATHGEN_SLIDES__MPP_OVERRIDES__NOMPP=0.5`` ->
    ``{"slides.mpp_overrides.nompp": 0.5}``.

    Variable names are upper case, so the key is lower-cased, map entries included: the variable above sets the entry
    ``nompp``; an entry with capitals, dashes or dots is set with ``--set`` or the YAML file. A ``PATHGEN_*`` variable
    that names no setting and is not in ``NON_SETTING_ENV_VARS`` raises SettingsError with the likely name.
    """
    out = {}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or name in NON_SETTING_ENV_VARS:
            continue
        key = name[len(ENV_PREFIX) :].lower().replace("__", ".")
        if _resolve_key(key) is None:
            raise _unknown_env_error(name, key)
        out[key] = _parse_value(value, key)
    return out


def _format_validation_error(err: ValidationError) -> str:
    """One line per wrong field (at most MAX_ERRORS_SHOWN), each quoting its input cut to a few hundred characters:
    an input can be huge (a long string, a nested list) and the message must stay readable and cheap."""
    lines = []
    errors = err.errors(include_url=False)
    for item in errors[:MAX_ERRORS_SHOWN]:
        field = cut(".".join(str(p) for p in item["loc"]), 200)
        got = item.get("input")
        got_text = "" if isinstance(got, dict) else f" (got {short_repr(got)})"
        if item["type"] == "extra_forbidden":
            lines.append(str(_unknown_key_error(field)))
        else:
            lines.append(f"setting {field!r}: {cut(item['msg'], 200)}{got_text}")
    if len(errors) > MAX_ERRORS_SHOWN:
        lines.append(f"and {len(errors) - MAX_ERRORS_SHOWN} more")
    return "invalid settings: " + "; ".join(lines)


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict) and base[key]:
            _deep_merge(base[key], value)
        else:
            base[key] = value
    return base


VARIANTS_KEY = "variants"  # a settings file's named variants of itself (FILE#NAME); never a setting


def _split_variant(config_file: str | os.PathLike) -> tuple[Path, str | None]:
    """``deploy/paper.yaml#clip-l`` -> (the file, the variant); a file whose own name holds ``#`` is taken whole."""
    text = os.fspath(config_file)
    path, sep, variant = text.rpartition("#")
    if not sep or Path(text).is_file():
        return Path(text), None
    if not variant.strip():
        raise SettingsError(
            f"config {short_repr(text)} names no variant after '#': write FILE#VARIANT (for example "
            "deploy/paper.yaml#clip-l), or drop the '#'"
        )
    return Path(path), variant.strip()


def _with_variant(loaded: dict[str, Any], variant: str | None, what: str) -> dict[str, Any]:
    """A settings file's mapping without its ``variants``, and with the chosen one deep-merged over it."""
    variants = loaded.pop(VARIANTS_KEY, None)
    if variants is not None and not isinstance(variants, dict):
        raise SettingsError(
            f"{what}: {VARIANTS_KEY} must map each variant's name to settings, e.g. "
            f"{VARIANTS_KEY}: {{clip-l: {{clip: {{model: ViT-L-14-336}}}}}}"
        )
    if variant is None:
        return loaded
    if variant not in (variants or {}):
        known = ", ".join(sorted(str(name) for name in variants or {})) or "none"
        raise SettingsError(
            f"{what} has no variant {short_repr(variant)} (its variants: {known}); name one of them after '#', or "
            "drop the '#' for the file as it is"
        )
    chosen = variants[variant] or {}
    if not isinstance(chosen, dict) or VARIANTS_KEY in chosen:
        raise SettingsError(f"{what}: variant {variant!r} must be a mapping of settings, without variants of its own")
    return _deep_merge(loaded, chosen)


def load_settings(
    config_file: str | os.PathLike | None = None,
    overrides: Mapping[str, Any] | Iterable[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Build the settings from a YAML file (``FILE#VARIANT`` for one of its variants), the environment and
    ``key=value`` overrides; fail naming the field."""
    tree: dict[str, Any] = {}
    if config_file:
        path, variant = _split_variant(config_file)
        if not path.is_file():
            raise SettingsError(f"config file {str(path)!r} does not exist; pass an existing YAML file to --config")
        what = f"config file {str(path)!r}"
        if path.stat().st_size > MAX_YAML_BYTES:
            raise SettingsError(
                f"{what} is {path.stat().st_size} bytes, more than the {MAX_YAML_BYTES} allowed for a settings "
                "file; check that --config names the settings YAML"
            )
        try:
            loaded = load_yaml(path.read_text(), what) or {}
        except yaml.YAMLError as exc:
            raise SettingsError(f"{what} is not valid YAML: {cut(str(exc))}") from None
        if not isinstance(loaded, dict):
            raise SettingsError(f"config file {str(path)!r} must hold a mapping of settings at the top level")
        tree = _with_variant(loaded, variant, what)
    # Start from the defaults so that setting one field of a section (agents.summarize.model) keeps the others.
    tree = _deep_merge(Settings().model_dump(), tree)
    layered = dict(_env_assignments(os.environ if environ is None else environ))
    if overrides:
        layered.update(overrides if isinstance(overrides, Mapping) else parse_assignments(overrides))
    for key, value in layered.items():
        # A programmatic or flow-parameter override may give a list setting as "a,b" or one value.
        _set_dotted(tree, key, _as_list(value) if key in SCALAR_LIST_KEYS else value)
    try:
        return Settings.model_validate(tree)
    except ValidationError as err:
        raise SettingsError(_format_validation_error(err)) from None


def run_settings(
    store: str | None = None, config: str | None = None, overrides: Mapping[str, Any] | None = None
) -> Settings:
    """The settings of a flow run: its parameters (store, config file, overrides) over the environment."""
    merged = dict(overrides or {})
    if store:
        merged["store"] = store
    return load_settings(config, merged)
