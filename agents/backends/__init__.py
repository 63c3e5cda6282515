"""Model backends behind one protocol (agents.protocol.ChatBackend), and the one factory that builds them.

A backend's ``random_weights`` says whether its model's weights were loaded, whatever the model is called: the tiny
models (built seeded-random; their config.json says so), a folder with a config but no weight files, and a model
most of whose parameters were missing from its weight files are all random weights.

Backends are cached per process, keyed by the model's identity as loaded and every setting that shapes its replies
(agents.identity.role_inputs): roles that name the same model with the same settings share one loaded model, and a
backend built for other settings is never handed out. release_backends() ends them when their stage ends.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import threading
from pathlib import Path

from agents.protocol import ChatBackend, ChatRequest
from pathgen.devices import empty_cuda_cache
from pathgen.settings import AgentsSettings, RetrySettings, RoleSettings

log = logging.getLogger("pathgen.agents")
_backends: dict[str, ChatBackend] = {}
_lock = threading.Lock()

# What transformers and vLLM load weights from; a folder with none of these has nothing but a config to build from.
WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack", "*.gguf")
NOT_WEIGHTS = {"training_args.bin"}


def has_weight_files(folder: str | Path) -> bool:
    """Whether a model folder holds any weight file (top level, where from_pretrained looks)."""
    folder = Path(folder).expanduser()
    return any(f.name not in NOT_WEIGHTS for pattern in WEIGHT_FILES for f in folder.glob(pattern))


def folder_random_weights(model_id: str) -> str | None:
    """Why a local model folder is random weights (None: it is not, or it is not a local folder)."""
    from agents.tiny import RANDOM_MARKER

    folder = Path(model_id).expanduser()
    if not folder.is_dir():
        return None
    config = folder / "config.json"
    if config.is_file():
        try:
            if json.loads(config.read_text()).get(RANDOM_MARKER):
                return f"its config.json says it was built with random weights ({RANDOM_MARKER})"
        except (ValueError, OSError):
            pass
    if not has_weight_files(folder):
        return "its folder has no weight files (" + ", ".join(WEIGHT_FILES) + "): nothing but a config to build from"
    return None


def shrink_jpeg(image: bytes, max_pixels: int) -> bytes:
    """Cap an image's pixel count (vision encoders' memory grows with it); small images pass through untouched."""
    from PIL import Image

    with Image.open(io.BytesIO(image)) as picture:
        width, height = picture.size
        if width * height <= max_pixels:
            return image
        scale = (max_pixels / (width * height)) ** 0.5
        smaller = picture.convert("RGB").resize((max(1, int(width * scale)), max(1, int(height * scale))))
        out = io.BytesIO()
        smaller.save(out, format="JPEG", quality=90)
        return out.getvalue()


def openai_messages(request: ChatRequest, max_pixels: int) -> list[dict]:
    """OpenAI chat format, as served by vLLM, SGLang and hosted APIs; the image is a base64 data URL."""
    parts: list[dict] = []
    if request.before_image:
        parts.append({"type": "text", "text": request.before_image})
    if request.image is not None:
        data = base64.b64encode(shrink_jpeg(request.image, max_pixels)).decode()
        parts.append({"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{data}"}})
    if request.after_image:
        parts.append({"type": "text", "text": request.after_image})
    messages = [{"role": "system", "content": request.system}] if request.system else []
    messages.append({"role": "user", "content": parts})
    return messages


def backend_for(
    role: RoleSettings, agents: AgentsSettings, retries: RetrySettings, needs_image: bool, identity: str
) -> ChatBackend:
    """The backend a role's settings name, loaded once per process per identity and reply-shaping settings."""
    from agents.identity import role_inputs

    inputs = role_inputs("", role, agents, identity)
    inputs.pop("prompt")
    inputs.pop("sampling")
    inputs.pop("max_words")
    inputs.pop("seeding")
    inputs["needs_image"] = needs_image
    inputs["device"] = agents.device
    if role.backend == "transformers":
        inputs["batch_size"] = agents.batch_size
    if role.backend == "openai":
        inputs["connection"] = [agents.openai_base_url, agents.openai_concurrency, agents.openai_timeout_seconds]
        inputs["retries"] = [retries.io_retries, retries.backoff_seconds]
    if role.backend == "vllm":
        inputs["engine"] = [agents.vllm_gpu_memory_utilization, agents.vllm_tensor_parallel_size]
    key = json.dumps(inputs, sort_keys=True)
    with _lock:
        if key not in _backends:
            _backends[key] = _build(role, agents, retries, needs_image)
        return _backends[key]


def release_backends() -> int:
    """Close and forget every cached backend (a vLLM engine shuts down, a transformers model is dropped) and give
    their GPU memory back: a stage's models must not hold the GPU that the next stage (train-clip) needs. Returns
    how many were released; a later backend_for builds anew."""
    import gc

    with _lock:
        released = list(_backends.values())
        _backends.clear()
    for backend in released:
        close = getattr(backend, "close", None)
        try:
            if callable(close):
                close()
        except Exception as exc:  # a teardown fault must not turn the stage's result into a failure
            log.warning("releasing the %s backend of %s failed: %s", backend.name, backend.model_id, exc)
    count = len(released)
    del released
    gc.collect()
    empty_cuda_cache()
    return count


def _build(role: RoleSettings, agents: AgentsSettings, retries: RetrySettings, needs_image: bool) -> ChatBackend:
    if role.backend == "transformers":
        from agents.backends.hf import TransformersBackend

        if role.model is None:
            from pathlib import Path

            from agents.tiny import TINY_LM, TINY_VLM, build_tiny_models

            cache = Path(agents.model_cache).expanduser() if agents.model_cache else None
            paths = build_tiny_models(cache)
            path = paths[TINY_VLM if needs_image else TINY_LM]
            return TransformersBackend(str(path), agents.device, agents.batch_size, random_weights=True)
        return TransformersBackend(role.model, agents.device, agents.batch_size, revision=role.revision)
    if role.model is None:
        raise ValueError(f"the {role.backend} backend needs a model name: set agents.<role>.model")
    if role.backend == "openai":
        from agents.backends.openai_compat import OpenAIBackend

        if not agents.openai_base_url:
            raise ValueError("the openai backend needs agents.openai_base_url (e.g. http://gpu-node:8000/v1)")
        return OpenAIBackend(
            agents.openai_base_url,
            role.model,
            agents.openai_concurrency,
            agents.openai_timeout_seconds,
            retries.io_retries,
            agents.max_image_pixels,
            retries.backoff_seconds,
        )
    from agents.backends.vllm_engine import VLLMBackend

    return VLLMBackend(role.model, agents, role.revision)
