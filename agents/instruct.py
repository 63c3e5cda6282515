"""The instruct role: PathGen-Instruct-style conversations about a patch, written from its revised description
(and, with a vision-language prompt such as ``instruct-image.v1``, its image), parsed and validated before any can
become training data.

Reply format (what the prompt asks for): JSON only, a list of conversations::

    [{"kind": "open" | "yes-no" | "multiple-choice",
      "turns": [{"question": "...", "answer": "...", "options": ["...", ...]}, ...]}, ...]

``options`` belongs to multiple-choice turns only. JSON because every instruction-following model writes it and one
standard parser reads it; the reader forgives what models commonly add around it (a ```json fence, prose before or
after the list, ``{"conversations": [...]}``, ``type``/``q``/``a`` for ``kind``/``question``/``answer``, "B) ..."
letter prefixes on options, an answer given as the correct option's letter) and is strict about content.

Validation: a reply is checked like every other role's (empty, refusal, garbage, repetition, over-long: stage
``reply``), then parsed (stage ``parse``), then each of its first ``conversations_per_description`` conversations
on its own (stage ``validate``): a bad conversation is dropped with its reason, the good ones of the same reply are
kept. A reply that yields no good conversation is asked again once with another seed, as captions are. Answers must
be grounded: the share of their content words (stop words and generic words dropped, crude 5-letter stems) that the
description contains must reach ``min_support``; for closed questions the yes/no answer is a fixed value, so the
question itself must reach ``min_question_support``, and in a multiple-choice turn the correct option must reach
``min_support`` and appear among the options exactly once.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import logging
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from agents.backends import backend_for
from agents.identity import item_seed, model_identity, role_inputs, sampling_of
from agents.prompts import load_prompt
from agents.protocol import ChatBackend, ChatReply, ChatRequest, Sampling
from agents.validation import problem
from pathgen.settings import InstructSettings, Settings

log = logging.getLogger("pathgen.instruct")

KINDS = ("open", "yes-no", "multiple-choice")
MIN_OPTIONS, MAX_OPTIONS = 2, 6
LETTERS = "ABCDEF"
_KIND_ALIASES = {
    "open": "open",
    "openended": "open",
    "yesno": "yes-no",
    "closed": "yes-no",
    "multiplechoice": "multiple-choice",
    "mcq": "multiple-choice",
    "choice": "multiple-choice",
}
_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.S | re.I)
_OPTION_LETTER = re.compile(r"^\(?([A-Fa-f])[).:]\s+")
_LETTER_ONLY = re.compile(r"^\(?([A-Fa-f])\)?[.:]?$")
_WORD = re.compile(r"[a-z][a-z0-9]*")
# The data must read as a conversation about the image: a turn that cites the text it was written from is rejected.
_MENTIONS_SOURCE = re.compile(r"\b(descriptions?|described|the (text|passage|report))\b", re.I)
# Function words and the generic words of questions about an image: they carry no finding, so they never count for
# or against grounding.
_STOP_TEXT = """a an the and or of in on at to for with without by from as is are was were be been being this that these
    those there here it its into within which what who whom whose how why when where does do did can could may might
    shall should will would has have had not no nor but if than then so such also more most less least very some any
    all each both either neither other another one two three few many much same own only just about above below
    between over under again further once image images picture photo patch patches slide field view show shows shown
    showing seen see visible present presence observed evident appear appears appearing feature features finding
    findings note noted following best likely consistent yes you your there their they them seems seem"""
STOP_WORDS = frozenset(_STOP_TEXT.split())


class Invalid(ValueError):
    """A reply or conversation that cannot become data; ``reason`` is the failed table's key."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


# The code of the rules (parsing, validation, rendering), whose identity is part of instruct_hash: from this module,
# what read_reply and Rules reach; agents.validation whole (its reply checks).
RULES_CODE = ((Path(__file__), ("read_reply", "Rules")), (Path(__file__).with_name("validation.py"), None))


def _without_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        first = body[0] if isinstance(body, list) and body else None
        if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
            node.body = body[1:] or [ast.Pass()]
    return tree


