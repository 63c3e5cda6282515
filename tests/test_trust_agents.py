"""A patch's replies depend on the patch and the settings alone, never on which slides shared its batch (issue 17,
point 3), and the instruct rules' identity comes from their code (point 4). Models are the tiny random ones built
by the tests; the test doubles here record what a backend is given and are never presented as a model's output."""

import io
import json
import sys
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from agents import backends as backend_module
from agents.backends import backend_for
from agents.identity import agents_hash, hash_inputs, identities
from agents.instruct import InstructAgent, Source, instruct_hash
from agents.pipeline import CaptionAgents
from agents.protocol import ChatReply, ChatRequest, Sampling
from pathgen.settings import AgentsSettings, load_settings

from .test_instruct import DESCRIPTION, GOOD
from .test_openai_backend import TinyModelServer

ROLES = ("describe", "revise", "summarize")
SHORT = {f"agents.{role}.max_new_tokens": 16 for role in ROLES}  # short noise: the test is about seeds, not length


def _patches(slides: int, per_slide: int) -> list[dict[str, bytes]]:
    """Each slide's patches (random pixels as JPEG), keyed by patch id."""
    groups = []
    for s in range(slides):
        group = {}
        for p in range(per_slide):
            rgb = np.random.default_rng(s * 10 + p).integers(0, 255, (224, 224, 3), np.uint8)
            out = io.BytesIO()
            Image.fromarray(rgb).save(out, format="JPEG")
            group[f"slide{s}_{p}"] = out.getvalue()
        groups.append(group)
    return groups


def _outcomes(result) -> dict[str, object]:
    """Per patch: its caption record, or its failures with the reply text that failed."""
    found: dict[str, object] = {key: caption for key, caption in result.captions.items()}
    for failure in result.failures:
        found.setdefault(failure.key, []).append((failure.stage, failure.reason, failure.detail))
    return found


def _grouped(agents: CaptionAgents, groups: list[dict[str, bytes]], slides_per_task: int) -> dict[str, object]:
    found: dict[str, object] = {}
    for start in range(0, len(groups), slides_per_task):
        batch = {k: v for group in groups[start : start + slides_per_task] for k, v in group.items()}
        found.update(_outcomes(agents.run(batch)))
    return found


def test_a_patch_gets_the_same_caption_however_its_slides_are_grouped(tiny_models):
    # The figure: slides_per_task=4 and =1 over the same four slides gave 16 of 16 different captions.
    cache, _ = tiny_models
    settings = load_settings(overrides={"agents.model_cache": str(cache), **SHORT}, environ={})
    agents = CaptionAgents(settings.agents)
    groups = _patches(slides=4, per_slide=1)
    together = _grouped(agents, groups, 4)
    alone = _grouped(agents, groups, 1)
    assert set(together) == set(alone) == {k for g in groups for k in g}
    assert together == alone
    texts = [c.description if hasattr(c, "description") else c[0][2] for c in together.values()]
    assert len(set(texts)) > 1  # the patches got replies of their own, not one shared reply


class SeedRecordingServer(TinyModelServer):
    """The tests' OpenAI-compatible tiny-model server, also recording each request's user content and seed."""

    def __init__(self, paths):
        super().__init__(paths)
        self.seen: list[tuple[str, int]] = []

    def answer(self, body):
        content = next(m["content"] for m in body["messages"] if m["role"] == "user")
        with self.lock:
            self.seen.append((json.dumps(content, sort_keys=True), body["seed"]))
        return super().answer(body)


def test_openai_requests_carry_each_items_own_seed_whatever_its_batch(tiny_models):
    _, paths = tiny_models
    server = SeedRecordingServer(paths)
    try:
        overrides = {
            "agents.openai_base_url": server.url,
            **{f"agents.{role}.backend": "openai" for role in ROLES},
            **{f"agents.{role}.model": "tiny-vlm" for role in ("describe", "revise")},
            "agents.summarize.model": "tiny-lm",
            **SHORT,
        }
        settings = load_settings(overrides=overrides, environ={})
        agents = CaptionAgents(settings.agents, settings.retries)
        groups = _patches(slides=3, per_slide=1)
        together = _grouped(agents, groups, 3)
        seen_together, server.seen = set(server.seen), []
        alone = _grouped(agents, groups, 1)
        assert seen_together == set(server.seen)  # each request arrived with the same seed both ways
        assert together == alone
        describe = [seed for content, seed in seen_together if "image_url" in content and "Check every" not in content]
        assert len(set(describe)) == 3  # a seed per patch, not one per batch
    finally:
        server.stop()


class FakeVLLM:
    """Test double of the ``vllm`` module's public API (LLM, SamplingParams): records what the engine is given and
    answers empty replies, which are never presented as a model's."""

    class SamplingParams:
        def __init__(self, **kwargs):
            self.__dict__.update(kwargs)

    class LLM:
        def __init__(self, **kwargs):
            self.calls: list = []
            self.shut_down = False

        def chat(self, conversations, sampling_params, use_tqdm=True):
            self.calls.append(sampling_params)
            return [SimpleNamespace(outputs=[SimpleNamespace(text="", finish_reason="stop")]) for _ in conversations]

        def shutdown(self):
            self.shut_down = True


