"""Hashes that mean what they say: a slide's extraction hash follows its own settings and the contents of the files
the settings name, and nothing of other slides; agents_hash follows every reply-changing setting and the model's
identity as loaded, and the backend cache is keyed by the same."""

import json
import os

import numpy as np
import pytest

from agents.backends import backend_for
from agents.identity import agents_hash, identities
from pathgen.settings import load_settings
from tasks.slides.extract import extract_slide
from tasks.slides.hashing import slide_extraction_hash
from tasks.slides.sources import SlideRef, resolve_sources
from tasks.store.objects import Store

from .conftest import CMU, write_tiff_slide


def _settings(**overrides):
    return load_settings(overrides=overrides, environ={})


A = SlideRef("slide-a", "/data/slide-a.svs", "file", project="TCGA-BRCA")
B = SlideRef("slide-b", "/data/slide-b.svs", "file", project="TCGA-LUAD")


def test_another_slides_override_project_or_findings_leave_a_slides_hash_alone(tmp_path):
    base = _settings()
    assert slide_extraction_hash(A, base) == slide_extraction_hash(A, _settings(store="s3://elsewhere/run"))
    for change in (
        {"slides.mpp_overrides": {"slide-b": 0.25}},
        {"slides.projects": {"slide-b": "TCGA-SKCM"}},
        {"extract.concurrency": 7, "embedding.device": "cpu", "embedding.batch_size": 3},
    ):
        assert slide_extraction_hash(A, _settings(**change)) == slide_extraction_hash(A, base), change
    assert slide_extraction_hash(B, _settings(**{"slides.mpp_overrides": {"slide-b": 0.25}})) != (
        slide_extraction_hash(B, base)
    )
    assert slide_extraction_hash(A, _settings(**{"slides.mpp_overrides": {"slide-a.svs": 0.25}})) != (
        slide_extraction_hash(A, base)
    )  # an override by file name applies to the slide too
    findings = tmp_path / "findings.json"
    findings.write_text(json.dumps({"slide-b": ["Tumour cells in sheets."]}))
    with_findings = _settings(**{"selection.findings_file": str(findings)})
    assert slide_extraction_hash(A, with_findings) == slide_extraction_hash(A, base)
    assert slide_extraction_hash(B, with_findings) != slide_extraction_hash(B, base)
    findings.write_text(json.dumps({"slide-b": ["Tumour cells in sheets."], "slide-a": ["Fat."]}))
    assert slide_extraction_hash(A, with_findings) != slide_extraction_hash(A, base)


def test_file_contents_not_paths_are_hashed(tmp_path):
    prompts = tmp_path / "prompts.yaml"
    prompts.write_text("projects:\n  TCGA-BRCA: [Invasive ductal carcinoma with tubule formation.]\n")
    settings = _settings(**{"selection.prompts_file": str(prompts)})
    first = slide_extraction_hash(A, settings)
    assert slide_extraction_hash(B, settings) == slide_extraction_hash(B, _settings())  # not its project
    prompts.write_text("projects:\n  TCGA-BRCA: [Lobular carcinoma in single files.]\n")
    os.utime(prompts, ns=(1, 1))  # a new stamp, as an edit gives
    assert slide_extraction_hash(A, settings) != first

    checkpoint = tmp_path / "pathgen-clip.pt"
    checkpoint.write_bytes(b"weights v1")
    with_checkpoint = _settings(**{"embedding.model": "ViT-B-16", "embedding.pretrained": str(checkpoint)})
    before = slide_extraction_hash(A, with_checkpoint)
    checkpoint.write_bytes(b"weights v2")
    os.utime(checkpoint, ns=(2, 2))
    assert slide_extraction_hash(A, with_checkpoint) != before
    random_method = _settings(**{"selection.method": "random", "embedding.model": "ViT-B-16"})
    assert slide_extraction_hash(A, random_method) == slide_extraction_hash(
        A, _settings(**{"selection.method": "random"})
    )


def test_an_mpp_override_for_one_slide_re_extracts_that_slide_alone(tmp_path, cmu_rgb):
    folder = tmp_path / "slides"
    folder.mkdir()
    write_tiff_slide(folder / "crop.tif", np.ascontiguousarray(cmu_rgb[:1536, :1536]), mpp=0.5)
    (folder / CMU.name).symlink_to(CMU)
    base = {"store": str(tmp_path / "store"), "selection.method": "random", "selection.max_per_slide": 4}
    base["patch.patch_px"] = 224

    def run(**extra):
        settings = _settings(**base, **extra)
        store = Store(settings.store)
        return {r.slide_id: extract_slide(r, settings, store).status for r in resolve_sources([str(folder)], settings)}

    assert run() == {"crop": "ok", CMU.stem: "ok"}
    assert run() == {"crop": "skipped", CMU.stem: "skipped"}
    record = tmp_path / "store" / "slides" / "crop" / "slide.json"
    before = json.loads(record.read_text())["extraction_hash"]
    assert run(**{"slides.mpp_overrides": {"crop": 0.5}}) == {"crop": "ok", CMU.stem: "skipped"}
    after = json.loads(record.read_text())
    assert after["extraction_hash"] != before and after["mpp_source"] == "mpp_overrides"


