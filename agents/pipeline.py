"""The describe -> revise -> summarize loop over a whole batch of patches.

Each stage sends the whole batch to its backend at once (vLLM and batched ``generate`` are fast that way). A reply
that fails validation is asked for once more; if it fails again the item is recorded as failed, with its stage and
reason, and goes no further. Summaries over the CLIP budget are re-asked with their measured token count, then, as a
last resort, cut at a sentence boundary and flagged ``caption_trimmed``.
"""

from __future__ import annotations

import difflib
import logging
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

from agents.backends import backend_for
from agents.clip_tokens import clip_token_count, trim_to_tokens
from agents.identity import ROLES, agents_hash, identities, item_seed, sampling_of
from agents.prompts import Prompt, load_prompt
from agents.protocol import ChatBackend, ChatRequest, Sampling
from agents.validation import problem, tidy
from pathgen.settings import AgentsSettings, RetrySettings, RoleSettings

log = logging.getLogger("pathgen.agents")
UNCHANGED = re.compile(r"^\W*unchanged\W*$", re.IGNORECASE)


@dataclass
class Failure:
    key: str
    stage: str
    reason: str
    detail: str


@dataclass
class Caption:
    description: str
    revised_description: str
    revise_changed: bool
    revise_change: float  # 0 = identical, 1 = nothing in common (word-level)
    caption: str
    caption_tokens: int
    caption_trimmed: bool
    shorten_rounds: int


@dataclass
class BatchResult:
    captions: dict[str, Caption]
    failures: list[Failure]
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class _Role:
    settings: RoleSettings
    prompt: Prompt
    backend: ChatBackend

    @property
    def sampling(self) -> Sampling:
        s = self.settings
        return Sampling(s.temperature, s.top_p, s.max_new_tokens, s.seed)


def _word_change(a: str, b: str) -> float:
    return round(1.0 - difflib.SequenceMatcher(None, a.split(), b.split(), autojunk=False).ratio(), 4)


def _model_name(role: RoleSettings, prompt: Prompt, random_weights: bool) -> str:
    if role.model:
        return role.model + (" (random weights)" if random_weights else "")
    from agents.tiny import TINY_LM, TINY_VLM

    return (TINY_VLM if prompt.has_image else TINY_LM) + " (random weights)"


def provenance(
    settings: AgentsSettings, identity: dict[str, str], random_roles: dict[str, bool] | None = None
) -> dict[str, Any]:
    """What produces a pair: backend, model (name and identity as loaded), prompt version and sampling of every
    role, and the caption budget. ``random_roles`` says, per role, whether its backend loaded no trained weights
    (without it, only the roles that name no model, the tiny ones, count as random weights)."""
    roles = {}
    random_roles = dict(random_roles or {})
    for name in ROLES:
        role = getattr(settings, name)
        prompt = load_prompt(role.prompt)
        random_roles[name] = random_roles.get(name, False) or role.model is None
        roles[name] = {
            "backend": role.backend,
            "model": _model_name(role, prompt, random_roles[name]),
            "random_weights": random_roles[name],
            "identity": identity[name],
            "prompt": prompt.version,
            "sampling": sampling_of(role),
        }
    return {
        "roles": roles,
        "shorten_prompt": load_prompt(settings.shorten_prompt).version,
        "max_caption_tokens": settings.max_caption_tokens,
        "shorten_attempts": settings.shorten_attempts,
        "random_weights": any(random_roles.values()),
        "agents_hash": agents_hash(settings, identity),
    }