def _definitions(tree: ast.Module) -> dict[str, ast.stmt]:
    """Each top-level name of a module with the statement that defines it."""
    found: dict[str, ast.stmt] = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            found[node.name] = node
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                found.update({n.id: node for n in ast.walk(target) if isinstance(n, ast.Name)})
    return found


def _canonical(node: Any) -> str:
    """A syntax tree as text, the same on every supported Python: ast.dump shows 3.12's new type_params field, and
    ast.unparse writes f-strings with other quotes on 3.12. Workers on 3.11 and 3.12 must agree on instruct_hash."""
    if isinstance(node, ast.AST):
        fields = (_canonical(getattr(node, name, None)) for name in node._fields if name != "type_params")
        return f"{type(node).__name__}({', '.join(fields)})"
    if isinstance(node, list):
        return f"[{', '.join(_canonical(item) for item in node)}]"
    return repr(node)


def reached_code(source: str, roots: tuple[str, ...] | None) -> str:
    """The code of a module's ``roots`` and of every top-level definition they use, directly or not (all of it
    when roots is None), as a canonical syntax tree: comments, layout and docstrings do not count, a changed rule
    does."""
    tree = _without_docstrings(ast.parse(source))
    if roots is None:
        return _canonical(tree)
    definitions = _definitions(tree)
    reached, todo = set(), list(roots)
    while todo:
        name = todo.pop()
        if name in reached or name not in definitions:
            continue
        reached.add(name)
        todo += [n.id for n in ast.walk(definitions[name]) if isinstance(n, ast.Name)]
    kept = [node for node in tree.body if any(definitions.get(name) is node for name in reached)]
    return _canonical(kept)


@functools.cache
def rules_code(sources: tuple[tuple[Path, tuple[str, ...] | None], ...] | None = None) -> str:
    """The rules' identity: a digest of their code (RULES_CODE), so that changing a rule changes instruct_hash
    without anyone remembering to bump a version."""
    digest = hashlib.sha256()
    for path, roots in sources or RULES_CODE:
        digest.update(reached_code(Path(path).read_text(), roots).encode())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class Rules:
    """Everything of the settings that decides what is accepted and how it is rendered (part of instruct_hash)."""

    conversations: int = 3
    max_turns: int = 3
    min_support: float = 0.6
    min_question_support: float = 0.5

    @classmethod
    def of(cls, role: InstructSettings) -> Rules:
        return cls(role.conversations_per_description, role.max_turns, role.min_support, role.min_question_support)

    def inputs(self) -> dict[str, Any]:
        return {
            "code": rules_code(),
            "conversations": self.conversations,
            "max_turns": self.max_turns,
            "min_support": self.min_support,
            "min_question_support": self.min_question_support,
            "options": [MIN_OPTIONS, MAX_OPTIONS],
        }


@dataclass(frozen=True)
class Conversation:
    index: int  # its place in the reply: with the patch id, the conversation's stable id
    kind: str
    messages: list[dict[str, str]]  # LLaVA turns: {"from": "human"|"gpt", "value": ...}, no <image> token
    support: float  # the weakest grounding score among its turns


@dataclass(frozen=True)
class InstructFailure:
    key: str  # the patch id
    conversation: int | None  # its place in the reply; None when the whole reply failed
    stage: str  # reply | parse | validate
    reason: str
    detail: str


@dataclass
class ReplyOutcome:
    conversations: list[Conversation] = field(default_factory=list)
    failures: list[InstructFailure] = field(default_factory=list)


# -- grounding -----------------------------------------------------------------------------------------------------


def content_stems(text: str) -> set[str]:
    """Content words as crude stems: lower case, stop words and words under 3 letters dropped, a plural ``s``
    removed, cut to 5 letters (so that necrosis/necrotic, atypia/atypical, gland/glands meet)."""
    stems = set()
    for word in _WORD.findall(text.lower()):
        if len(word) < 3 or word in STOP_WORDS:
            continue
        if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
            word = word[:-1]
        stems.add(word[:5])
    return stems


def support(claim: str, source: set[str]) -> tuple[float, int]:
    """The share of the claim's content stems found in the source's, and how many stems the claim has."""
    stems = content_stems(claim)
    if not stems:
        return 0.0, 0
    return round(len(stems & source) / len(stems), 4), len(stems)


