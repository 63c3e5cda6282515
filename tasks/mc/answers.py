"""The multiple-choice prompt and the reply parser.

The prompt is LLaVA's multiple-choice form (question, lettered options, "Answer with the option's letter from the
given choices directly."), kept as a versioned prompt file so a report names exactly what the model was asked.
The parser takes a reply's letter only when the reply names one option unambiguously: a bare letter, a letter after
"answer"/"option"/"choice", a leading "B." or "(B)", the exact text of one option, or a lone "(B)" in a sentence. A
reply that names no option, or more than one, gets no letter and a reason: it is scored wrong, never guessed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from agents.prompts import Prompt, load_prompt
from agents.protocol import ChatRequest
from tasks.mc.dataset import Question, normalize

DEFAULT_PROMPT = Path(__file__).parent / "prompts" / "mc.v1.txt"

# Why a reply has no letter; fixed strings, so a report groups its unparsed replies by them.
EMPTY = "empty reply"
NO_OPTION = "names no option letter or option text"
SEVERAL = "names more than one option"
NOT_AN_OPTION = "names a letter that is not an option"
NO_REPLY = "no reply (the backend returned an error)"

_ANSWER_WORD = r"(?i:\b(?:answer|option|choice)\b)(?:\s+(?i:is|would\s+be))?\s*[:\-]?\s*"
_LETTER_AFTER_WORD = re.compile(_ANSWER_WORD + r"(?:\(([A-Za-z])\)|\[([A-Za-z])\]|([A-Z])(?![A-Za-z0-9]))")
_BARE = re.compile(r"[(\[]?([A-Za-z])[)\]]?[.:]?")
_LEADING = re.compile(r"(?:\(([A-Za-z])\)|\[([A-Za-z])\]|([A-Z])(?:[).\]:]|\s+-\s|$))")
_LEADING_THEN_TEXT = re.compile(r"([A-Z])\s+(\S.*)", re.S)
_BRACKETED = re.compile(r"\(([A-Za-z])\)")
_ANSWER_PREFIX = re.compile(r"^(?i:(?:the\s+)?(?:correct\s+|final\s+)?answer\s*(?:is)?\s*:?\s*)")


@dataclass(frozen=True)
class Parsed:
    letter: str | None  # one of the question's letters, or None
    reason: str | None  # why there is no letter; set exactly when letter is None


def load_mc_prompt(path: str | Path | None = None) -> Prompt:
    """The prompt file ([system] and [user] sections; {image}, {question} and {options} in the user text)."""
    prompt = load_prompt(str(path or DEFAULT_PROMPT))
    if not prompt.has_image:
        raise ValueError(f"prompt {path} has no {{image}} marker: the question's image would never be shown")
    return prompt


def options_text(question: Question) -> str:
    return "\n".join(f"{letter}. {text}" for letter, text in question.options)


def request_for(prompt: Prompt, question: Question, image: bytes) -> ChatRequest:
    return prompt.request(image, question=question.question, options=options_text(question))


def parse_reply(text: str | None, options: tuple[tuple[str, str], ...]) -> Parsed:
    """The option a reply names, by the first rule that finds any letter; see the module's docstring."""
    if text is None or not text.strip():
        return Parsed(None, EMPTY)
    clean = _clean(text)
    letters = [letter for letter, _ in options]
    for rule in (_bare_letter, _letters_after_word, _leading_letter, _option_text, _bracketed_letters):
        found = rule(clean, options)
        if found:
            return _decide(found, letters)
    return Parsed(None, NO_OPTION)


def _clean(text: str) -> str:
    # Markdown emphasis and code marks ("**B**", "`B`") carry no meaning here; spacing is collapsed.
    return " ".join(re.sub(r"[*`]", "", text).split())


def _decide(found: list[str], letters: list[str]) -> Parsed:
    distinct = sorted(set(found))
    if len(distinct) > 1:
        return Parsed(None, SEVERAL)
    if distinct[0] not in letters:
        return Parsed(None, NOT_AN_OPTION)
    return Parsed(distinct[0], None)


def _first_group(match: re.Match[str]) -> str:
    return next(g for g in match.groups() if g).upper()


def _bare_letter(clean: str, options: tuple[tuple[str, str], ...]) -> list[str]:
    # The whole reply is one letter ("B", "b", "(B)", "B."): lowercase is safe only here, where it is all there is.
    match = _BARE.fullmatch(clean)
    return [match.group(1).upper()] if match else []


def _letters_after_word(clean: str, options: tuple[tuple[str, str], ...]) -> list[str]:
    # "Answer: B", "The answer is (B)", "option C". A bare lowercase letter after the word is an article ("the answer
    # is a tumour"), so only uppercase or bracketed letters count. Any other "(X)" in the reply is counted too:
    # "the answer is (A) or (B)" names two options.
    found = [_first_group(m) for m in _LETTER_AFTER_WORD.finditer(clean)]
    return found + _bracketed_letters(clean, options) if found else []


def _leading_letter(clean: str, options: tuple[tuple[str, str], ...]) -> list[str]:
    # "B. Adenocarcinoma", "(B) ...", "B) ...", "B: ..." (with any other "(X)" in the reply: "(A) or (B)" is two).
    # A capital letter followed by a space is usually the article "A", so "B Adenocarcinoma" counts only when the
    # rest is exactly that option's text.
    match = _LEADING.match(clean)
    if match:
        return [_first_group(match), *_bracketed_letters(clean, options)]
    match = _LEADING_THEN_TEXT.fullmatch(clean)
    if match:
        texts = dict(options)
        letter = match.group(1)
        if letter in texts and normalize(texts[letter]) == normalize(match.group(2)):
            return [letter]
    return []


def _option_text(clean: str, options: tuple[tuple[str, str], ...]) -> list[str]:
    # The exact text of an option, optionally after "The answer is": equality only, never containment, since
    # "not adenocarcinoma" contains "adenocarcinoma".
    reply = normalize(_ANSWER_PREFIX.sub("", clean, count=1))
    return [letter for letter, text in options if normalize(text) == reply]


def _bracketed_letters(clean: str, options: tuple[tuple[str, str], ...]) -> list[str]:
    # "I think (C) fits best": every "(X)" in the reply; two different ones are ambiguous, not a choice.
    return [m.group(1).upper() for m in _BRACKETED.finditer(clean)]
