"""Settings of the instruct stage (PathGen-Instruct conversations)."""

from __future__ import annotations

from pydantic import Field

from pathgen.settings.agents import RoleSettings


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
