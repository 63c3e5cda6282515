"""Checks every model reply before it can become part of a pair: empty, refusal, garbage, repetition, over-long."""

from __future__ import annotations

import re
from collections import Counter

from agents.protocol import ChatReply

REFUSAL = re.compile(
    r"^\W*(i'?m sorry|i am sorry|sorry,|i cannot|i can'?t|i am unable|i'?m unable|i won'?t|as an ai\b|"
    r"i do not have the ability|unable to (assist|help|provide|analy[sz]e))",
    re.IGNORECASE,
)
CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ufffd]")
SENTENCE_END = re.compile(r"[.!?](?=\s|$)")


def repetitive(words: list[str]) -> bool:
    """The same word six times running, or one short phrase (1-4 words) making up half of a long reply."""
    run = 1
    for previous, word in zip(words, words[1:], strict=False):
        run = run + 1 if word.lower() == previous.lower() else 1
        if run >= 6:
            return True
    if len(words) < 20:
        return False
    lowered = [w.lower() for w in words]
    for n in range(1, 5):
        grams = Counter(tuple(lowered[i : i + n]) for i in range(0, len(lowered) - n + 1))
        if grams.most_common(1)[0][1] * n >= 0.5 * len(words):
            return True
    return False


def problem(reply: ChatReply, max_words: int) -> str | None:
    """Why a reply is unusable (a short reason used as the failed table's key), or None."""
    if reply.error is not None:  # the server refused this request for its content (infrastructure errors raise)
        return "rejected"
    text = (reply.text or "").strip()
    if not text:
        return "empty"
    if REFUSAL.search(text):
        return "refusal"
    if CONTROL.search(text):
        return "garbage"
    words = text.split()
    if len(words) > max_words:
        return "over-long"
    if repetitive(words):
        return "repetition"
    return None


def tidy(reply: ChatReply) -> str:
    """The reply's text; one cut off by the token limit ends at its last complete sentence where it has one."""
    text = (reply.text or "").strip()
    if reply.finish_reason == "length":
        ends = [m.end() for m in SENTENCE_END.finditer(text)]
        if ends and ends[-1] >= len(text) // 2:
            return text[: ends[-1]]
    return text
