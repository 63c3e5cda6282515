"""PathMMU-style multiple-choice datasets: a JSON Lines file, one question per line, with its images beside it.

A line is an object with ``id`` (string or integer), ``image`` (a path relative to the file's folder, inside it: an
absolute path or ``..`` is refused), ``question``, ``options`` (a list of strings, lettered A, B, ... in order, or
an object letter -> text), ``answer`` (a letter or the exact text of one option) and an optional ``subset``
(PubMed, SocialPath, EduContent, Atlas, PathCLS, ...).
Other keys are ignored. Blank lines are skipped. The whole file is checked before any model runs, and every
problem is reported at once as ``FILE line N: ...``, so a dataset is fixed in one pass rather than one run per error.
"""

from __future__ import annotations

import io
import json
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.paths import escapes_folder

LETTERS = string.ascii_uppercase
MAX_ERRORS_SHOWN = 20  # a file broken on every line is told by its first problems, not ten thousand lines
JPEG_MAGIC = b"\xff\xd8\xff"


class DatasetError(ValueError):
    """The dataset file is wrong; raised before any model is loaded."""


@dataclass(frozen=True)
class Question:
    id: str
    image: Path
    question: str
    options: tuple[tuple[str, str], ...]  # (letter, text) in the order shown to the model
    answer: str  # the letter of the right option
    subset: str | None
    line: int

    @property
    def letters(self) -> tuple[str, ...]:
        return tuple(letter for letter, _ in self.options)


def normalize(text: str) -> str:
    """Case, spacing and surrounding punctuation do not make two option texts different."""
    return " ".join(text.casefold().split()).strip(" .,;:!?\"'`")


def load_questions(path: str | Path, limit: int | None = None) -> list[Question]:
    """Every question of the file, validated (all of it, even with ``limit``); the first ``limit`` are returned."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DatasetError(f"dataset file {path} does not exist (--dataset: a .jsonl file, one question per line)")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}): not a JSONL file") from None
    questions, errors = [], []
    first_line: dict[str, int] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            question = parse_line(line, number, path.parent)
            if question.id in first_line:
                raise DatasetError(f"duplicate id {question.id!r} (first on line {first_line[question.id]})")
        except DatasetError as exc:
            errors.append(f"{path} line {number}: {exc}")
            continue
        first_line[question.id] = number
        questions.append(question)
    if errors:
        raise DatasetError(_error_summary(path, errors))
    if not questions:
        raise DatasetError(f"{path} holds no questions (one JSON object per line)")
    return questions[:limit] if limit else questions


def _error_summary(path: Path, errors: list[str]) -> str:
    shown = errors[:MAX_ERRORS_SHOWN]
    more = f"\n... and {len(errors) - len(shown)} more" if len(errors) > len(shown) else ""
    return f"{len(errors)} problem(s) in {path}:\n" + "\n".join(shown) + more


def parse_line(line: str, number: int, root: Path) -> Question:
    """One line of the file -> a Question; DatasetError saying what is wrong (the caller adds file and line)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(record, dict):
        raise DatasetError(f"expected a JSON object, got {type(record).__name__}")
    options = parse_options(record.get("options"))
    return Question(
        id=_question_id(record.get("id")),
        image=_image(record.get("image"), root),
        question=_text(record.get("question"), "question"),
        options=options,
        answer=parse_answer(record.get("answer"), options),
        subset=_subset(record.get("subset")),
        line=number,
    )


def _question_id(value: Any) -> str:
    # bool is an int in Python, but `true` is no id
    if isinstance(value, bool) or not isinstance(value, str | int) or not str(value).strip():
        raise DatasetError(f"id must be a non-empty string or an integer, got {json.dumps(value)}")
    return str(value).strip()


