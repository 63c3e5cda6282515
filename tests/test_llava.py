"""PathGen-LLaVA on CPU with tiny random-weight models built here: the open_clip -> CLIPVisionModel conversion
checked on the same pixels, assistant-only labels, stage 1 training only the projector, the loss falling on a
repeated batch, LoRA stage 2 resuming after an interruption to the same weights, the saved folder loading with the
Auto classes and generating, and the flow (and ``pathgen train-llava``) skipping finished stages."""

from __future__ import annotations

import json
import logging
import types
from pathlib import Path

import pytest

from . import kather

LOG = logging.getLogger("test.llava")
QUESTION = "<image>\nWhat tissue is shown?"


def _write_folder(root: Path, per_class: int = 1) -> Path:
    """A LLaVA data folder from the shared Kather tiles: a caption per tile (stage 1), a two-turn conversation per
    tile (stage 2), and one text-only conversation (LLaVA's data has those too)."""
    from PIL import Image

    names = json.loads(kather.CLASSES.read_text())
    (root / "images").mkdir(parents=True)
    stage1, stage2 = [], []
    for folder in sorted(names):
        for i, tile in enumerate(sorted((kather.KATHER / folder).glob("*.tif"))[:per_class]):
            image = f"images/{folder}-{i}.jpg"
            Image.open(tile).convert("RGB").save(root / image, quality=90)
            label = names[folder][0]
            stage1.append(
                {
                    "id": f"{folder}-{i}",
                    "image": image,
                    "conversations": [
                        {"from": "human", "value": "<image>\nDescribe this H&E image briefly."},
                        {"from": "gpt", "value": f"An H&E image of {label}."},
                    ],
                }
            )
            stage2.append(
                {
                    "id": f"{folder}-{i}-qa",
                    "image": image,
                    "conversations": [
                        {"from": "human", "value": QUESTION},
                        {"from": "gpt", "value": f"{label}."},
                        {"from": "human", "value": "Is it tumor?"},
                        {"from": "gpt", "value": "yes" if "TUMOR" in folder else "no"},
                    ],
                }
            )
    stage2.append(
        {
            "id": "text-only",
            "conversations": [{"from": "human", "value": "What is H&E?"}, {"from": "gpt", "value": "A stain."}],
        }
    )
    (root / "stage1.json").write_text(json.dumps(stage1))
    (root / "stage2.json").write_text(json.dumps(stage2))
    return root


@pytest.fixture(scope="module")
def llava_data(tmp_path_factory) -> Path:
    return _write_folder(tmp_path_factory.mktemp("llava") / "data")


def _settings(root: Path, cache: Path, **more):
    from pathgen.settings import load_settings

    overrides = {
        "store": str(root / "store"),
        "llava.work_dir": str(root / "work"),
        "agents.model_cache": str(cache),
        "llava.batch_size": 4,
        "llava.workers": 0,
        "llava.max_steps": 3,
        "llava.lr_stage1": 1e-2,
        "llava.lr_stage2": 1e-3,
        "llava.lora_r": 4,
        "llava.lora_alpha": 8,
        "llava.seed": 0,
    }
    return load_settings(overrides=overrides | more, environ={})


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_models) -> Path:
    """The untrained PathGen-LLaVA: the tiny open_clip tower converted, a new projector, the tiny random LM."""
    from tasks.llava.stages import build_base
    from tasks.llava.vision import vision_source

    root = tmp_path_factory.mktemp("base")
    folder = root / "base"
    build_base(_settings(root, tiny_models[0]), vision_source(None), folder, LOG)
    return folder


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def _parts(weights: dict, part: str) -> dict:
    return {k: v for k, v in weights.items() if f".{part}." in f".{k}"}


def _train(settings, stage: str, data: Path, start: Path, run: str = "test"):
    from tasks.llava.stages import stage_plan, train_stage

    return train_stage(stage_plan(settings, run, stage, data, start, True), LOG)