def test_vllm_gets_one_sampling_params_per_request_with_its_seed_and_shuts_down_on_release(monkeypatch):
    from agents.backends import release_backends
    from agents.identity import item_seed

    monkeypatch.setitem(sys.modules, "vllm", FakeVLLM)
    monkeypatch.setattr(backend_module, "_backends", {})  # none cached by earlier tests: this test's alone
    settings = load_settings(
        overrides={"agents.summarize.backend": "vllm", "agents.summarize.model": "org/m"}, environ={}
    )
    backend = backend_for(settings.agents.summarize, settings.agents, settings.retries, False, "hub:org/m@abc")
    requests = [ChatRequest("", f"item {i}", seed=item_seed("h", "summarize", f"p{i}")) for i in range(3)]
    backend.generate(requests, Sampling(0.2, 0.9, 16, 0))
    backend.generate(requests[2:], Sampling(0.2, 0.9, 16, 0))
    batch, alone = backend.llm.calls
    assert [p.seed for p in batch] == [r.seed for r in requests] and alone[0].seed == batch[2].seed
    assert len({p.seed for p in batch}) == 3 and batch[0].temperature == 0.2 and batch[0].max_tokens == 16
    engine = backend.llm
    assert release_backends() == 1
    assert engine.shut_down and backend.llm is None
    with pytest.raises(RuntimeError, match="shut down at the end of its stage"):
        backend.generate(requests, Sampling(0.2, 0.9, 16, 0))


def test_item_seeds_follow_patch_role_and_hash_and_the_seeding_scheme_is_in_agents_hash(monkeypatch):
    from agents.identity import item_seed

    assert item_seed("h", "describe", "p1") == item_seed("h", "describe", "p1")
    others = {item_seed("h", "describe", "p2"), item_seed("h", "revise", "p1"), item_seed("g", "describe", "p1")}
    assert item_seed("h", "describe", "p1") not in others and len(others) == 3
    assert item_seed("h", "describe", "p1", attempt=1) != item_seed("h", "describe", "p1")
    assert all(0 <= item_seed("h", "r", str(i)) < 2**31 for i in range(100))  # servers taking 32-bit seeds
    agents = AgentsSettings()
    found = identities(agents, load_settings(environ={}).retries)
    assert hash_inputs(agents, found)["roles"]["describe"]["seeding"]
    before = agents_hash(agents, found)
    monkeypatch.setattr("agents.identity.SEEDING", "another-scheme")
    assert agents_hash(agents, found) != before  # another seeding draws other replies: another agents_hash


class Recording:
    """Test double: records each request's text and seed; replies with a fixed valid conversation list (it drives
    control flow only)."""

    name, model_id, random_weights = "recording", "recording", False

    def __init__(self):
        self.seen: dict[str, int] = {}

    def generate(self, requests, sampling):
        self.seen.update({r.after_image or r.before_image: r.seed for r in requests})
        return [ChatReply(json.dumps(GOOD)) for _ in requests]


def test_instruct_requests_are_seeded_by_patch_and_instruct_hash_not_batch():
    settings = load_settings(environ={})
    backend = Recording()
    agent = InstructAgent(settings, backend=backend)
    items = {k: Source(f"{DESCRIPTION}\n{k}") for k in ("a", "b", "c")}
    agent.run(items, "pairs1")
    together = dict(backend.seen)
    agent.run({"c": items["c"]}, "pairs1")
    assert backend.seen == together and len(set(together.values())) == 3
    agent.run({"c": items["c"]}, "pairs2")  # other source pairs: another instruct_hash, other seeds
    assert backend.seen != together


# -- point 4: the instruct rules' identity is their code ----------------------------------------------------------


def _copies(tmp_path, edit_instruct=None, edit_validation=None):
    from agents.instruct import RULES_CODE

    (module, roots), (validation, whole) = RULES_CODE
    tmp_path.mkdir(parents=True, exist_ok=True)
    a, b = tmp_path / "instruct.py", tmp_path / "validation.py"
    a.write_text((edit_instruct or (lambda t: t))(module.read_text()))
    b.write_text((edit_validation or (lambda t: t))(validation.read_text()))
    return ((a, roots), (b, whole))


def _replace(old, new):
    def edit(text):
        assert old in text, old
        return text.replace(old, new, 1)

    return edit


def test_the_rules_identity_changes_with_a_rule_and_with_nothing_else(tmp_path):
    from agents.instruct import rules_code

    base = rules_code(_copies(tmp_path / "same"))
    assert base == rules_code()  # the same code read from elsewhere
    stop_word = _replace("    all each both", "    all each both maybe")
    threshold = _replace('raise Invalid("no-conversations")', 'raise Invalid("empty-list")')
    validation = _replace("if run >= 6:", "if run >= 5:")
    for name, edits in {
        "stop word": (stop_word, None),
        "reason": (threshold, None),
        "check": (None, validation),
    }.items():
        assert rules_code(_copies(tmp_path / name.replace(" ", "-"), *edits)) != base, name
    comment = _replace("KINDS = (", "# a comment\nKINDS = (")
    docstring = _replace('"""The JSON value of a reply', '"""Reworded: the JSON value of a reply')
    agent_only = _replace("tick = time.perf_counter()", "tick = time.perf_counter()\n        tick = tick")
    for name, edit in {"comment": comment, "docstring": docstring, "agent": agent_only}.items():
        assert rules_code(_copies(tmp_path / name, edit)) == base, name


def test_instruct_hash_follows_the_rules_code(tmp_path, monkeypatch):
    from agents.instruct import rules_code

    settings = load_settings(environ={})
    before = instruct_hash(settings, "model", "pairs1")
    edited = _copies(tmp_path, _replace("MIN_OPTIONS, MAX_OPTIONS = 2, 6", "MIN_OPTIONS, MAX_OPTIONS = 2, 5"))
    monkeypatch.setattr("agents.instruct.RULES_CODE", edited)
    rules_code.cache_clear()
    try:
        assert instruct_hash(settings, "model", "pairs1") != before
    finally:
        monkeypatch.undo()
        rules_code.cache_clear()
    assert instruct_hash(settings, "model", "pairs1") == before
