"""Model backends behind one protocol (agents.protocol.ChatBackend), and the one factory that builds them.

A backend's ``random_weights`` says whether its model's weights were loaded, whatever the model is called: the tiny
models (built seeded-random; their config.json says so), a folder with a config but no weight files, and a model
most of whose parameters were missing from its weight files are all random weights.

Backends are cached per process, keyed by the model's identity as loaded and every setting that shapes its replies
(agents.identity.role_inputs): roles that name the same model with the same settings share one loaded model, and a
backend built for other settings is never handed out. release_backends() ends them when their stage ends.
"""

from __future__ import annotations

import json
import logging
import threading

from agents.backends.weights import folder_random_weights
from agents.protocol import ChatBackend
from pathgen.devices import empty_cuda_cache
from pathgen.settings import AgentsSettings, RetrySettings, RoleSettings

# folder_random_weights is re-exported for the model checks; what the backends share lives in
# agents.backends.messages and agents.backends.weights, which they import without importing this factory back.
__all__ = ["backend_for", "folder_random_weights", "release_backends"]
log = logging.getLogger("pathgen.agents")
_backends: dict[str, ChatBackend] = {}
_lock = threading.Lock()


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