def test_the_open_clip_tower_converts_to_a_clip_vision_model_with_the_same_features():
    import open_clip
    import torch
    from PIL import Image

    from tasks.clip.spec import TINY_RANDOM, register_model_configs
    from tasks.llava.vision import TOLERANCE, check_conversion, convert_visual, image_processor_of, vision_config

    register_model_configs()
    images = [Image.open(p).convert("RGB") for p in sorted(kather.KATHER.glob("*/*.tif"))[::3]]
    for quick_gelu in (False, True):  # tiny-random uses GELU; OpenAI's towers QuickGELU
        torch.manual_seed(1)
        model, _, preprocess = open_clip.create_model_and_transforms(TINY_RANDOM, force_quick_gelu=quick_gelu)
        visual = model.eval().visual
        converted = convert_visual(visual)
        assert converted.config.hidden_act == ("quick_gelu" if quick_gelu else "gelu")
        same_pixels = check_conversion(visual, converted, torch.stack([preprocess(i) for i in images]))
        processor = image_processor_of(visual.preprocess_cfg)
        own_pixels = processor(images, return_tensors="pt")["pixel_values"]
        pipelines = check_conversion(visual, converted, own_pixels)  # each model through its own preprocessing
        print(f"\nconversion quick_gelu={quick_gelu}: same pixels {same_pixels}; own preprocessing {pipelines}")
        assert max(same_pixels.values()) < TOLERANCE and set(same_pixels) == {"pooled", "embedding"}
        assert own_pixels.shape[-2:] == (64, 64)
    visual.pool_type = "avg"
    with pytest.raises(ValueError, match="pooling other than the class token"):
        vision_config(visual)


def test_an_unset_tower_is_the_newest_pathgen_clip_checkpoint_of_the_store(tmp_path):
    import open_clip
    import torch

    from flows.train_llava import default_vision
    from tasks.clip.spec import register_model_configs
    from tasks.llava.vision import load_vision_tower, vision_source
    from tasks.store.objects import Store

    register_model_configs()
    torch.manual_seed(5)
    clip = open_clip.create_model("tiny-random")
    stage = tmp_path / "store" / "models" / "clip" / "clip-x" / "stage1"
    (stage / "checkpoints").mkdir(parents=True)
    torch.save({"epoch": 1, "state_dict": clip.state_dict()}, stage / "checkpoints" / "epoch_1.pt")
    (stage / "params.txt").write_text("model: tiny-random\n")  # as open_clip_train writes it
    assert default_vision(Store(str(tmp_path / "empty"))) is None  # then tiny-random, random weights
    source = vision_source(default_vision(Store(str(tmp_path / "store"))))
    assert source.kind == "open_clip" and source.text.endswith("epoch_1.pt") and not source.random_weights
    tower = load_vision_tower(source)
    loaded = {k.rsplit("embeddings.", 1)[-1]: v for k, v in tower.model.state_dict().items()}
    assert torch.equal(loaded["class_embedding"], clip.visual.class_embedding.detach())