# -- parsing -------------------------------------------------------------------------------------------------------


def extract_json(text: str) -> Any:
    """The JSON value of a reply: the whole text, a fenced block, or the span from the first bracket to the last."""
    candidates = [text.strip(), *(m.strip() for m in _FENCE.findall(text))]
    for opening, closing in ("[]", "{}"):
        start, end = text.find(opening), text.rfind(closing)
        if 0 <= start < end:
            candidates.append(text[start : end + 1])
    for candidate in candidates:
        try:
            return json.loads(candidate)
        except ValueError:
            continue
    raise Invalid("not-json", text[:300])


def conversations_of(value: Any) -> list[Any]:
    """The list of conversations a parsed reply holds: the list itself, ``{"conversations": [...]}``, or a single
    conversation object."""
    if isinstance(value, dict):
        value = value.get("conversations", [value] if "turns" in value else None)
    if not isinstance(value, list):
        raise Invalid("not-a-list", json.dumps(value)[:300])
    if not value:
        raise Invalid("no-conversations")
    return value


def _field(item: dict, *names: str) -> Any:
    for name in names:
        if name in item:
            return item[name]
    return None


def _text(item: dict, *names: str) -> str:
    value = _field(item, *names)
    return value.strip() if isinstance(value, str) else ""


def _kind(item: dict) -> str:
    raw = _field(item, "kind", "type")
    kind = _KIND_ALIASES.get(re.sub(r"[^a-z]", "", raw.lower())) if isinstance(raw, str) else None
    if kind is None:
        raise Invalid("bad-kind", f"kind {raw!r}; one of {', '.join(KINDS)}")
    return kind


def _turns(item: dict, rules: Rules) -> list[dict]:
    turns = _field(item, "turns", "conversation", "messages")
    if isinstance(turns, dict):
        turns = [turns]
    if not isinstance(turns, list) or not turns:
        raise Invalid("no-turns", json.dumps(item)[:300])
    if len(turns) > rules.max_turns:
        raise Invalid("too-many-turns", f"{len(turns)} turns, at most {rules.max_turns}")
    if not all(isinstance(t, dict) for t in turns):
        raise Invalid("bad-turn", json.dumps(turns)[:300])
    return turns


# -- one turn of each kind: (human text, gpt text, grounding score) -------------------------------------------------


def _open_turn(question: str, answer: str, source: set[str], rules: Rules) -> tuple[str, str, float]:
    score, stems = support(answer, source)
    if not stems:
        raise Invalid("no-content", f"answer {answer[:200]!r} has no content words")
    if score < rules.min_support:
        raise Invalid("ungrounded", f"support {score:.2f} < {rules.min_support}: {answer[:200]!r}")
    return question, answer, score


def _yes_no_turn(question: str, answer: str, source: set[str], rules: Rules) -> tuple[str, str, float]:
    value = re.sub(r"[^a-z]", "", answer.lower())
    if value not in ("yes", "no"):
        raise Invalid("not-yes-no", f"answer {answer[:100]!r}")
    score, stems = support(question, source)
    if not stems or score < rules.min_question_support:
        raise Invalid("ungrounded-question", f"support {score:.2f} < {rules.min_question_support}: {question[:200]!r}")
    return question, value.capitalize() + ".", score


def _strip_letter(text: str) -> str:
    return _OPTION_LETTER.sub("", text.strip()).strip()


def _norm(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9]+", " ", text.lower()).split())


def _options(turn: dict) -> list[str]:
    options = _field(turn, "options", "choices")
    if not isinstance(options, list) or not MIN_OPTIONS <= len(options) <= MAX_OPTIONS:
        raise Invalid("bad-options", f"options {json.dumps(options)[:200]}; {MIN_OPTIONS} to {MAX_OPTIONS} needed")
    if not all(isinstance(o, str) and _strip_letter(o) for o in options):
        raise Invalid("bad-options", f"empty or non-text option in {json.dumps(options)[:200]}")
    return [_strip_letter(o) for o in options]


