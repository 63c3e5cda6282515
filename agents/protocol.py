"""The one interface every model backend implements: a batch of chat requests in, one reply or error each out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class ChatRequest:
    """System text, then user parts in order: text before the image (shared instructions, so a prefix cache can
    reuse them), the image (JPEG bytes) if any, and text after it (the item's own text)."""

    system: str
    before_image: str
    image: bytes | None = None
    after_image: str = ""
    # This request's own sampling seed (agents.identity.item_seed: from the item, never its place in a batch);
    # None: the Sampling's seed.
    seed: int | None = None

    def seed_or(self, sampling: Sampling) -> int:
        return sampling.seed if self.seed is None else self.seed


@dataclass(frozen=True)
class ChatReply:
    text: str | None
    error: str | None = None
    finish_reason: str | None = None  # "stop" or "length"

    @property
    def ok(self) -> bool:
        return self.error is None and self.text is not None


@dataclass(frozen=True)
class Sampling:
    temperature: float
    top_p: float
    max_new_tokens: int
    seed: int


class ChatBackend(Protocol):
    name: str  # transformers | openai | vllm
    model_id: str
    random_weights: bool

    def generate(self, requests: list[ChatRequest], sampling: Sampling) -> list[ChatReply]:
        """One reply per request, in order; a failed request gets ChatReply(text=None, error=...)."""
        ...
