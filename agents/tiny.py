"""Tiny random-weight models, built locally, for offline runs and tests: a byte-level BPE tokenizer trained on
text the project ships (its attribute prompts and agent prompts), a LLaVA-style vision-language model and a causal
language model. They exercise the same loading and generation code as real models; what they write is noise, and
every run that uses them says so. Built once per version into a cache folder and reused. Their config.json carries
``pathgen_random_weights: true``, so a copy of a tiny model under any other name or path is still declared random
weights by the backends that load it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

TINY_VERSION = "4"  # 3: config.json carries RANDOM_MARKER; 4: 2048 positions (the instruct prompt and reply fit)
TINY_VLM = "tiny-random-vlm"
TINY_LM = "tiny-random-lm"
RANDOM_MARKER = "pathgen_random_weights"  # a config.json key: the weights were never trained
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<image>", "<|im_start|>", "<|im_end|>"]
# A fixed list, not every prompt file: a new prompt (instruct.v1, ...) must not change the tiny models, whose
# identity in hashes is TINY_VERSION. These are the files the tiny models are built from (since tiny-v3).
CORPUS = [
    Path(__file__).resolve().parents[1] / "tasks" / "selection" / "data" / "tcga_prompts.yaml",
    *(Path(__file__).parent / "prompts" / f"{name}.v1.txt" for name in ("describe", "revise", "shorten", "summarize")),
]

# ChatML; a message's content is a string or a list of {"type": "image"} / {"type": "text"} parts.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def default_cache() -> Path:
    return Path(os.environ.get("PATHGEN_MODEL_CACHE", Path.home() / ".cache" / "pathgen" / "models"))


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    # No full byte alphabet: the vocabulary holds only what the (ASCII) corpus contains, so even a random model
    # writes printable text rather than stray bytes that decode to replacement characters.
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=SPECIAL_TOKENS)
    bpe.train_from_iterator((line for path in CORPUS for line in path.read_text().splitlines()), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="left",
        chat_template=CHAT_TEMPLATE,
    )


def _text_config(tokenizer):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_tiny_models(cache: Path | None = None) -> dict[str, Path]:
    """Build (or find) the tiny models; returns {name: folder}. Deterministic: seeded weights."""
    import torch

    root = (cache or default_cache()) / f"tiny-v{TINY_VERSION}"
    paths = {TINY_VLM: root / TINY_VLM, TINY_LM: root / TINY_LM}
    if all((p / "config.json").exists() for p in paths.values()):
        return paths
    tokenizer = _tokenizer()
    staging = root.with_name(root.name + f".partial-{os.getpid()}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the LM's weights are drawn first, then the VLM's: their order is part of the version
        _save_tiny_lm(tokenizer, staging / TINY_LM)
        _save_tiny_vlm(tokenizer, staging / TINY_VLM)
    _publish(staging, root)
    return paths


def _save_tiny_lm(tokenizer, folder: Path) -> None:
    from transformers import LlamaForCausalLM

    lm = LlamaForCausalLM(_text_config(tokenizer))
    setattr(lm.config, RANDOM_MARKER, True)
    lm.generation_config.pad_token_id = tokenizer.pad_token_id
    lm.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _vlm_config(tokenizer):
    """LLaVA: a small CLIP vision tower (224 px, 32 px patches: 49 image tokens) on the tiny LM's text config."""
    from transformers import CLIPVisionConfig, LlavaConfig

    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=224,
            patch_size=32,
        ),
        text_config=_text_config(tokenizer),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        image_seq_length=49,
    )
    setattr(config, RANDOM_MARKER, True)
    return config


def _save_tiny_vlm(tokenizer, folder: Path) -> None:
    from transformers import CLIPImageProcessor, LlavaForConditionalGeneration, LlavaProcessor

    vlm = LlavaForConditionalGeneration(_vlm_config(tokenizer))
    vlm.generation_config.pad_token_id = tokenizer.pad_token_id
    vlm.save_pretrained(folder)
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}),
        tokenizer=tokenizer,
        patch_size=32,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(folder)


def _publish(staging: Path, root: Path) -> None:
    """Rename the built models into place: atomic, and another process may have won the race, which is fine."""
    root.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(staging, root)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