def test_only_the_assistant_tokens_carry_labels(base):
    from tasks.llava.data import IGNORE, Encoder, messages_of
    from tasks.llava.model import chat_template, load_llava, make_processor

    model, processor = load_llava(base)
    tokens = model.config.image_seq_length
    encoder = Encoder(processor, tokens, 512)
    record = {
        "image": "x.jpg",
        "conversations": [
            {"from": "human", "value": QUESTION},
            {"from": "gpt", "value": "tumor epithelium."},
            {"from": "human", "value": "Is it tumor?"},
            {"from": "gpt", "value": "yes"},
        ],
    }
    ids, labels = encoder.encode(messages_of(record))
    image_id = processor.image_token_id
    assert ids.count(image_id) == tokens
    assert all(lab == IGNORE for i, lab in zip(ids, labels, strict=True) if i == image_id)
    learned = [i for i, lab in zip(ids, labels, strict=True) if lab != IGNORE]
    tok = processor.tokenizer
    assert learned == tok("tumor epithelium.<|im_end|>\nyes<|im_end|>\n", add_special_tokens=False)["input_ids"]
    # Without ChatML tokens, LLaVA-1.5's Vicuna format: the answer and EOS are learned, the prompt is not.
    vicuna, end = chat_template(types.SimpleNamespace(get_vocab=dict, bos_token="<s>", eos_token="</s>"))
    tower = types.SimpleNamespace(image_processor=processor.image_processor, patch_size=16, has_cls=True)
    segments = Encoder(make_processor(tower, tok, vicuna), tokens, 512).segments(messages_of(record))
    assert [text for text, target in segments if target] == [" tumor epithelium.</s>", " yes</s>"] and end == "</s>"
    assert segments[0][0].startswith("<s>A chat between") and segments[0][0].endswith("ASSISTANT:")


