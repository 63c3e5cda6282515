"""What a role's replies depend on: the model's identity as loaded, and every setting that can change a reply.

Identity: a local folder's content digest, a hub id with its resolved revision (from the local Hugging Face cache,
as loading would use it), the id and root an OpenAI-compatible server reports for the model, or the version of the
tiny random-weight models. ``agents_hash`` covers these for every role, and the backend cache is keyed by the same,
so a backend built for other settings is never handed out.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import httpx

from agents.openai_http import attempts_note, auth_headers, failure_name, worth_retrying
from agents.prompts import load_prompt
from pathgen.digest import folder_digest
from pathgen.errors import BackendError, RetryableStatus, retrying, without_userinfo
from pathgen.settings import AgentsSettings, RetrySettings, RoleSettings

ROLES = ("describe", "revise", "summarize")
# How a request's sampling seed is chosen (part of every role's inputs: another scheme draws other replies).
# item-v1: agents.identity.item_seed, one seed per item; before it, one seed per batch, or the batch position.
SEEDING = "item-v1"


def _hub_revision(model: str, revision: str | None) -> str:
    """The commit a hub id resolves to in the local cache (what transformers and vLLM would load offline):
    huggingface_hub's own look-up of the revision's snapshot."""
    if len(revision or "") == 40:
        return revision
    from huggingface_hub import snapshot_download  # only here: its import costs a CLI start ~0.4 s

    try:
        snapshot = snapshot_download(model, revision=revision, local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached (or not completely), whatever the library calls it
        return f"{revision or 'main'} (not in the local cache)"
    return Path(snapshot).name


def served_model(base_url: str, model: str, timeout: float, retries: RetrySettings) -> dict[str, Any]:
    """The entry an OpenAI-compatible server lists for ``model`` under /models; BackendError naming the endpoint
    when the server cannot be reached (after the retries of the one policy) or does not serve that model."""
    url = f"{base_url.rstrip('/')}/models"
    endpoint = without_userinfo(base_url)  # messages never show credentials written into the URL

    def listing() -> httpx.Response:
        response = httpx.get(url, headers=auth_headers(), timeout=timeout)
        if response.status_code >= 500 or response.status_code == 429:
            raise RetryableStatus.of(response.status_code, response.headers)
        return response

    policy = retrying(retries=retries.io_retries, backoff_seconds=retries.backoff_seconds, retry_on=worth_retrying)
    try:
        response = policy(listing)
    except (httpx.TransportError, RetryableStatus) as exc:
        raise BackendError(
            f"the model server at {endpoint} cannot be reached ({failure_name(exc)}"
            f"{attempts_note(exc, retries.io_retries + 1)}); start it or fix agents.openai_base_url, then run again: "
            "the slides stay pending"
        ) from exc
    if response.status_code != 200:
        raise BackendError(f"the model server at {endpoint} answered HTTP {response.status_code} to GET /models")
    served = {entry.get("id"): entry for entry in response.json().get("data", [])}
    if model not in served:
        raise BackendError(
            f"the model server at {endpoint} does not serve {model!r} (it serves {sorted(served)}); "
            "set agents.<role>.model to one of these or start the server with that model"
        )
    return served[model]


def model_identity(role: RoleSettings, agents: AgentsSettings, retries: RetrySettings, needs_image: bool) -> str:
    if role.model is None:
        from agents.tiny import TINY_LM, TINY_VERSION, TINY_VLM

        return f"{TINY_VLM if needs_image else TINY_LM}@tiny-v{TINY_VERSION} (random weights)"
    if role.backend == "openai":
        if not agents.openai_base_url:
            raise ValueError("the openai backend needs agents.openai_base_url (e.g. http://gpu-node:8000/v1)")
        entry = served_model(agents.openai_base_url, role.model, agents.openai_timeout_seconds, retries)
        return f"served:{entry.get('id')} root={entry.get('root') or '?'}"
    if Path(role.model).is_dir():
        return f"folder:{Path(role.model).name}@sha256:{folder_digest(role.model)[:16]}"
    return f"hub:{role.model}@{_hub_revision(role.model, role.revision)}"


def sampling_of(role: RoleSettings) -> dict[str, Any]:
    return {
        "temperature": role.temperature,
        "top_p": role.top_p,
        "max_new_tokens": role.max_new_tokens,
        "seed": role.seed,
    }


def item_seed(run_hash: str, role: str, key: str, attempt: int = 0) -> int:
    """The sampling seed of one item's request: a stable hash of the run's hash (agents_hash, instruct_hash), the
    role, the item's id (the patch id) and the attempt, never of its place in a batch, so that a patch gets the same
    reply however its slides are grouped into tasks and batches. 31 bits: servers that take a 32-bit seed accept it.
    """
    digest = hashlib.sha256("\0".join([run_hash, role, key, str(attempt)]).encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def role_inputs(name: str, role: RoleSettings, agents: AgentsSettings, identity: str) -> dict[str, Any]:
    """Everything of one role that can change its replies."""
    prompt = load_prompt(role.prompt)
    inputs: dict[str, Any] = {
        "backend": role.backend,
        "model": identity,
        "prompt": prompt.version,
        "sampling": sampling_of(role),
        "max_words": role.max_words,
        "seeding": SEEDING,
    }
    if role.backend in ("openai", "vllm"):
        inputs["max_image_pixels"] = agents.max_image_pixels
    if role.backend == "vllm":
        inputs["max_model_len"] = agents.vllm_max_model_len
    # Not agents.batch_size: every request samples with its own generator (item_seed), so the batch it shares changes
    # none of its draws. Padding could still move a near-tie logit; measured with the tiny models on CPU, 0 of 160
    # replies differed between one batch, batches of 4 and one at a time (temperatures 0, 0.2 and 1).
    return inputs


def identities(agents: AgentsSettings, retries: RetrySettings) -> dict[str, str]:
    found = {}
    for name in ROLES:
        role = getattr(agents, name)
        found[name] = model_identity(role, agents, retries, load_prompt(role.prompt).has_image)
    return found


def hash_inputs(agents: AgentsSettings, identity: dict[str, str]) -> dict[str, Any]:
    return {
        "roles": {n: role_inputs(n, getattr(agents, n), agents, identity[n]) for n in ROLES},
        "shorten_prompt": load_prompt(agents.shorten_prompt).version,
        "max_caption_tokens": agents.max_caption_tokens,
        "shorten_attempts": agents.shorten_attempts,
    }


def agents_hash(agents: AgentsSettings, identity: dict[str, str]) -> str:
    blob = json.dumps(hash_inputs(agents, identity), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]