def test_agents_hash_follows_reply_changing_settings_and_model_identity(tmp_path):
    base = _settings()
    h = agents_hash(base.agents, identities(base.agents, base.retries))

    def hashed(**overrides):
        s = _settings(**overrides)
        return agents_hash(s.agents, identities(s.agents, s.retries))

    assert hashed(**{"agents.concurrency": 4, "agents.openai_timeout_seconds": 5}) == h  # no reply changes
    assert hashed(**{"agents.describe.max_words": 50}) != h
    assert hashed(**{"agents.batch_size": 4}) == h  # transformers: each request samples with its own seed
    folder = tmp_path / "my-vlm"
    folder.mkdir()
    (folder / "config.json").write_text('{"v": 1}')
    model = {"agents.describe.model": str(folder), "agents.describe.backend": "vllm"}
    first = hashed(**model)
    assert hashed(**model, **{"agents.max_image_pixels": 448 * 448}) != first
    assert hashed(**model, **{"agents.vllm_max_model_len": 8192}) != first
    (folder / "config.json").write_text('{"v": 2}')
    os.utime(folder / "config.json", ns=(3, 3))
    assert hashed(**model) != first  # same path, other weights: another model


def test_the_backend_cache_never_hands_out_a_backend_built_for_other_settings(tiny_models):
    cache, _ = tiny_models
    s = _settings(**{"agents.model_cache": str(cache)})
    role = s.agents.summarize
    one = backend_for(role, s.agents, s.retries, False, "tiny-lm")
    assert backend_for(role, s.agents, s.retries, False, "tiny-lm") is one
    other = _settings(**{"agents.model_cache": str(cache), "agents.batch_size": 2})
    assert backend_for(role, other.agents, other.retries, False, "tiny-lm") is not one
    assert backend_for(role, s.agents, s.retries, False, "tiny-lm@other") is not one


@pytest.mark.parametrize("key", ["describe", "summarize"])
def test_identity_names_random_weights(key):
    s = _settings()
    assert "random weights" in identities(s.agents, s.retries)[key]


def test_a_quickgelu_twin_changes_exactly_the_hashes_of_the_openai_specs(tmp_path):
    """OpenAI's tags build the name's -quickgelu twin: an identity of the twin, the same as naming it; every other spec
    hashes the settings as they were given."""
    from pathgen.settings import ClipSettings
    from tasks.clip.stages import run_name
    from tasks.features.encoder import encoder_identity
    from tasks.features.hashing import features_hash
    from tasks.slides.hashing import _embedding_identity

    def embedding(model, pretrained):
        return _settings(**{"embedding.model": model, "embedding.pretrained": pretrained})

    assert slide_extraction_hash(A, embedding("ViT-L-14-336", "openai")) == (
        slide_extraction_hash(A, embedding("ViT-L-14-336-quickgelu", "openai"))
    )
    checkpoint = tmp_path / "pathgen-clip.pt"
    checkpoint.write_bytes(b"weights")
    for model, pretrained in ((None, None), ("tiny-random", None), ("ViT-B-16", "laion2b_s34b_b88k"),
                              ("ViT-B-16", str(checkpoint))):  # fmt: skip
        identity = _embedding_identity(embedding(model, pretrained))
        assert identity["model"] == model, (model, pretrained)

    def run(**clip):
        return run_name(ClipSettings(**clip), ["digest"])

    assert run(model="ViT-B-16", pretrained="openai") == run(pretrained="openai")
    assert run(pretrained="openai") == run(model="ViT-B-16-quickgelu", pretrained="openai")
    assert run(model="ViT-B-16", pretrained="laion2b_s34b_b88k") != run(
        model="ViT-B-16-quickgelu", pretrained="laion2b_s34b_b88k"
    )  # a GELU-trained tag: the plain name stays the plain model

    settings = _settings()
    plain, twin = encoder_identity("ViT-B-16:openai"), encoder_identity("ViT-B-16-quickgelu:openai")
    assert plain["name"] == "ViT-B-16-quickgelu" and features_hash(settings, plain) == features_hash(settings, twin)
    assert encoder_identity("ViT-B-16:laion2b_s34b_b88k")["name"] == "ViT-B-16"


def test_non_square_pixels_add_a_key_and_square_ones_keep_their_hash():
    """Non-square pixels are read per axis (not at their mean as before): their hash changes, no other does."""
    base = _settings()
    plain = slide_extraction_hash(A, base)
    assert slide_extraction_hash(A, base, None, (0.25, 0.25)) == plain
    assert slide_extraction_hash(A, base, None, 0.25) == plain
    assert slide_extraction_hash(A, base, None, (0.25, 0.5)) != plain