def test_stage1_trains_only_the_projector_and_the_folder_loads_and_generates(base, llava_data, tiny_models, tmp_path):
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from agents.tiny import RANDOM_MARKER

    settings = _settings(tmp_path, tiny_models[0], **{"llava.max_steps": 4, "llava.batch_size": 2})
    result = _train(settings, "stage1", llava_data, base)
    print(f"\nstage1: {result.steps} steps, loss {result.first_loss:.4f} -> {result.last_loss:.4f}")
    assert result.trained and result.steps == 4 and result.random_weights and result.last_loss < result.first_loss
    before, after = _weights(base), _weights(Path(result.local_model))
    assert set(before) == set(after)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed == set(_parts(before, "multi_modal_projector")), sorted(changed)[:5]
    store = tmp_path / "store" / "models" / "llava" / "test" / "stage1"
    rows = [json.loads(line) for line in (store / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and (store / "stage.json").is_file()
    assert not list(store.glob("checkpoints/step_*/state.json"))  # a finished stage keeps no resume state

    folder = Path(result.local_model)
    assert json.loads((folder / "config.json").read_text())[RANDOM_MARKER] is True
    model = AutoModelForImageTextToText.from_pretrained(str(folder))
    processor = AutoProcessor.from_pretrained(str(folder))
    images = [Image.open(p).convert("RGB") for p in sorted(kather.KATHER.glob("*/*.tif"))[:2]]
    conversations = [
        [
            {
                "role": "user",
                "content": [{"type": "image", "image": image}, {"type": "text", "text": "What tissue is shown?"}],
            }
        ]
        for image in images
    ]
    inputs = processor.apply_chat_template(
        conversations,
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        processor_kwargs={"padding": True},
    )
    out = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert out.shape == (2, inputs["input_ids"].shape[1] + 6)
    assert all(processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True))


def _rank_batches(size: int, batch_size: int, world: int, rank: int, epochs: int) -> list[list[int]]:
    """The micro-batches a rank takes over ``epochs``, drawn by the pieces the trainer uses: the stage's order,
    batched, then dealt out by accelerate (rank r takes batches r, r + world, ...) when there are several ranks."""
    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler

    from tasks.llava.trainer import StageOrder

    order = StageOrder(size, batch_size, world, 0)
    batched = BatchSampler(order, batch_size, drop_last=False)
    shard = BatchSamplerShard(batched, world, rank) if world > 1 else batched  # accelerate shards only then
    batches = []
    for epoch in range(epochs):
        order.set_epoch(epoch)
        batches += list(shard)
    return batches


def test_two_processes_under_torchrun_train_as_one_with_the_same_global_batch(base, tiny_models, tmp_path):
    """llava.devices=2 launches torchrun (two CPU processes, gloo here; one per GPU on a GPU worker): each rank takes
    half of every global batch, parameters, gradients and optimizer states are sharded over the two (FSDP2, for real
    on gloo), and the run matches one process with the same global batch step for step."""
    import torch

    whole = _rank_batches(17, 4, 1, 0, 2)  # one process, global batch 4: the last, short batch of each epoch kept
    ranks = [_rank_batches(17, 2, 2, r, 2) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 8 and len(whole) == 10  # ranks use whole global batches only
    full = [b for b in whole if len(b) == 4]
    assert [sorted(r0 + r1) for r0, r1 in zip(*ranks, strict=True)] == [sorted(b) for b in full]
    assert all(not set(r0) & set(r1) for r0, r1 in zip(*ranks, strict=True))

    data = _write_folder(tmp_path / "data", per_class=2)
    one = _train(_settings(tmp_path / "one", tiny_models[0], **{"llava.batch_size": 4}), "stage1", data, base)
    more = {"llava.batch_size": 2, "llava.devices": 2}
    two = _train(_settings(tmp_path / "two", tiny_models[0], **more), "stage1", data, base)
    print(f"\nstage1, 1 process: loss {one.first_loss:.4f} -> {one.last_loss:.4f}; 2 processes under torchrun: "
          f"{two.first_loss:.4f} -> {two.last_loss:.4f}")  # fmt: skip
    assert one.steps == two.steps == 3
    # Token-weighted over both devices: the same loss as one process, not a mean of per-device means.
    assert abs(one.first_loss - two.first_loss) < 1e-4 and abs(one.last_loss - two.last_loss) < 1e-4
    a, b = _weights(Path(one.local_model)), _weights(Path(two.local_model))
    projector = _parts(a, "multi_modal_projector")
    start = _weights(base)
    moved = [torch.cat([(w[k] - start[k]).flatten() for k in sorted(projector)]) for w in (a, b)]
    similarity = torch.nn.functional.cosine_similarity(*moved, dim=0).item()
    print(f"projector updates, 1 vs 2 processes: cosine similarity {similarity:.4f}")
    assert similarity > 0.999
    assert all(torch.equal(a[k], b[k]) for k in a if k not in projector)  # only the projector trains in stage 1
    stage = tmp_path / "two" / "store" / "models" / "llava" / "test" / "stage1"
    rows = (stage / "metrics.jsonl").read_text()
    assert [json.loads(line)["step"] for line in rows.splitlines()] == [1, 2, 3]  # rank 0 alone writes
    sharding = json.loads((stage / "stage.json").read_text())["sharding"]
    print(f"sharding of the two processes: {sharding}")
    assert sharding | {"local_share": None} == {"strategy": "fsdp", "fsdp_version": 2, "reshard_after_forward": True,
                                                "devices": 2, "local_share": None}  # fmt: skip
    assert 0.4 < sharding["local_share"] < 0.6  # rank 0 held about half of every parameter
    alone = tmp_path / "one" / "store" / "models" / "llava" / "test" / "stage1" / "stage.json"
    assert json.loads(alone.read_text())["sharding"]["strategy"] == "single"


def test_a_batch_without_images_still_gives_the_projector_a_gradient(base, llava_data, tiny_models, tmp_path):
    """Sharded, every device must reduce the same parameters at every step: a batch without images adds a zero that
    depends on the projector, so its gradient is zero rather than missing (two processes, one with an image and one
    without, otherwise mismatch their collectives and die: seen on gloo)."""
    from tasks.llava.data import collate
    from tasks.llava.stages import stage_plan
    from tasks.llava.train import build_trainer
    from tasks.llava.trainer import projector_of

    plan = stage_plan(_settings(tmp_path, tiny_models[0]), "test", "stage2", llava_data, base, True)
    trainer, processor = build_trainer(plan, [], LOG)
    dataset = trainer.train_dataset
    text_only = next(i for i, r in enumerate(dataset.records) if not r.get("image"))
    batch = collate([dataset[text_only]], processor.tokenizer.pad_token_id)
    trainer.compute_loss(trainer.model, batch).backward()
    grads = [p.grad for p in projector_of(trainer.model).parameters()]
    assert grads and all(g is not None and not g.any() for g in grads)


def test_a_step_weights_its_micro_batches_by_their_tokens(base, llava_data, tiny_models, tmp_path):
    """Two conversations with answers of different lengths as one batch, or as two accumulated micro-batches: the
    same loss, the mean over all their assistant tokens (not a mean of per-batch means)."""
    runs = {}
    for name, batch, accumulation in (("batch", 2, 1), ("accumulated", 1, 2)):
        more = {"llava.batch_size": batch, "llava.grad_accum": accumulation, "llava.max_steps": 1,
                "llava.warmup_ratio": 0.0}  # fmt: skip
        runs[name] = _train(_settings(tmp_path / name, tiny_models[0], **more), "stage1", llava_data, base)
    one, two = runs["batch"], runs["accumulated"]
    print(
        f"\none step over two conversations: loss {one.first_loss:.6f} as one batch, {two.first_loss:.6f} accumulated"
    )
    assert abs(one.first_loss - two.first_loss) < 1e-5


def test_the_memory_estimate_fits_the_papers_13b_on_8_a100s_and_a_stage_that_cannot_fit_is_refused(
    base, llava_data, tiny_models, tmp_path
):
    """LLaVA-v1.5-13B, stage 2 in full on 8 x A100-80G sharded (the paper's run) fits; unsharded, or on one GPU, it
    is refused naming what would fit. A stage whose estimate exceeds the device's memory fails before training."""
    from dataclasses import replace

    from tasks.llava import memory
    from tasks.llava.memory import A100_80G, GIB, PAPER_PLAN, estimate, refusal

    paper = memory.paper_estimate()
    print(f"\nthe paper's stage 2: {paper.describe()}")
    shape = memory.paper_shape()
    assert 13.3e9 < shape.total < 13.4e9 and shape.trainable > 0.97 * shape.total  # the tower stays frozen
    states = paper.parameters + paper.gradients + paper.optimizer
    assert states == pytest.approx((4 * shape.total + 12 * shape.trainable) / 8)  # 16 bytes a trained parameter
    assert 50 * GIB < paper.total < A100_80G
    unsharded = refusal(shape, replace(PAPER_PLAN, sharding="none"), A100_80G, "stage2")
    assert unsharded.startswith("stage2 needs about 224") and "set llava.sharding=full_shard (55." in unsharded
    alone = refusal(shape, replace(PAPER_PLAN, devices=1), A100_80G, "stage2")
    assert "llava.devices=4 with llava.sharding=full_shard" in alone and "llava.lora=true" in alone
    assert refusal(shape, PAPER_PLAN, A100_80G, "stage2") is None

    tiny = memory.folder_shape(str(base), "projector")
    plan = replace(PAPER_PLAN, devices=1, precision="fp32", mode="projector", batch_size=4)
    plan = replace(plan, gradient_checkpointing=False)
    between = (estimate(tiny, plan).total + estimate(tiny, replace(plan, batch_size=2)).total) / 2 / GIB
    settings = _settings(tmp_path, tiny_models[0], **{"llava.gpu_memory_gb": between})
    with pytest.raises(
        ValueError,
        match=r"PathGen-LLaVA stage1 needs about .* GiB per device \(projector, fp32, 1 "
        r"device\(s\), unsharded, batch 4 x 2048 tokens.*set llava\.batch_size=2",
    ):
        _train(settings, "stage1", llava_data, base)
    assert not (tmp_path / "store" / "models").exists() and not (tmp_path / "work" / "runs").exists()


def test_the_loss_falls_on_a_repeated_batch(base, tiny_models, tmp_path):
    """Full stage 2 on two conversations, 30 steps at a high learning rate: the model must fit them."""
    full = _write_folder(tmp_path / "full")
    records = json.loads((full / "stage2.json").read_text())[:2]
    (full / "stage2.json").write_text(json.dumps(records))
    settings = _settings(
        tmp_path,
        tiny_models[0],
        **{
            "llava.batch_size": 2,
            "llava.epochs_stage2": 30,
            "llava.max_steps": None,
            "llava.lr_stage2": 3e-3,
            "llava.warmup_ratio": 0.0,
        },
    )
    result = _train(settings, "stage2", full, base)
    print(
        f"\nstage2 (full) on a repeated batch: {result.steps} steps, loss {result.first_loss:.4f} -> "
        f"{result.last_loss:.4f}"
    )
    assert result.steps == 30 and result.last_loss <= 0.5 * result.first_loss


def test_lora_stage2_resumes_after_an_interruption_to_the_same_weights(
    base, llava_data, tiny_models, tmp_path, monkeypatch
):
    import torch

    from tasks.llava.trainer import StageTrainer

    more = {
        "llava.lora": True,
        "llava.lora_dropout": 0.0,
        "llava.save_steps": 2,
        "llava.max_steps": 5,
        "llava.epochs_stage2": 2,
    }
    whole = _train(_settings(tmp_path / "a", tiny_models[0], **more), "stage2", llava_data, base)
    original, calls = StageTrainer.training_step, []

    def dies_at_step_4(self, model, inputs, num_items_in_batch=None):
        calls.append(1)
        if len(calls) == 4:  # one micro-batch a step
            raise RuntimeError("worker lost")
        return original(self, model, inputs, num_items_in_batch)

    settings = _settings(tmp_path / "b", tiny_models[0], **more)
    monkeypatch.setattr(StageTrainer, "training_step", dies_at_step_4)
    with pytest.raises(RuntimeError, match="worker lost"):
        _train(settings, "stage2", llava_data, base)
    checkpoints = tmp_path / "b" / "store" / "models" / "llava" / "test" / "stage2" / "checkpoints"
    assert [p.parent.name for p in checkpoints.glob("*/state.json")] == ["step_0000002"]
    monkeypatch.setattr(StageTrainer, "training_step", original)
    resumed = _train(settings, "stage2", llava_data, base)
    print(
        f"\nstage2 (LoRA): {whole.steps} steps, loss {whole.first_loss:.4f} -> {whole.last_loss:.4f}; "
        f"resumed run {resumed.first_loss:.4f} -> {resumed.last_loss:.4f}"
    )
    assert resumed.steps == whole.steps == 5 and resumed.first_loss == whole.first_loss
    a, b, start = _weights(Path(whole.local_model)), _weights(Path(resumed.local_model)), _weights(base)
    assert set(a) == set(b) == set(start)  # merged: a plain LLaVA folder again, no adapter weights
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    changed = {k for k in a if not torch.equal(a[k], start[k])}
    assert any("self_attn.q_proj" in k and "language_model" in k for k in changed)
    assert not {k for k in changed if "vision_tower" in k or "mlp" in k and "language_model" in k}


def test_stage1_resumes_from_a_checkpoint_of_the_projector_alone_to_the_same_weights(
    base, llava_data, tiny_models, tmp_path, monkeypatch
):
    """Unsharded, a checkpoint holds the trained weights only (stage 1: the projector), under the names a resume
    loads them by; the resumed stage ends with the weights and the loss rows of one that never stopped."""
    import torch
    from safetensors.torch import load_file

    from tasks.llava.trainer import StageTrainer

    more = {"llava.save_steps": 2, "llava.max_steps": 3, "llava.epochs_stage1": 2}
    whole = _train(_settings(tmp_path / "a", tiny_models[0], **more), "stage1", llava_data, base)
    original, calls = StageTrainer.training_step, []

    def dies_at_step_3(self, model, inputs, num_items_in_batch=None):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("worker lost")
        return original(self, model, inputs, num_items_in_batch)

    settings = _settings(tmp_path / "b", tiny_models[0], **more)
    monkeypatch.setattr(StageTrainer, "training_step", dies_at_step_3)
    with pytest.raises(RuntimeError, match="worker lost"):
        _train(settings, "stage1", llava_data, base)
    stage = tmp_path / "b" / "store" / "models" / "llava" / "test" / "stage1"
    saved = load_file(str(stage / "checkpoints" / "step_0000002" / "model.safetensors"))
    assert set(saved) == {f"model.{k}" for k in _parts(_weights(base), "multi_modal_projector")}  # module names
    monkeypatch.setattr(StageTrainer, "training_step", original)
    resumed = _train(settings, "stage1", llava_data, base)
    a, b = _weights(Path(whole.local_model)), _weights(Path(resumed.local_model))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert resumed.steps == whole.steps == 3
    rows = [tmp_path / run / "store" / "models" / "llava" / "test" / "stage1" / "metrics.jsonl" for run in "ab"]
    losses = [[json.loads(line)["loss"] for line in path.read_text().splitlines()] for path in rows]
    assert losses[0] == losses[1] and len(losses[0]) == 3


def _plan(root: Path, **more):
    """A stage plan for the checkpoint bookkeeping alone: nothing trains with it."""
    from tasks.llava.plan import TrainPlan

    fields = dict(run="test", stage="stage2", data="", start="", out=str(root / "stage"), store=str(root / "store"),
                  s3={}, mode="full", lr=1e-3, epochs=1, max_steps=None, batch_size=1, grad_accum=1, max_length=64,
                  warmup_ratio=0.0, weight_decay=0.0, lora_r=4, lora_alpha=8, lora_dropout=0.0, precision="fp32",
                  gradient_checkpointing=False, devices=2, workers=0, save_steps=1, seed=0, random_weights=True,
                  sharding="full_shard")  # fmt: skip
    return TrainPlan(**fields | more)


def test_a_stage_resumes_only_from_a_checkpoint_of_its_own_format_mode_sharding_and_devices(tmp_path, caplog):
    """A checkpoint written before the move onto the Trainer, or with another sharding or number of devices (none of
    them in the run name), cannot be loaded: it is ignored, here and in the store, and the stage resumes from the
    newest one it can load, or starts over."""
    from dataclasses import replace

    from tasks.llava import checkpoints

    plan = _plan(tmp_path)
    store = plan.open_store()
    folder = plan.checkpoint_dir / "checkpoint-2"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_text("step 2")
    checkpoints.commit(plan, store, folder, [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.9}])
    marker = store.read_json(f"{plan.prefix}/checkpoints/step_0000002/state.json")
    assert marker | {"step": None} == {"step": None, "stage": "stage2", "run": "test", "format": "hf-trainer-1",
                                       "mode": "full", "sharding": "full_shard", "devices": 2}  # fmt: skip
    (folder / "state.json").unlink()  # gone here: the store's copy is the one to fetch

    def written(step: int, marker: dict, local: bool = False) -> None:
        if local:
            (plan.checkpoint_dir / f"checkpoint-{step}").mkdir()
            (plan.checkpoint_dir / f"checkpoint-{step}" / "state.json").write_text(json.dumps(marker))
        else:
            store.write_json(f"{plan.prefix}/checkpoints/step_{step:07d}/state.json", marker)

    name = {"stage": "stage2", "run": "test"}
    written(5, {"step": 5, "mode": "full"} | name)  # before the Trainer: trainable.safetensors, optimizer.pt
    written(4, {"step": 4} | name | checkpoints.layout(replace(plan, sharding="none")))  # unsharded trained weights
    written(6, {"step": 6} | name | checkpoints.layout(replace(plan, devices=4)), local=True)  # FSDP over 4
    with caplog.at_level(logging.WARNING, logger="pathgen.llava"):
        newest = checkpoints.fetch_newest(plan, store)
    assert newest == plan.checkpoint_dir / "checkpoint-2" and (newest / "model.safetensors").read_text() == "step 2"
    assert checkpoints.local_checkpoints(plan) == [newest]  # the one over 4 devices is gone from here
    assert checkpoints.resumed_rows(newest) == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.9}]
    ignored = [r.getMessage() for r in caplog.records if "ignoring checkpoint" in r.getMessage()]
    assert len(ignored) == 3 and any("step_0000005" in m and "'format': None" in m for m in ignored)

    unsharded = replace(plan, sharding="none")  # llava.sharding changed: step 4 is the newest it can load
    assert checkpoints.fetch_newest(unsharded, store) == plan.checkpoint_dir / "checkpoint-4"
    assert checkpoints.local_checkpoints(unsharded) == [plan.checkpoint_dir / "checkpoint-4"]
    assert checkpoints.fetch_newest(replace(plan, mode="lora"), store) is None  # nothing fits: starts over


