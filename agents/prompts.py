"""Role prompts as versioned text files: ``agents/prompts/<role>.v<N>.txt`` with a [system] and a [user] section.
In the user text, ``{image}`` marks where the image goes: what precedes it is shared by every item of a batch
(prefix-cache friendly), what follows is the item's own text. A prompt's version is its file name plus a hash of
its text, so an edited prompt can never pass for the old one."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from agents.protocol import ChatRequest

PROMPTS = Path(__file__).parent / "prompts"


@dataclass(frozen=True)
class Prompt:
    name: str  # e.g. describe.v1
    system: str
    before_image: str
    after_image: str
    has_image: bool
    sha: str

    @property
    def version(self) -> str:
        return f"{self.name}@{self.sha}"

    def request(self, image: bytes | None = None, **fields: object) -> ChatRequest:
        return ChatRequest(
            system=self.system,
            before_image=self.before_image.format(**fields),
            image=image if self.has_image else None,
            after_image=self.after_image.format(**fields),
        )


@lru_cache(maxsize=32)
def load_prompt(name: str) -> Prompt:
    path = Path(name) if name.endswith(".txt") else PROMPTS / f"{name}.txt"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PROMPTS.glob("*.txt")))
        raise ValueError(f"prompt {name!r} not found; use one of {known} or a path to a .txt prompt file")
    text = path.read_text()
    match = re.fullmatch(r"\s*\[system\]\n(.*?)\n\[user\]\n(.*?)\s*", text, flags=re.S)
    if not match:
        raise ValueError(f"prompt file {path} must hold a [system] section, then a [user] section")
    system, user = match.group(1).strip(), match.group(2).strip()
    before, marker, after = user.partition("{image}")
    return Prompt(
        name=path.stem,
        system=system,
        before_image=before.strip(),
        after_image=after.strip(),
        has_image=bool(marker),
        sha=hashlib.sha256(text.encode()).hexdigest()[:8],
    )