def _text(value: Any, field: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise DatasetError(f"{field} must be a non-empty string, got {json.dumps(value)[:80]}")
    return value.strip()


def _subset(value: Any) -> str | None:
    if value is None:
        return None
    return _text(value, "subset")


def _image(value: Any, root: Path) -> Path:
    """The image path, checked to exist and to open as an image (its header only: cheap for large datasets)."""
    from PIL import Image, UnidentifiedImageError

    name = _text(value, "image")
    if reason := escapes_folder(root, name):
        raise DatasetError(
            f"image {name!r} lies outside the dataset's folder ({reason}); name it relative to {root}, "
            "e.g. images/x.jpg"
        )
    path = root / name
    if not path.is_file():
        raise DatasetError(f"image {name!r} not found (looked for {path}; paths are relative to the file's folder)")
    try:
        with Image.open(path):
            pass
    except (UnidentifiedImageError, OSError) as exc:
        raise DatasetError(f"image {name!r} cannot be read as an image ({type(exc).__name__})") from None
    return path


def parse_options(value: Any) -> tuple[tuple[str, str], ...]:
    """A list (lettered A, B, ... in order) or an object letter -> text, as (letter, text) pairs."""
    if isinstance(value, list):
        pairs = _listed_options(value)
    elif isinstance(value, dict):
        pairs = _lettered_options(value)
    else:
        raise DatasetError(f"options must be a list of strings or an object letter -> text, got {json.dumps(value)}")
    if len(pairs) < 2:
        raise DatasetError(f"options must hold at least 2 choices, got {len(pairs)}")
    seen: dict[str, str] = {}
    for letter, text in pairs:
        if normalize(text) in seen:
            raise DatasetError(f"options {seen[normalize(text)]} and {letter} are the same text ({text!r})")
        seen[normalize(text)] = letter
    return pairs


def _listed_options(values: list[Any]) -> tuple[tuple[str, str], ...]:
    if not values:
        raise DatasetError("options is empty")
    if len(values) > len(LETTERS):
        raise DatasetError(f"options has {len(values)} choices; at most {len(LETTERS)} (A-Z) are supported")
    texts = [_text(v, f"option {LETTERS[i]}") for i, v in enumerate(values)]
    return tuple(zip(LETTERS[: len(texts)], _without_own_labels(texts), strict=True))


def _without_own_labels(texts: list[str]) -> list[str]:
    """Options written as "A. text", "(B) text", "C) text" lose the label the prompt adds anyway, but only when every
    option carries its own letter in order: otherwise a leading "A." may be part of the text."""
    patterns = [re.compile(rf"\(?{letter}[.):]\s*(\S.*)", re.S) for letter in LETTERS[: len(texts)]]
    matches = [p.fullmatch(t) for p, t in zip(patterns, texts, strict=True)]
    if all(matches):
        return [m.group(1).strip() for m in matches]
    return texts


def _lettered_options(values: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    if not values:
        raise DatasetError("options is empty")
    pairs: dict[str, str] = {}
    for key, text in values.items():
        letter = key.strip().upper()
        if len(letter) != 1 or letter not in LETTERS:
            raise DatasetError(f"option key {key!r} is not a letter A-Z")
        if letter in pairs:
            raise DatasetError(f"option {letter} is given twice")
        pairs[letter] = _text(text, f"option {letter}")
    return tuple(sorted(pairs.items()))


def parse_answer(value: Any, options: tuple[tuple[str, str], ...]) -> str:
    """The answer's letter: a letter ("B", "(B)", "b.") among the options, or the text of exactly one option."""
    text = _text(value, "answer")
    letters = [letter for letter, _ in options]
    match = re.fullmatch(r"\(?([A-Za-z])[.):]?", text)
    if match and match.group(1).upper() in letters:
        return match.group(1).upper()
    by_text = [letter for letter, option in options if normalize(option) == normalize(text)]
    if len(by_text) == 1:
        return by_text[0]
    raise DatasetError(
        f"answer {text!r} is neither an option letter ({letters[0]}-{letters[-1]}) nor the text of one option"
    )


def jpeg_bytes(path: Path, quality: int = 95) -> bytes:
    """The image as JPEG bytes, as the backends take them; a JPEG file is passed through untouched."""
    from PIL import Image

    data = path.read_bytes()
    if data.startswith(JPEG_MAGIC):
        return data
    with Image.open(io.BytesIO(data)) as picture:
        out = io.BytesIO()
        picture.convert("RGB").save(out, format="JPEG", quality=quality)
        return out.getvalue()
