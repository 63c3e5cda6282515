"""Random weights are decided by what was loaded, not by a model's name, and are visible where people look: the
agents' provenance, pair records and logs; the PathGen JSON export and its provenance sidecar; thumbnails,
selection pictures and contact sheets (a red RANDOM WEIGHTS band)."""

import io
import json
import logging
import shutil

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from agents.backends import folder_random_weights
from agents.backends.hf import TransformersBackend
from agents.tiny import RANDOM_MARKER, TINY_LM, TINY_VLM
from pathgen.settings import load_settings

from .conftest import CMU


def _strip_marker(folder):
    config = folder / "config.json"
    data = json.loads(config.read_text())
    data.pop(RANDOM_MARKER, None)
    config.write_text(json.dumps(data))


def _copy(src, dst, weights=True, marker=True):
    shutil.copytree(src, dst)
    if not weights:
        for f in [*dst.glob("*.safetensors"), *dst.glob("*.bin")]:
            f.unlink()
    if not marker:
        _strip_marker(dst)
    return dst


def _is_red(pixels: np.ndarray) -> np.ndarray:
    pixels = pixels.astype(int)
    return (pixels[..., 0] > 180) & (pixels[..., 1] < 60) & (pixels[..., 2] < 60)


# -- point 2: a named model without weights is random weights -------------------------------------------------


def test_named_open_clip_config_without_pretrained_is_random_in_slide_json(tmp_path):
    from tasks.slides.extract import extract_slide, slide_json_key
    from tasks.slides.sources import resolve_sources
    from tasks.store.objects import Store

    overrides = {"store": str(tmp_path / "store"), "patch.patch_px": 224, "selection.max_per_slide": 6}
    settings = load_settings(overrides={**overrides, "embedding.model": "tiny-random"}, environ={})
    store = Store(settings.store)
    outcome = extract_slide(resolve_sources([str(CMU)], settings)[0], settings, store)
    assert outcome.status == "ok", outcome.error
    record = store.read_json(slide_json_key(CMU.stem))
    assert record["selection"]["embedding"]["model"] == "tiny-random"
    assert record["selection"]["embedding"]["random_weights"] is True and record["random_weights"] is True


def test_a_folder_with_a_config_but_no_weight_files_is_random_weights(tiny_models, tmp_path):
    _, paths = tiny_models
    folder = _copy(paths[TINY_LM], tmp_path / "pathology-lm", weights=False, marker=False)
    assert "no weight files" in folder_random_weights(str(folder))
    backend = TransformersBackend(str(folder), "cpu")  # no word from the caller: decided by what was loaded
    assert backend.random_weights is True and "no weight files" in backend.random_reason
    again = TransformersBackend(str(folder), "cpu")  # built seeded: the same random model on every worker
    for a, b in zip(backend.model.parameters(), again.model.parameters(), strict=True):
        assert np.array_equal(a.detach().numpy(), b.detach().numpy())


def test_weight_files_missing_most_parameters_are_random_weights(tiny_models, tmp_path):
    from safetensors.torch import load_file, save_file

    _, paths = tiny_models
    folder = _copy(paths[TINY_LM], tmp_path / "half-saved", marker=False)
    weights = load_file(folder / "model.safetensors")
    save_file({k: v for k, v in weights.items() if "norm" in k}, folder / "model.safetensors", {"format": "pt"})
    backend = TransformersBackend(str(folder), "cpu")
    assert backend.random_weights is True and "were not in its weight files" in backend.random_reason


def test_a_tiny_model_under_another_name_is_still_random_and_loaded_weights_are_not(tiny_models, tmp_path):
    _, paths = tiny_models
    renamed = _copy(paths[TINY_VLM], tmp_path / "PathologyVLM-7B")
    assert TransformersBackend(str(renamed), "cpu").random_weights is True  # its config says so
    assert folder_random_weights(str(renamed)) is not None  # what the vLLM backend asks
    # Weights that were saved and loaded whole, with nothing saying they are random: not random weights.
    loaded = _copy(paths[TINY_LM], tmp_path / "trained-lm", marker=False)
    backend = TransformersBackend(str(loaded), "cpu")
    assert backend.random_weights is False and backend.random_reason is None
    assert folder_random_weights(str(loaded)) is None


def test_caption_agents_and_pair_records_declare_named_models_without_weights(
    tiny_models, extracted_store, tmp_path, caplog
):
    from agents.identity import agents_hash, identities
    from agents.pipeline import CaptionAgents
    from tasks.captions.caption import caption_slides

    _, paths = tiny_models
    vlm = _copy(paths[TINY_VLM], tmp_path / "models" / "PathologyVLM", marker=False)
    lm = _copy(paths[TINY_LM], tmp_path / "models" / "Summarizer", weights=False, marker=False)
    store = tmp_path / "store"
    shutil.copytree(extracted_store, store)
    overrides = {
        "store": str(store),
        "agents.describe.model": str(vlm),
        "agents.revise.model": str(vlm),
        "agents.summarize.model": str(lm),
        "agents.summarize.max_new_tokens": 24,
    }
    settings = load_settings(overrides=overrides, environ={})
    with caplog.at_level(logging.WARNING, logger="pathgen.agents"):
        agents = CaptionAgents(settings.agents, settings.retries)
    assert agents.random_weights is True
    provenance = agents.provenance()
    assert provenance["random_weights"] is True
    assert provenance["roles"]["summarize"]["random_weights"] is True
    assert provenance["roles"]["summarize"]["model"] == f"{lm} (random weights)"
    assert provenance["roles"]["describe"]["random_weights"] is False
    assert provenance["roles"]["describe"]["model"] == str(vlm)
    assert any("RANDOM-WEIGHT" in r.getMessage() and str(lm) in r.getMessage() for r in caplog.records)

    hash_ = agents_hash(settings.agents, identities(settings.agents, settings.retries))
    outcomes = caption_slides([CMU.stem], settings, hash_)
    assert outcomes[0].status == "ok" and outcomes[0].random_weights is True, outcomes
    shard = store / "pairs" / hash_ / f"{CMU.stem}.parquet"
    pairs = pq.read_table(shard)
    if pairs.num_rows:
        assert set(pairs["random_weights"].to_pylist()) == {True}
        assert set(pairs["summarize_model"].to_pylist()) == {f"{lm} (random weights)"}
    meta = {k.decode(): v.decode() for k, v in pq.read_schema(shard).metadata.items()}
    assert json.loads(meta["pathgen.provenance"])["random_weights"] is True