def _choice_turn(question: str, turn: dict, source: set[str], rules: Rules) -> tuple[str, str, float]:
    options = _options(turn)
    answer = _text(turn, "answer", "a")
    letter = _LETTER_ONLY.match(answer)
    if letter and LETTERS.index(letter.group(1).upper()) < len(options):
        answer = options[LETTERS.index(letter.group(1).upper())]
    matches = [i for i, option in enumerate(options) if _norm(option) == _norm(_strip_letter(answer))]
    if not matches:
        raise Invalid("answer-not-in-options", f"answer {answer[:100]!r} not among {json.dumps(options)[:200]}")
    if len(matches) > 1:
        raise Invalid("answer-not-unique", f"answer {answer[:100]!r} is {len(matches)} of the options")
    if len({_norm(o) for o in options}) < len(options):
        raise Invalid("duplicate-options", json.dumps(options)[:200])
    correct = options[matches[0]]
    score, stems = support(correct, source)
    if not stems or score < rules.min_support:
        raise Invalid("ungrounded", f"correct option support {score:.2f} < {rules.min_support}: {correct[:200]!r}")
    listed = "\n".join(f"{LETTERS[i]}. {option}" for i, option in enumerate(options))
    return f"{question}\n{listed}", f"{LETTERS[matches[0]]}. {correct}", score


def validate_conversation(item: Any, index: int, source: set[str], rules: Rules) -> Conversation:
    """One conversation of a reply as LLaVA turns; raises Invalid with the reason when it cannot be data."""
    if not isinstance(item, dict):
        raise Invalid("bad-conversation", json.dumps(item)[:300])
    kind = _kind(item)
    messages: list[dict[str, str]] = []
    scores = []
    for turn in _turns(item, rules):
        question, answer = _text(turn, "question", "q"), _text(turn, "answer", "a")
        if not question or not answer:
            raise Invalid("empty-turn", json.dumps(turn)[:300])
        if _MENTIONS_SOURCE.search(question) or _MENTIONS_SOURCE.search(answer):
            raise Invalid("mentions-source", f"{question[:150]!r} / {answer[:150]!r}")
        if kind == "open":
            human, gpt, score = _open_turn(question, answer, source, rules)
        elif kind == "yes-no":
            human, gpt, score = _yes_no_turn(question, answer, source, rules)
        else:
            human, gpt, score = _choice_turn(question, turn, source, rules)
        messages += [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}]
        scores.append(score)
    return Conversation(index, kind, messages, min(scores))


def read_reply(key: str, reply: ChatReply, description: str, rules: Rules, max_words: int) -> ReplyOutcome:
    """Check, parse and validate one reply: its good conversations and a failure for each bad one (or one for the
    whole reply)."""
    reason = problem(reply, max_words)
    if reason is not None:
        return ReplyOutcome(failures=[InstructFailure(key, None, "reply", reason, reply.error or reply.text or "")])
    text = reply.text or ""
    try:
        items = conversations_of(extract_json(text))
    except Invalid as exc:
        cut_off = exc.reason == "not-json" and reply.finish_reason == "length"
        reason = "cut-off" if cut_off else exc.reason  # the token limit ended it mid-JSON: say so
        return ReplyOutcome(failures=[InstructFailure(key, None, "parse", reason, exc.detail or text[:300])])
    source = content_stems(description)
    outcome = ReplyOutcome()
    for index, item in enumerate(items[: rules.conversations]):  # later ones were not asked for: not read
        try:
            outcome.conversations.append(validate_conversation(item, index, source, rules))
        except Invalid as exc:
            outcome.failures.append(InstructFailure(key, index, "validate", exc.reason, exc.detail))
    return outcome


# -- identity and hash ---------------------------------------------------------------------------------------------


def instruct_identity(settings: Settings) -> str:
    """The instruct model's identity as loaded (a folder digest, a hub revision, what a server reports, or the
    tiny random model of the kind its prompt needs)."""
    role = settings.instruct
    return model_identity(role, settings.agents, settings.retries, load_prompt(role.prompt).has_image)


def hash_inputs(settings: Settings, identity: str, source_agents_hash: str) -> dict[str, Any]:
    role = settings.instruct
    return {
        "role": role_inputs("instruct", role, settings.agents, identity),
        "rules": Rules.of(role).inputs(),
        "source_agents_hash": source_agents_hash,
    }


