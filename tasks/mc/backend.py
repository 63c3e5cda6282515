"""The model under evaluation, behind the same backends and settings as the caption agents.

The model is a ``--model`` (hub id, local folder such as a PathGen-LLaVA export, or a served model name) on the
transformers, openai or vllm backend; the backends' own settings (``agents.device``, ``agents.batch_size``,
``agents.openai_base_url``, ``agents.vllm_*``, ``agents.model_cache``) apply unchanged. Without ``--model`` the
transformers backend runs the tiny random-weight VLM, declared as random everywhere it is reported.
"""

from __future__ import annotations

from typing import Any

from agents.protocol import ChatBackend
from pathgen.settings import RoleSettings, Settings
from tasks.mc.answers import DEFAULT_PROMPT
from tasks.mc.evaluate import DEFAULT_MAX_NEW_TOKENS

BACKENDS = ("transformers", "openai", "vllm")


def mc_role(backend: str, model: str | None, max_new_tokens: int, prompt: str | None = None) -> RoleSettings:
    """A role for the backend factory: greedy, seeded; its prompt is the one the questions are asked with."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
    return RoleSettings(
        backend=backend,
        model=model,
        prompt=str(prompt or DEFAULT_PROMPT),
        temperature=0.0,
        top_p=1.0,
        max_new_tokens=max_new_tokens,
        max_words=100_000,  # replies are parsed, not length-checked
        seed=0,
    )


def refused_random(settings: Settings, model: str | None) -> str | None:
    """Why ``models.allow_random_weights=false`` refuses this model before it loads (None: allowed)."""
    from agents.backends import folder_random_weights

    if settings.models.allow_random_weights:
        return None
    if model is None:
        return "no --model was given, so the tiny random-weight VLM would be evaluated"
    reason = folder_random_weights(model)
    return f"--model {model}: {reason}" if reason else None


def load_backend(
    settings: Settings,
    backend: str = "transformers",
    model: str | None = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    prompt: str | None = None,
) -> tuple[ChatBackend, dict[str, Any]]:
    """The backend (cached per process, as the caption agents' are) and the model's description for the report."""
    from agents.backends import backend_for
    from agents.identity import model_identity
    from tasks.models import RandomWeightsRefused

    if backend in ("openai", "vllm") and not model:
        raise ValueError(f"the {backend} backend needs --model (the served model name, hub id or folder)")
    reason = refused_random(settings, model)
    if reason:
        raise RandomWeightsRefused(f"models.allow_random_weights is false: {reason}")
    role = mc_role(backend, model, max_new_tokens, prompt)
    identity = model_identity(role, settings.agents, settings.retries, needs_image=True)
    loaded = backend_for(role, settings.agents, settings.retries, True, identity)
    if getattr(loaded, "vision", True) is False:  # told here, not as the caption roles' error on the first batch
        raise ValueError(f"--model {model} is a text-only model; every question carries an image: name a VLM")
    description = model_description(loaded, identity)
    if loaded.random_weights and not settings.models.allow_random_weights:  # found only once its weights loaded
        raise RandomWeightsRefused(
            f"models.allow_random_weights is false: {loaded.model_id} has random weights "
            f"({description['random_reason']})"
        )
    return loaded, description


def model_description(backend: ChatBackend, identity: str) -> dict[str, Any]:
    reason = getattr(backend, "random_reason", None)
    if backend.random_weights and not reason:
        reason = "the backend reports random weights"
    return {
        "backend": backend.name,
        "model_id": backend.model_id,
        "identity": identity,
        "random_weights": bool(backend.random_weights),
        "random_reason": reason if backend.random_weights else None,
    }