# -- point 12: random weights visible in exports and pictures -------------------------------------------------


def test_pathgen_json_export_marks_random_weight_records_and_writes_a_provenance_sidecar(captioned_store, tmp_path):
    from tasks.captions.export import export_pathgen_json, provenance_path
    from tasks.store.objects import Store

    out = tmp_path / "pairs.json"
    count = export_pathgen_json(Store(str(captioned_store)), out)
    records = json.loads(out.read_text())
    assert isinstance(records, list) and len(records) == count > 0  # still a PathGen-1.6M list
    assert all(r["random_weights"] is True for r in records)
    assert {"wsi_id", "position", "caption"} <= set(records[0])
    sidecar = json.loads(provenance_path(out).read_text())
    assert provenance_path(out).name == "pairs.json.provenance.json"
    (hash_,) = [p.name for p in (captioned_store / "pairs").iterdir()]
    assert sidecar["agents_hash"] == hash_ and sidecar["random_weights"] is True
    assert sidecar["records"] == count and sidecar["random_weight_records"] == count
    assert sidecar["models"]["describe"].endswith("(random weights)") and set(sidecar["models"]) == {
        "describe",
        "revise",
        "summarize",
    }


def test_pathgen_json_export_leaves_trained_weight_records_unmarked(captioned_store, tmp_path):
    import pyarrow as pa

    from tasks.captions.export import export_pathgen_json, provenance_path
    from tasks.store.objects import Store

    store = tmp_path / "store"
    shutil.copytree(captioned_store, store)
    for shard in (store / "pairs").rglob("*.parquet"):
        table = pq.read_table(shard)
        index = table.schema.get_field_index("random_weights")
        table = table.set_column(index, table.schema.field(index), pa.array([False] * table.num_rows))
        provenance = json.loads(table.schema.metadata[b"pathgen.provenance"])
        provenance["random_weights"] = False
        table = table.replace_schema_metadata(
            {**table.schema.metadata, b"pathgen.provenance": json.dumps(provenance).encode()}
        )
        pq.write_table(table, shard)
    out = tmp_path / "pairs.json"
    export_pathgen_json(Store(str(store)), out)
    assert all("random_weights" not in r for r in json.loads(out.read_text()))
    assert json.loads(provenance_path(out).read_text())["random_weights"] is False


def test_thumbnail_and_selection_pictures_carry_a_random_weights_band():
    from tasks.slides.passes import KeptPatch
    from tasks.slides.pictures import draw_selection, draw_thumbnail

    overview = np.full((300, 400, 3), 235, np.uint8)
    overview[100:200, 100:300] = (180, 120, 200)  # pink tissue
    mask = np.zeros((300, 400), bool)
    mask[100:200, 100:300] = True
    boxes = [(120, 120, 40, 40)]
    for draw in (
        lambda flag: draw_thumbnail(overview, mask, 1.0, boxes, 400, random_weights=flag),
        lambda flag: draw_selection(overview, 1.0, [KeptPatch(boxes[0], ("cluster:1",), 1)], 400, random_weights=flag),
    ):
        plain, marked = draw(False), draw(True)
        assert _is_red(plain).mean() < 0.01  # nothing red without the flag
        band = marked.shape[0] - plain.shape[0]
        assert band >= 14 and _is_red(marked[:band]).mean() > 0.6  # a red band on top...
        assert (marked[:band] == 255).all(axis=-1).any()  # ...with white writing on it
        assert np.array_equal(marked[band:], plain)  # the slide itself is not covered


def test_contact_sheets_of_random_weight_patches_and_pairs_carry_the_band(captioned_store, tmp_path, capsys):
    from pathgen.cli.inspect import inspect_url
    from tasks.contact_sheet import draw_contact_sheet

    store_sheet = tmp_path / "store.png"
    assert inspect_url(str(captioned_store), out=str(store_sheet), samples=4) == 0
    printed = capsys.readouterr().out
    assert "RANDOM WEIGHTS: patches picked with random-weight embeddings" in printed
    assert "captioned with RANDOM-WEIGHT models" in printed
    (pair_shard,) = (captioned_store / "pairs").rglob("*.parquet")
    pair_sheet = tmp_path / "pairs.png"
    assert inspect_url(str(pair_shard), out=str(pair_sheet), samples=4) == 0
    assert "captions from random-weight models" in capsys.readouterr().out
    for sheet in (store_sheet, pair_sheet):
        pixels = np.asarray(Image.open(sheet).convert("RGB"))
        assert _is_red(pixels[:10]).mean() > 0.6

    tile = io.BytesIO()
    Image.new("RGB", (64, 64), (230, 200, 220)).save(tile, format="JPEG")
    plain = tmp_path / "plain.png"
    draw_contact_sheet([tile.getvalue()], ["slide 0,0"], str(plain))
    assert _is_red(np.asarray(Image.open(plain).convert("RGB"))).mean() == 0
