"""CLIP's token budget: captions are counted with open_clip's own BPE tokenizer, start and end tokens included,
and must fit its 77-token context (69% of the released PathGen-1.6M captions do not)."""

from __future__ import annotations

import re
from functools import lru_cache

SENTENCE = re.compile(r"(?<=[.!?])\s+")


@lru_cache(maxsize=1)
def _tokenizer():
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


def clip_token_count(text: str) -> int:
    return len(_tokenizer().encode(text)) + 2  # <start_of_text> and <end_of_text>


def trim_to_tokens(text: str, limit: int) -> str:
    """The longest run of whole sentences that fits; when even the first does not, its longest prefix of whole
    words, closed with a full stop."""
    kept = ""
    for sentence in SENTENCE.split(text.strip()):
        candidate = f"{kept} {sentence}".strip()
        if clip_token_count(candidate) > limit:
            break
        kept = candidate
    if kept:
        return kept
    words = text.split()
    low, high = 0, len(words)
    while low < high:  # binary search on the number of words
        mid = (low + high + 1) // 2
        if clip_token_count(" ".join(words[:mid]).rstrip(",;:") + ".") <= limit:
            low = mid
        else:
            high = mid - 1
    return (" ".join(words[:low]).rstrip(",;:.") + ".") if low else ""
