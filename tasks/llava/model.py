"""Build PathGen-LLaVA: vision tower + LLaVA-1.5's two-layer GELU projector (mlp2x_gelu) + a causal language model,
as one ``LlavaForConditionalGeneration`` with a ``LlavaProcessor`` and a chat template, saved as a Hugging Face folder
that ``AutoModelForImageTextToText`` and ``AutoProcessor`` load.

The language model is any hub id or local folder; unset, the tiny random-weight LM of :mod:`agents.tiny`. A model
built from any random-weight part carries ``RANDOM_MARKER`` in its config.json, so every later reader (the agents'
backends included) sees it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agents.tiny import CHAT_TEMPLATE as CHATML_TEMPLATE
from agents.tiny import RANDOM_MARKER, TINY_LM, TINY_VERSION
from tasks.llava.vision import VisionTower

IMAGE_TOKEN = "<image>"
VICUNA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
# LLaVA-1.5's conversation format (conv_vicuna_v1) for language models without ChatML tokens; BOS and EOS are
# written in by vicuna_template() because a processor does not hand the tokenizer's special tokens to the template.
_VICUNA = (
    "{% macro show(c) %}{% if c is string %}{{ c }}{% else %}{% for p in c %}"
    "{% if p['type'] == 'image' %}<image>\n{% elif p['type'] == 'text' %}{{ p['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{% endmacro %}"
    "@BOS@{% if messages and messages[0]['role'] == 'system' %}{{ show(messages[0]['content']) }}"
    "{% else %}@SYSTEM@{% endif %}"
    "{% for message in messages %}{% if message['role'] == 'user' %} USER: {{ show(message['content']) }}"
    "{% elif message['role'] == 'assistant' %} ASSISTANT: {{ show(message['content']) }}@EOS@{% endif %}"
    "{% endfor %}{% if add_generation_prompt %} ASSISTANT:{% endif %}"
)

log = logging.getLogger("pathgen.llava")


@dataclass
class LanguageModel:
    model: Any  # a transformers causal LM
    tokenizer: Any
    label: str
    random_weights: bool


def load_language_model(name: str | None, cache: Path | None = None) -> LanguageModel:
    """A hub id or local folder; unset, the tiny random-weight LM (built offline, marked random)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from agents.backends import folder_random_weights
    from agents.tiny import build_tiny_models

    folder = name or str(build_tiny_models(cache)[TINY_LM])
    model, info = AutoModelForCausalLM.from_pretrained(folder, dtype="float32", output_loading_info=True)
    missing = len(info.get("missing_keys") or [])
    total = len(model.state_dict())
    # Weights mostly missing from the files means transformers initialised them: random weights, whatever the name.
    random = name is None or folder_random_weights(folder) is not None or missing > total // 2
    label = name or f"{TINY_LM}-v{TINY_VERSION}"
    return LanguageModel(model, AutoTokenizer.from_pretrained(folder), label, random)


def chat_template(tokenizer) -> tuple[str, str]:
    """(template, end-of-turn token): ChatML when the tokenizer has its tokens, else LLaVA-1.5's Vicuna format."""
    vocab = tokenizer.get_vocab()
    if "<|im_start|>" in vocab and "<|im_end|>" in vocab:
        return CHATML_TEMPLATE, "<|im_end|>"
    eos = tokenizer.eos_token or ""
    template = _VICUNA.replace("@BOS@", tokenizer.bos_token or "").replace("@SYSTEM@", VICUNA_SYSTEM)
    return template.replace("@EOS@", eos), eos


def prepare_tokenizer(tokenizer) -> Any:
    """Add ``<image>`` (one token, never split) and a pad token when the language model's tokenizer lacks them."""
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    tokenizer.padding_side = "left"  # batched generation continues every row from its own last token
    return tokenizer


def image_token_count(tower: VisionTower) -> int:
    return (tower.image_size // tower.patch_size) ** 2


def build_llava(tower: VisionTower, lm: LanguageModel, vision_feature_layer: int = -2, seed: int = 0):
    """(LlavaForConditionalGeneration, LlavaProcessor) from a vision tower and a language model; the projector is
    new (seeded), the tower and the language model keep their weights: their modules are moved in, not copied."""
    import torch
    from accelerate import init_empty_weights
    from transformers import LlavaConfig, LlavaForConditionalGeneration
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    tokenizer = prepare_tokenizer(lm.tokenizer)
    config = LlavaConfig(
        vision_config=tower.model.config,
        text_config=lm.model.config,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        projector_hidden_act="gelu",  # LLaVA-1.5's mlp2x_gelu: Linear, GELU, Linear
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy="default" if tower.has_cls else "full",
        image_seq_length=image_token_count(tower),
    )
    with init_empty_weights():  # no second copy of a 7B language model, only its skeleton
        model = LlavaForConditionalGeneration(config)
    model.model.vision_tower = tower.model
    model.model.language_model = lm.model.base_model
    model.lm_head = lm.model.get_output_embeddings()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.model.multi_modal_projector = LlavaMultiModalProjector(config)
    _check_materialized(model)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    model.config.text_config.vocab_size = model.get_input_embeddings().num_embeddings
    random = tower.source.random_weights or lm.random_weights
    if random:
        setattr(model.config, RANDOM_MARKER, True)
    template, end = chat_template(tokenizer)
    _generation_defaults(model, tokenizer, end)
    return model.float(), make_processor(tower, tokenizer, template)


def _check_materialized(model) -> None:
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "meta"]
    if left:
        raise RuntimeError(f"LLaVA parts left without weights: {left[:5]}")


def _generation_defaults(model, tokenizer, end_of_turn: str) -> None:
    """Generation stops at the end of the assistant's turn as well as at EOS."""
    stops = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(end_of_turn)]
    model.generation_config.eos_token_id = sorted({t for t in stops if t is not None})
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id


def make_processor(tower: VisionTower, tokenizer, template: str):
    from transformers import LlavaProcessor

    return LlavaProcessor(
        image_processor=tower.image_processor,
        tokenizer=tokenizer,
        patch_size=tower.patch_size,
        vision_feature_select_strategy="default" if tower.has_cls else "full",
        num_additional_image_tokens=1 if tower.has_cls else 0,
        chat_template=template,
    )


def save_llava(model, processor, folder: Path) -> Path:
    """Write the Hugging Face folder beside its final name, then rename: a half-saved folder is never final."""
    import os
    import shutil

    partial = folder.with_name(f".{folder.name}.{os.getpid()}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    processor.save_pretrained(partial)
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
    return folder


def load_llava(folder: str | Path, dtype: str = "float32"):
    """(model, processor) of a saved folder, through the Auto classes anyone else would use."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(str(folder), dtype=dtype)
    return model, AutoProcessor.from_pretrained(str(folder))
