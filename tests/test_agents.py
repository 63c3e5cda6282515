"""Backends, validation, the CLIP budget and the three-role loop. Models are the tiny random ones built by the
tests; where a test needs exact replies (to drive retries, re-asks and trimming) it says so and uses a scripted
backend, a test double whose output is never presented as a model's."""

import io
import json

import numpy as np
import open_clip
import pytest
from PIL import Image

from agents.backends.hf import TransformersBackend
from agents.clip_tokens import clip_token_count, trim_to_tokens
from agents.pipeline import CaptionAgents
from agents.prompts import load_prompt
from agents.protocol import ChatReply, ChatRequest, Sampling
from agents.tiny import TINY_LM, TINY_VLM
from agents.validation import problem, repetitive, tidy
from pathgen.errors import BackendError
from pathgen.settings import AgentsSettings, load_settings


def _jpeg(seed: int, size: int = 224) -> bytes:
    rgb = np.random.default_rng(seed).integers(0, 255, (size, size, 3), np.uint8)
    out = io.BytesIO()
    Image.fromarray(rgb).save(out, format="JPEG")
    return out.getvalue()


def test_tiny_vlm_answers_a_batch_with_images(tiny_models):
    _, paths = tiny_models
    backend = TransformersBackend(str(paths[TINY_VLM]), "cpu", batch_size=2, random_weights=True)
    prompt = load_prompt("revise.v1")
    requests = [prompt.request(_jpeg(i), description="word " * (i * 7 + 1)) for i in range(3)]  # unequal lengths
    replies = backend.generate(requests, Sampling(0.7, 0.9, 16, 0))
    assert len(replies) == 3 and all(r.ok and r.text for r in replies)
    assert all(r.finish_reason in ("stop", "length") for r in replies)
    again = backend.generate(requests, Sampling(0.7, 0.9, 16, 0))
    assert [r.text for r in again] == [r.text for r in replies]  # seeded


def test_text_only_model_refuses_images(tiny_models):
    # A configuration mistake, not a reply about this patch: it raises instead of failing every patch on record.
    _, paths = tiny_models
    backend = TransformersBackend(str(paths[TINY_LM]), "cpu", random_weights=True)
    with pytest.raises(ValueError, match="text-only model.*name a vision-language model"):
        backend.generate([load_prompt("describe.v1").request(_jpeg(0))], Sampling(0.7, 0.9, 8, 0))


def test_prompts_are_versioned_and_put_shared_text_before_the_image():
    revise = load_prompt("revise.v1")
    assert revise.has_image and revise.version.startswith("revise.v1@")
    request = revise.request(b"jpeg", description="Sheets of tumor cells.")
    assert "Check every statement" in request.before_image and "{" not in request.before_image
    assert request.after_image.endswith("Sheets of tumor cells.")
    assert not load_prompt("summarize.v1").has_image
    with pytest.raises(ValueError, match="not found"):
        load_prompt("describe.v9")


@pytest.mark.parametrize(
    "text, finish, reason",
    [
        ("", "stop", "empty"),
        ("   ", "stop", "empty"),
        ("I'm sorry, but I cannot help with identifying this image.", "stop", "refusal"),
        ("As an AI, I am unable to analyze medical images.", "stop", "refusal"),
        ("Tumor \x00\x01 cells \ufffd", "stop", "garbage"),
        ("cells cells cells cells cells cells in stroma", "stop", "repetition"),
        ("the tumor " * 30, "length", "repetition"),
        ("word " * 500, "length", "over-long"),
        ("Sheets of atypical squamous cells with keratin pearls infiltrate the stroma.", "stop", None),
    ],
)
def test_validation_reasons(text, finish, reason):
    assert problem(ChatReply(text, None, finish), max_words=400) == reason


def test_rejected_requests_and_truncated_replies():
    # Only a per-request refusal (HTTP 400/413/422) reaches validation as an error reply; backend failures raise.
    assert problem(ChatReply(None, "HTTP 400 from http://server/v1: image too large"), 10) == "rejected"
    assert tidy(ChatReply("First sentence. Second sentence. Third is cut of", None, "length")) == (
        "First sentence. Second sentence."
    )
    assert tidy(ChatReply("No full stop at all but cut", None, "length")) == "No full stop at all but cut"
    assert not repetitive(["a", "normal", "description", "of", "tissue", "with", "many", "different", "words"])


def test_clip_token_count_matches_open_clip():
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    text = "An H&E image of invasive ductal carcinoma with desmoplastic stroma and tumor-infiltrating lymphocytes."
    ids = tokenizer([text])[0]
    assert clip_token_count(text) == int((ids != 0).sum())


def test_trim_keeps_whole_sentences_then_whole_words():
    sentences = " ".join(f"Sentence number {i} describes tumor cells in stroma." for i in range(12))
    trimmed = trim_to_tokens(sentences, 77)
    assert clip_token_count(trimmed) <= 77 and trimmed.endswith(".") and trimmed in sentences
    one_long = " ".join(["pleomorphic"] * 120)
    cut = trim_to_tokens(one_long, 77)
    assert clip_token_count(cut) <= 77 and cut.endswith(".") and len(cut.split()) > 10


class Scripted:
    """Test double: replies from a function of the request; used only to drive control flow in tests."""

    name = "scripted"
    random_weights = False

    def __init__(self, model_id, reply):
        self.model_id = model_id
        self.reply = reply
        self.calls: list[list[ChatRequest]] = []

    def generate(self, requests, sampling):
        self.calls.append(list(requests))
        return [self.reply(r, sampling) for r in requests]


def _agents(describe, revise, summarize, **settings):
    cfg = load_settings(overrides={f"agents.{k}": v for k, v in settings.items()}, environ={}).agents
    backends = {
        "describe": Scripted("d", describe),
        "revise": Scripted("r", revise),
        "summarize": Scripted("s", summarize),
    }
    return CaptionAgents(cfg, backends=backends), backends