def instruct_hash(settings: Settings, identity: str, source_agents_hash: str) -> str:
    """Covers everything that changes the conversations: model identity, prompt version (its content hash),
    sampling, reply-shaping backend settings, the validation rules and the pairs they are written from."""
    blob = json.dumps(hash_inputs(settings, identity, source_agents_hash), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


# -- the agent -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    description: str  # the revised description
    image: bytes | None = None  # JPEG, sent only when the prompt places an image


@dataclass
class InstructResult:
    conversations: dict[str, list[Conversation]]
    failures: list[InstructFailure]
    seconds: float = 0.0


class InstructAgent:
    """The instruct role with its prompt, sampling, rules and backend (shared with a caption role naming the same
    model and settings)."""

    def __init__(self, settings: Settings, logger: logging.Logger | None = None, backend: ChatBackend | None = None):
        """``backend`` replaces the one the settings name (tests: a scripted double)."""
        self.settings = settings
        self.role = settings.instruct
        self.prompt = load_prompt(self.role.prompt)
        self.rules = Rules.of(self.role)
        if backend is None:
            self.identity = instruct_identity(settings)
            backend = backend_for(self.role, settings.agents, settings.retries, self.prompt.has_image, self.identity)
        else:
            self.identity = f"given:{backend.name}:{backend.model_id}"
        self.backend = backend
        if backend.random_weights:
            (logger or log).warning(
                "instruction data from a RANDOM-WEIGHT model (%s): its replies are noise and will mostly fail "
                "validation; set instruct.model to a model with trained weights",
                self.role.model or backend.model_id,
            )

    @property
    def random_weights(self) -> bool:
        return bool(self.backend.random_weights)

    @property
    def model_name(self) -> str:
        if self.role.model:
            return self.role.model + (" (random weights)" if self.random_weights else "")
        from agents.tiny import TINY_LM, TINY_VLM

        return (TINY_VLM if self.prompt.has_image else TINY_LM) + " (random weights)"

    @property
    def sampling(self) -> Sampling:
        r = self.role
        return Sampling(r.temperature, r.top_p, r.max_new_tokens, r.seed)

    def instruct_hash(self, source_agents_hash: str) -> str:
        return instruct_hash(self.settings, self.identity, source_agents_hash)

    def provenance(self, source_agents_hash: str) -> dict[str, Any]:
        return {
            "backend": self.role.backend,
            "model": self.model_name,
            "identity": self.identity,
            "random_weights": self.random_weights,
            "prompt": self.prompt.version,
            "sampling": sampling_of(self.role),
            "rules": self.rules.inputs(),
            "source_agents_hash": source_agents_hash,
            "instruct_hash": self.instruct_hash(source_agents_hash),
        }

    def request(self, item: Source) -> ChatRequest:
        fields = {"count": self.rules.conversations, "turns": self.rules.max_turns, "description": item.description}
        return self.prompt.request(item.image, **fields)

    def run(self, items: dict[str, Source], source_agents_hash: str = "") -> InstructResult:
        """One batch for every item; a reply with no good conversation is asked again once with another seed, then
        its failures are final. Backend failures raise (infrastructure: nothing is recorded). Each request is seeded
        from its item (patch id) and the instruct_hash, never from the rest of the batch."""
        tick = time.perf_counter()
        found: dict[str, list[Conversation]] = {}
        failures: list[InstructFailure] = []
        pending = list(items)
        run_hash = self.instruct_hash(source_agents_hash)
        for attempt in range(2):
            if not pending:
                break
            requests = [  # the re-ask's new seed is the item's own (attempt 1)
                replace(self.request(items[k]), seed=item_seed(run_hash, "instruct", k, attempt)) for k in pending
            ]
            replies = self.backend.generate(requests, self.sampling)
            retry = []
            for key, reply in zip(pending, replies, strict=True):
                outcome = read_reply(key, reply, items[key].description, self.rules, self.role.max_words)
                if outcome.conversations or attempt == 1:
                    found[key] = outcome.conversations
                    failures += outcome.failures
                else:
                    retry.append(key)
            pending = retry
        return InstructResult(found, failures, time.perf_counter() - tick)
