"""A stage's models leave the process when the stage ends (issue 17, point 13): the factory runs caption, then
train-clip in one process, and training must not start beside a caption model still on the GPU. Checked on CPU with
weak references (nothing of a finished stage stays referenced), and on a GPU, where there is one, by its memory."""

import gc
import shutil
import weakref

import pytest

import agents.backends
from agents.backends import backend_for
from agents.pipeline import CaptionAgents
from pathgen.settings import load_settings

SHORT = {f"agents.{role}.max_new_tokens": 16 for role in ("describe", "revise", "summarize")}


def _recording_builds(monkeypatch) -> list[weakref.ref]:
    """Weak references to every backend the cache builds, and to its model (the real builder does the building)."""
    built: list[weakref.ref] = []
    build = agents.backends._build
    monkeypatch.setattr(agents.backends, "_backends", {})  # none cached by earlier tests: this test's alone

    def recorded(*args, **kwargs):
        backend = build(*args, **kwargs)
        built.extend([weakref.ref(backend), weakref.ref(backend.model)])
        return backend

    monkeypatch.setattr(agents.backends, "_build", recorded)
    return built


def test_released_backends_leave_nothing_referenced_even_where_their_agents_live_on(tiny_models, monkeypatch):
    from agents.backends import release_backends

    built = _recording_builds(monkeypatch)
    cache, _ = tiny_models
    settings = load_settings(overrides={"agents.model_cache": str(cache)}, environ={})
    caption_agents = CaptionAgents(settings.agents)  # an object of a finished stage that someone still holds
    assert built and all(ref() is not None for ref in built)
    assert release_backends() == 2  # the tiny VLM (describe, revise) and LM (summarize)
    gc.collect()
    models = built[1::2]
    assert all(ref() is None for ref in models)
    with pytest.raises(RuntimeError, match="released at the end of its stage"):
        caption_agents.run({"p": b"jpeg"})
    del caption_agents
    gc.collect()
    assert all(ref() is None for ref in built)
    again = backend_for(settings.agents.summarize, settings.agents, settings.retries, False, "tiny-lm")
    assert again.model is not None  # a later stage loads anew
    release_backends()


def test_release_models_drops_the_clip_models_too(monkeypatch):
    from flows.factory import release_models
    from tasks.clip.spec import TINY_RANDOM, ModelSpec
    from tasks.selection.embedding import load_clip_model

    # Models cached, and perhaps still held, by earlier tests are not this test's: its own, loaded here, only.
    monkeypatch.setattr(agents.backends, "_backends", {})
    monkeypatch.setattr("tasks.selection.embedding._models", {})

    model = weakref.ref(load_clip_model(ModelSpec(TINY_RANDOM), "cpu").model)
    gc.collect()
    assert model() is not None
    release_models()
    assert model() is None


@pytest.mark.prefect
def test_the_factorys_caption_stage_leaves_no_model_behind(
    prefect_api, extracted_store, tiny_models, tmp_path, monkeypatch
):
    from flows.factory import _run_stage

    built = _recording_builds(monkeypatch)
    store = tmp_path / "store"
    shutil.copytree(extracted_store, store)
    overrides = {"agents.model_cache": str(tiny_models[0]), **SHORT}
    common = {"store": str(store), "config": None, "overrides": overrides}
    settings = load_settings(overrides={"store": str(store), **overrides}, environ={})
    row = _run_stage("caption", [], common, 1, [], settings)
    assert row["state"] == "Completed" and row["ok"] == 1, row
    assert len(built) == 4  # two backends, each with its model, built by the stage
    gc.collect()
    assert [ref() for ref in built] == [None] * 4


@pytest.mark.skipif("not __import__('torch').cuda.is_available()", reason="needs a GPU")
def test_on_a_gpu_the_memory_of_released_backends_returns(tiny_models):
    import torch

    from agents.backends import release_backends

    cache, _ = tiny_models
    settings = load_settings(overrides={"agents.model_cache": str(cache), "agents.device": "cuda"}, environ={})
    before = torch.cuda.memory_allocated()
    CaptionAgents(settings.agents)
    assert torch.cuda.memory_allocated() > before
    release_backends()
    assert torch.cuda.memory_allocated() == before
