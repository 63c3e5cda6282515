"""Score a model on multiple-choice questions: batched, deterministic generation through any ChatBackend, each
reply parsed to one option or to a reason it names none, and accuracy overall and per subset.

A reply that names no option (or several) is wrong and listed by its reason; a question the backend answered with
an error is wrong too, under its own reason. Nothing is ever guessed for a reply, so a model that writes noise
scores near zero rather than near chance. The report is a JSON-ready dict; ``publish`` writes it to
``eval/mc/<run>/<dataset>.json`` in a store.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from agents.prompts import Prompt
from agents.protocol import ChatBackend, ChatReply, Sampling
from pathgen.errors import BackendError
from tasks.mc.answers import NO_REPLY, parse_reply, request_for
from tasks.mc.dataset import Question, jpeg_bytes
from tasks.store.objects import Store

# Questions per generate call: the backend batches within it (transformers' batch_size, the OpenAI client's
# concurrency, vLLM's scheduler); the bound keeps at most this many decoded images in memory at once.
CHUNK = 64
DEFAULT_MAX_NEW_TOKENS = 32  # a letter, or a short sentence naming one; a longer reply is cut, then parsed as is


def mc_sampling(max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, seed: int = 0) -> Sampling:
    """Greedy decoding: the same model on the same question always gives the same reply, so scores repeat."""
    return Sampling(temperature=0.0, top_p=1.0, max_new_tokens=max_new_tokens, seed=seed)


@dataclass(frozen=True)
class Prediction:
    id: str
    subset: str | None
    answer: str
    predicted: str | None
    correct: bool
    reply: str | None
    reason: str | None  # why no option was read from the reply (None when one was)
    finish_reason: str | None
    error: str | None = None  # the backend's error for this question, if any


def predict(question: Question, reply: ChatReply) -> Prediction:
    if reply.ok:
        parsed = parse_reply(reply.text, question.options)
        letter, reason = parsed.letter, parsed.reason
    else:
        letter, reason = None, NO_REPLY
    return Prediction(
        id=question.id,
        subset=question.subset,
        answer=question.answer,
        predicted=letter,
        correct=letter == question.answer,
        reply=reply.text,
        reason=reason,
        finish_reason=reply.finish_reason,
        error=reply.error,
    )


def answer_questions(
    backend: ChatBackend,
    questions: list[Question],
    prompt: Prompt,
    sampling: Sampling,
    chunk: int = CHUNK,
    progress: Callable[[int, int], None] | None = None,
) -> list[Prediction]:
    """One prediction per question, in order; ``progress(done, total)`` after each chunk."""
    predictions: list[Prediction] = []
    for start in range(0, len(questions), chunk):
        batch = questions[start : start + chunk]
        requests = [request_for(prompt, q, jpeg_bytes(q.image)) for q in batch]
        replies = backend.generate(requests, sampling)
        if len(replies) != len(batch):  # the protocol's promise broken: pairing replies to questions is impossible
            raise BackendError(f"{backend.model_id} returned {len(replies)} replies for {len(batch)} questions")
        predictions.extend(predict(q, r) for q, r in zip(batch, replies, strict=True))
        if progress:
            progress(len(predictions), len(questions))
    return predictions


def tally(predictions: list[Prediction]) -> dict[str, Any]:
    n = len(predictions)
    correct = sum(p.correct for p in predictions)
    unparsed = sum(p.predicted is None for p in predictions)
    return {"n": n, "correct": correct, "accuracy": correct / n if n else None, "unparsed": unparsed}


def summarize(predictions: list[Prediction]) -> dict[str, Any]:
    """Overall and per-subset figures (questions without a subset count in overall only), and the unparsed
    replies' question ids grouped by reason."""
    subsets = sorted({p.subset for p in predictions if p.subset is not None})
    unparsed: dict[str, list[str]] = {}
    for p in predictions:
        if p.reason is not None:
            unparsed.setdefault(p.reason, []).append(p.id)
    return {
        "overall": tally(predictions),
        "by_subset": {s: tally([p for p in predictions if p.subset == s]) for s in subsets},
        "unparsed": unparsed,
    }


def build_report(
    dataset: Path,
    name: str,
    predictions: list[Prediction],
    model: dict[str, Any],
    prompt: Prompt,
    sampling: Sampling,
    limit: int | None,
) -> dict[str, Any]:
    return {
        "dataset": name,
        "file": str(dataset),
        "limit": limit,
        "model": model,
        "random_weights": bool(model.get("random_weights")),
        "prompt": prompt.version,
        "sampling": asdict(sampling),
        **summarize(predictions),
        "predictions": [asdict(p) for p in predictions],
    }


def dataset_name(path: Path, limit: int | None, total: int) -> str:
    """The file's stem; a run on the first N questions only is named apart, so it never passes for the whole set."""
    name = path.name.removesuffix(".jsonl").removesuffix(".json")
    return f"{name}-first{limit}" if limit and limit < total else name


def run_name(model: dict[str, Any]) -> str:
    """A store-safe name for the model: a local folder by its name, a hub or served id with '/' made '-'."""
    model_id = str(model.get("model_id") or "model")
    label = Path(model_id).name if Path(model_id).expanduser().is_dir() else model_id
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", label).strip("-.")[-80:] or "model"


def publish(store: Store, run: str, report: dict[str, Any]) -> str:
    """Write ``eval/mc/<run>/<dataset>.json`` (atomically); returns its URI."""
    key = f"eval/mc/{run}/{report['dataset']}.json"
    store.write_bytes(key, report_bytes(report))
    return store.uri(key)


def report_bytes(report: dict[str, Any]) -> bytes:
    return (json.dumps(report, indent=1, default=str) + "\n").encode()