class CaptionAgents:
    """The three roles with their prompts, sampling and backends (roles naming the same model share it)."""

    def __init__(
        self,
        settings: AgentsSettings,
        retries: RetrySettings | None = None,
        logger: logging.Logger | None = None,
        backends: dict[str, ChatBackend] | None = None,
    ) -> None:
        """``backends`` maps a role to a ready backend, in place of the one its settings name."""
        self.settings = settings
        self.logger = logger or log
        retries = retries or RetrySettings()
        self.identity = identities(settings, retries)
        for name, backend in (backends or {}).items():
            self.identity[name] = f"given:{backend.name}:{backend.model_id}"
        self.roles: dict[str, _Role] = {}
        for name in ROLES:
            role = getattr(settings, name)
            prompt = load_prompt(role.prompt)
            backend = (backends or {}).get(name) or backend_for(
                role, settings, retries, prompt.has_image, self.identity[name]
            )
            self.roles[name] = _Role(role, prompt, backend)
        self.shorten = load_prompt(settings.shorten_prompt)
        random = {n: r.settings.model or r.backend.model_id for n, r in self.roles.items() if r.backend.random_weights}
        if random:
            self.logger.warning(
                "captioning with RANDOM-WEIGHT models (%s): descriptions and captions are noise; set "
                "agents.describe.model, agents.revise.model and agents.summarize.model to models with trained "
                "weights for real captions",
                ", ".join(f"{n}: {m}" for n, m in random.items()),
            )

    @property
    def random_weights(self) -> bool:
        return any(r.backend.random_weights for r in self.roles.values())

    def provenance(self) -> dict[str, Any]:
        return provenance(self.settings, self.identity, {n: r.backend.random_weights for n, r in self.roles.items()})

    def agents_hash(self) -> str:
        return agents_hash(self.settings, self.identity)

    # -- stages --------------------------------------------------------------------------------------------

    def _ask(
        self, stage: str, requests: dict[str, ChatRequest], failures: list[Failure], ask: str | None = None
    ) -> dict[str, str]:
        """Send a batch; re-ask the invalid ones once (new seed); record the twice-invalid as failures. Each request
        is seeded from its item and ``ask`` (the stage, or which re-ask), never from the rest of the batch."""
        role = self.roles[stage]
        keys = list(requests)
        texts: dict[str, str] = {}
        pending = keys
        run_hash = self.agents_hash()
        for attempt in range(2):
            # The re-ask's new seed is the item's own (attempt 1), never a shift of the batch's sampling seed.
            seeded = [replace(requests[k], seed=item_seed(run_hash, ask or stage, k, attempt)) for k in pending]
            replies = role.backend.generate(seeded, role.sampling)
            retry = []
            for key, reply in zip(pending, replies, strict=True):
                reason = problem(reply, role.settings.max_words)
                if reason is None:
                    texts[key] = tidy(reply)
                elif attempt == 0:
                    retry.append(key)
                else:
                    detail = reply.error or (reply.text or "")[:300]
                    failures.append(Failure(key, stage, reason, detail))
            pending = retry
            if not pending:
                break
        return texts

    def run(self, images: dict[str, bytes]) -> BatchResult:
        """Describe, revise and summarize a batch of patch images (JPEG bytes by patch id); ``seconds`` is each
        stage's wall time, and a caption over the budget is shortened, then trimmed."""
        failures: list[Failure] = []
        seconds: dict[str, float] = {}
        with _timed(seconds, "describe"):
            descriptions = self._describe(images, failures)
        with _timed(seconds, "revise"):
            revised = self._revise(images, descriptions, failures)
        with _timed(seconds, "summarize"):
            captions, rounds = self._shorten(self._summarize(revised, failures))
        results = self._captions(descriptions, revised, captions, rounds, failures)
        return BatchResult(results, failures, seconds)

    def _describe(self, images: dict[str, bytes], failures: list[Failure]) -> dict[str, str]:
        describe = self.roles["describe"].prompt
        return self._ask("describe", {k: describe.request(img) for k, img in images.items()}, failures)

    def _revise(
        self, images: dict[str, bytes], descriptions: dict[str, str], failures: list[Failure]
    ) -> dict[str, str]:
        """The revised descriptions; a reply of "unchanged" keeps the description as it was."""
        revise = self.roles["revise"].prompt
        revised = self._ask(
            "revise", {k: revise.request(images[k], description=d) for k, d in descriptions.items()}, failures
        )
        return {k: (descriptions[k] if UNCHANGED.match(text) else text) for k, text in revised.items()}

    def _summarize(self, revised: dict[str, str], failures: list[Failure]) -> dict[str, str]:
        limit = self.settings.max_caption_tokens
        summarize = self.roles["summarize"].prompt
        words = int(limit * 0.6)
        requests = {k: summarize.request(None, description=d, limit=limit, words=words) for k, d in revised.items()}
        return self._ask("summarize", requests, failures)

    def _shorten(self, captions: dict[str, str]) -> tuple[dict[str, str], dict[str, int]]:
        """Re-ask captions over the CLIP budget with their measured token count, up to ``shorten_attempts`` rounds;
        a shorter reply replaces its caption. The captions and each one's number of rounds."""
        limit = self.settings.max_caption_tokens
        captions = dict(captions)
        rounds = dict.fromkeys(captions, 0)
        for shorten_round in range(self.settings.shorten_attempts):
            over = {k: c for k, c in captions.items() if clip_token_count(c) > limit}
            if not over:
                break
            shorter = self._ask(
                "summarize",
                {
                    k: self.shorten.request(None, tokens=clip_token_count(c), limit=limit, caption=c)
                    for k, c in over.items()
                },
                [],  # a failed re-ask keeps the earlier caption, to be trimmed below
                f"shorten-{shorten_round}",
            )
            for key, text in shorter.items():
                rounds[key] += 1
                if clip_token_count(text) < clip_token_count(captions[key]):
                    captions[key] = text
        return captions, rounds

    def _captions(
        self,
        descriptions: dict[str, str],
        revised: dict[str, str],
        captions: dict[str, str],
        rounds: dict[str, int],
        failures: list[Failure],
    ) -> dict[str, Caption]:
        """Each item's Caption, its caption trimmed at a sentence boundary when still over the budget; an item
        with no prefix that fits is a failure (over-long)."""
        limit = self.settings.max_caption_tokens
        results: dict[str, Caption] = {}
        for key, caption in captions.items():
            trimmed = clip_token_count(caption) > limit
            if trimmed:
                caption = trim_to_tokens(caption, limit)
            if not caption:
                failures.append(Failure(key, "summarize", "over-long", "no sentence or word prefix fits the budget"))
                continue
            results[key] = Caption(
                description=descriptions[key],
                revised_description=revised[key],
                revise_changed=revised[key].strip() != descriptions[key].strip(),
                revise_change=_word_change(descriptions[key], revised[key]),
                caption=caption,
                caption_tokens=clip_token_count(caption),
                caption_trimmed=trimmed,
                shorten_rounds=rounds[key],
            )
        return results


@contextmanager
def _timed(seconds: dict[str, float], stage: str) -> Iterator[None]:
    """Records the block's wall time as ``seconds[stage]``."""
    tick = time.perf_counter()
    yield
    seconds[stage] = time.perf_counter() - tick