def test_the_flow_trains_both_stages_and_a_rerun_skips_them(prefect_api, llava_data, tiny_models, tmp_path, capsys):
    from flows.train_llava import train_llava_flow
    from pathgen.cli import main

    overrides = {
        "llava.work_dir": str(tmp_path / "work"),
        "agents.model_cache": str(tiny_models[0]),
        "llava.batch_size": 4,
        "llava.workers": 0,
        "llava.max_steps": 2,
    }
    store = tmp_path / "store"
    summary = train_llava_flow(store=str(store), overrides=overrides, data=str(llava_data))
    assert summary["error"] is None and summary["random_weights"]
    assert [(s["stage"], s["status"], s["steps"]) for s in summary["stages"]] == [
        ("stage1", "ok", 2),
        ("stage2", "ok", 2),
    ]
    assert summary["stages"][0]["conversion_max_abs_diff"] < 1e-4
    run = json.loads((store / "models" / "llava" / summary["run"] / "run.json").read_text())
    assert run["vision"] == "tiny-random" and run["random_weights"] and len(run["stages"]) == 2
    assert run["stages"][1]["model"].endswith(f"models/llava/{summary['run']}/stage2/model")

    (llava_data / "provenance.json").write_text(json.dumps({"format": "llava", "random_weights": True}))
    args = ["train-llava", "--data", str(llava_data), "--store", str(store)]
    args += [f"--set={k}={v}" for k, v in overrides.items()]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "written by random-weight models (provenance.json)" in out
    assert "stage1: skipped  2 steps" in out and "stage2: skipped  2 steps" in out and "RANDOM WEIGHTS" in out
    empty = ["train-llava", "--store", str(tmp_path / "empty"), f"--set=llava.work_dir={tmp_path / 'work'}"]
    assert main(empty) == 2  # no data and nothing to export: says how to make it
    assert "pathgen export llava --out DIR" in capsys.readouterr().err


def test_production_refuses_random_weight_parts(tmp_path):
    from pathgen.settings import load_settings
    from tasks.llava.spec import require_real_llava
    from tasks.llava.vision import vision_source
    from tasks.models import RandomWeightsRefused

    settings = load_settings(overrides={"models.allow_random_weights": False}, environ={})
    with pytest.raises(RandomWeightsRefused, match="llava.language_model is unset.*|llava.vision is unset"):
        require_real_llava(settings, vision_source(None))
    named = load_settings(
        overrides={
            "models.allow_random_weights": False,
            "llava.vision": "ViT-B-16",
            "llava.language_model": "some/hub-model",
        },
        environ={},
    )
    with pytest.raises(RandomWeightsRefused, match="llava.vision ViT-B-16 has no trained weights"):
        require_real_llava(named, vision_source("ViT-B-16"))
    real = named.model_copy(update={"llava": named.llava.model_copy(update={"vision": "ViT-B-16:openai"})})
    require_real_llava(real, vision_source("ViT-B-16:openai"))  # named weights: allowed (nothing is loaded here)