LONG = " ".join(f"Sentence {i} notes atypical glands in a desmoplastic stroma with necrosis." for i in range(10))


def test_loop_retries_once_then_records_the_failure():
    asked: list[str] = []

    def describe(request, sampling):
        key = request.image.decode()
        asked.append(key)
        if key == "bad":
            return ChatReply("I'm sorry, I can't help with that.")
        if key == "flaky" and asked.count("flaky") == 1:  # invalid on the first try, valid on the re-ask
            return ChatReply("")
        return ChatReply(f"Glands of adenocarcinoma in {key}.")

    agents, backends = _agents(describe, lambda r, s: ChatReply("UNCHANGED"), lambda r, s: ChatReply("Adenocarcinoma."))
    result = agents.run({"good": b"good", "bad": b"bad", "flaky": b"flaky"})
    assert set(result.captions) == {"good", "flaky"}
    assert [(f.key, f.stage, f.reason) for f in result.failures] == [("bad", "describe", "refusal")]
    assert len(backends["describe"].calls) == 2 and len(backends["describe"].calls[1]) == 2
    assert result.captions["good"].revised_description == result.captions["good"].description
    assert result.captions["good"].revise_changed is False and result.captions["good"].revise_change == 0


def test_a_backend_failure_raises_and_is_never_recorded_as_a_caption_failure():
    def describe(request, sampling):
        if request.image == b"boom":
            raise BackendError("the model server at http://gpu-node:8000/v1 failed: HTTP 503, after 4 attempts")
        return ChatReply("Glands of adenocarcinoma.")

    agents, backends = _agents(describe, lambda r, s: ChatReply("UNCHANGED"), lambda r, s: ChatReply("Glands."))
    with pytest.raises(BackendError, match="gpu-node:8000"):
        agents.run({"a": b"a", "b": b"boom"})
    assert backends["revise"].calls == [] and backends["summarize"].calls == []


def test_revise_change_is_measured():
    agents, _ = _agents(
        lambda r, s: ChatReply("Glands of adenocarcinoma with necrosis and mucin."),
        lambda r, s: ChatReply("Glands of adenocarcinoma with necrosis."),
        lambda r, s: ChatReply("Adenocarcinoma."),
    )
    caption = agents.run({"a": b"a"}).captions["a"]
    assert caption.revise_changed is True and 0 < caption.revise_change < 0.5


def test_over_budget_summary_is_re_asked_with_its_count_then_trimmed():
    seen = []

    def summarize(request, sampling):
        seen.append(request.before_image)
        return ChatReply(LONG)  # never shortens

    agents, backends = _agents(
        lambda r, s: ChatReply("Glands."), lambda r, s: ChatReply("UNCHANGED"), summarize, shorten_attempts=2
    )
    caption = agents.run({"a": b"a"}).captions["a"]
    assert len(backends["summarize"].calls) == 3  # the summary, then two re-asks
    assert f"has {clip_token_count(LONG)} CLIP tokens" in seen[1] and "limit is 77" in seen[1]
    assert caption.caption_trimmed and caption.caption_tokens <= 77 and caption.shorten_rounds == 2


def test_a_re_ask_that_fits_is_taken_untrimmed():
    def summarize(request, sampling):
        return ChatReply("Adenocarcinoma with necrosis." if "CLIP tokens, but" in request.before_image else LONG)

    agents, _ = _agents(lambda r, s: ChatReply("Glands."), lambda r, s: ChatReply("UNCHANGED"), summarize)
    caption = agents.run({"a": b"a"}).captions["a"]
    assert caption.caption == "Adenocarcinoma with necrosis." and not caption.caption_trimmed


def test_agents_hash_follows_models_prompts_and_sampling(tiny_models):
    cache, _ = tiny_models
    base = {"agents.model_cache": str(cache)}
    a = CaptionAgents(load_settings(overrides=base, environ={}).agents)
    b = CaptionAgents(load_settings(overrides=base, environ={}).agents)
    c = CaptionAgents(load_settings(overrides={**base, "agents.summarize.temperature": 0.9}, environ={}).agents)
    assert a.agents_hash() == b.agents_hash() != c.agents_hash()
    d = CaptionAgents(load_settings(overrides={**base, "agents.describe.max_words": 50}, environ={}).agents)
    assert d.agents_hash() not in (a.agents_hash(), c.agents_hash())  # max_words changes which replies pass
    assert a.provenance()["agents_hash"] == a.agents_hash()
    assert all("tiny-v" in a.identity[role] for role in ("describe", "revise", "summarize"))
    assert a.random_weights and a.provenance()["roles"]["describe"]["model"].endswith("(random weights)")
    assert json.dumps(a.provenance())  # serialisable provenance


def test_tiny_models_caption_real_patches_within_budget(tiny_models, cmu_rgb):
    cache, _ = tiny_models
    agents = CaptionAgents(load_settings(overrides={"agents.model_cache": str(cache)}, environ={}).agents)
    images = {}
    for i in range(4):
        out = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(cmu_rgb[i * 500 : i * 500 + 224, 800:1024])).save(out, format="JPEG")
        images[f"p{i}"] = out.getvalue()
    result = agents.run(images)
    assert len(result.captions) + len(result.failures) == 4
    assert all(c.caption_tokens <= 77 for c in result.captions.values())
    assert set(result.seconds) == {"describe", "revise", "summarize"}


def test_settings_default_to_offline_models():
    agents = AgentsSettings()
    assert agents.describe.model is None and agents.describe.backend == "transformers"
    assert agents.max_caption_tokens == 77 and agents.slides_per_task == 4
