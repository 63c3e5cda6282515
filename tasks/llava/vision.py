"""The vision tower of PathGen-LLaVA.

An open_clip ViT (a PathGen-CLIP checkpoint, ``NAME:PRETRAINED``, ``local-dir:``/``hf-hub:``) is converted into a
transformers ``CLIPVisionModel`` plus a ``CLIPImageProcessor`` that preprocesses as open_clip does (size, crop, mean,
std), so the LLaVA folder loads anywhere with transformers alone. Any transformers vision tower (hub id or folder,
CLIP or SigLIP) is taken as it is. Every conversion is checked by feeding the same pixels through both models.

Mapping (open_clip -> transformers): conv1 -> embeddings.patch_embedding, class_embedding, positional_embedding ->
embeddings.position_embedding, ln_pre -> pre_layrnorm, transformer.resblocks[i] -> encoder.layers[i] (ln_1 ->
layer_norm1, attn.in_proj split into q/k/v, attn.out_proj, ln_2 -> layer_norm2, mlp.c_fc/c_proj -> mlp.fc1/fc2),
ln_post -> post_layernorm. ``proj`` has no place in CLIPVisionModel (LLaVA reads hidden states, not the embedding);
the check applies it by hand to compare the projected embedding too.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tasks.clip.spec import (
    CHECKPOINT_SUFFIXES,
    TINY_RANDOM,
    ModelSpec,
    local_checkpoint,
    parse_model_spec,
    quick_gelu_name,
)

OPEN_CLIP_PREFIXES = ("local-dir:", "hf-hub:")
TOLERANCE = 1e-4  # fp32: the two implementations differ only in the order of floating-point operations
_ACTIVATIONS = {"QuickGELU": "quick_gelu", "GELU:none": "gelu", "GELU:tanh": "gelu_pytorch_tanh"}
_VISION_CLASSES = {"clip": "CLIPVisionModel", "clip_vision_model": "CLIPVisionModel",
                   "siglip": "SiglipVisionModel", "siglip_vision_model": "SiglipVisionModel"}  # fmt: skip

log = logging.getLogger("pathgen.llava")


@dataclass(frozen=True)
class VisionSource:
    """Where the tower comes from: ``open_clip`` (converted) or ``transformers`` (loaded as it is)."""

    kind: Literal["open_clip", "transformers"]
    text: str
    random_weights: bool

    @property
    def label(self) -> str:
        return self.text


@dataclass
class VisionTower:
    model: Any  # a transformers vision model (CLIPVisionModel after a conversion)
    image_processor: Any
    source: VisionSource
    has_cls: bool  # a class token leads the patch tokens (CLIP): LLaVA's "default" strategy drops it
    check: dict[str, float] | None = None  # conversion check: max abs differences

    @property
    def patch_size(self) -> int:
        return int(self.model.config.patch_size)

    @property
    def image_size(self) -> int:
        return int(self.model.config.image_size)


def vision_source(text: str | None) -> VisionSource:
    """A setting's value -> its source; unset is the tiny open_clip model (random weights). ``NAME:TAG`` with a tag
    trained with QuickGELU becomes the name's ``-quickgelu`` twin, the model it builds (and the run's identity)."""
    if not text:
        return VisionSource("open_clip", TINY_RANDOM, True)
    if is_open_clip(text):
        if Path(text).is_dir():  # an open_clip folder named without its prefix
            text = f"local-dir:{text}"
        name, _, tag = text.partition(":")
        if quick_gelu_name(name, tag or None) != name:
            text = f"{quick_gelu_name(name, tag)}:{tag}"
        return VisionSource("open_clip", text, parse_model_spec(text).random_weights)
    from agents.backends import folder_random_weights

    return VisionSource("transformers", text, folder_random_weights(text) is not None)


def is_open_clip(text: str) -> bool:
    """open_clip: a prefixed model, a checkpoint file or URL, an open_clip folder, or a registered model name."""
    if text.startswith(OPEN_CLIP_PREFIXES) or "://" in text or text.lower().endswith(CHECKPOINT_SUFFIXES):
        return True
    if Path(text).is_dir():
        return (Path(text) / "open_clip_config.json").is_file()
    if Path(text).is_file():
        return True
    import open_clip

    from tasks.clip.spec import register_model_configs

    register_model_configs()
    return text.partition(":")[0] in open_clip.list_models()


def load_vision_tower(source: VisionSource, logger: logging.Logger | None = None) -> VisionTower:
    if source.kind == "transformers":
        return _load_transformers_tower(source)
    visual, preprocess_cfg = load_open_clip_visual(parse_model_spec(source.text))
    model = convert_visual(visual)
    tower = VisionTower(model, image_processor_of(preprocess_cfg), source, has_cls=True)
    tower.check = check_conversion(visual, model)  # a wrong mapping must fail here, not after a day of training
    (logger or log).info("vision tower %s converted: max abs difference %s", source.label, tower.check)
    if max(tower.check.values()) > TOLERANCE:
        raise RuntimeError(f"converting {source.label} changed its features: {tower.check} (> {TOLERANCE})")
    return tower


def load_open_clip_visual(spec: ModelSpec):
    """The open_clip image tower and its preprocessing config, seeded so a random model is the same everywhere."""
    import open_clip
    import torch

    from tasks.clip.spec import register_model_configs

    register_model_configs()
    pretrained = local_checkpoint(spec.pretrained)
    if pretrained and Path(pretrained).suffix and not Path(pretrained).exists():
        raise FileNotFoundError(f"checkpoint {pretrained!r} of {spec.name} does not exist")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = open_clip.create_model(spec.name, pretrained=pretrained, device="cpu")
    model.eval()
    return model.visual, dict(model.visual.preprocess_cfg)


def _load_transformers_tower(source: VisionSource) -> VisionTower:
    import transformers

    config = transformers.AutoConfig.from_pretrained(source.text)
    class_name = _VISION_CLASSES.get(config.model_type)
    if class_name is None:
        raise ValueError(f"{source.text} is a {config.model_type} model; a CLIP or SigLIP vision tower is needed")
    model = getattr(transformers, class_name).from_pretrained(source.text)
    processor = transformers.AutoImageProcessor.from_pretrained(source.text)
    return VisionTower(model.eval(), processor, source, has_cls=class_name.startswith("CLIP"))


def vision_config(visual):
    """A CLIPVisionConfig with open_clip's shapes, activation and LayerNorm epsilon; refuses what it cannot hold."""
    from transformers import CLIPVisionConfig

    _refuse_unsupported(visual)
    block = visual.transformer.resblocks[0]
    return CLIPVisionConfig(
        hidden_size=visual.conv1.out_channels,
        intermediate_size=block.mlp.c_fc.out_features,
        num_hidden_layers=len(visual.transformer.resblocks),
        num_attention_heads=block.attn.num_heads,
        image_size=visual.image_size[0],
        patch_size=visual.patch_size[0],
        hidden_act=_activation(block.mlp),
        layer_norm_eps=visual.ln_pre.eps,
        projection_dim=visual.proj.shape[1] if visual.proj is not None else visual.conv1.out_channels,
    )


def _refuse_unsupported(visual) -> None:
    import torch.nn as nn
    from open_clip.transformer import VisionTransformer

    problems = {
        "not a ViT (open_clip VisionTransformer)": not isinstance(visual, VisionTransformer),
        "attentional pooling": getattr(visual, "attn_pool", None) is not None,
        "pooling other than the class token": getattr(visual, "pool_type", "tok") != "tok",
        "LayerNorm after pooling": getattr(visual, "final_ln_after_pool", False),
        "no ln_pre": isinstance(getattr(visual, "ln_pre", None), nn.Identity),
        "a non-square image or patch": len(set(getattr(visual, "image_size", (0, 1)))) != 1
        or len(set(visual.patch_size)) != 1,
    }
    if not problems["not a ViT (open_clip VisionTransformer)"]:
        problems["layer scale"] = not isinstance(visual.transformer.resblocks[0].ls_1, nn.Identity)
    found = [name for name, bad in problems.items() if bad]
    if found:
        raise ValueError(f"this open_clip vision tower cannot become a CLIPVisionModel: {', '.join(found)}")


def _activation(mlp) -> str:
    act = next(m for name, m in mlp.named_children() if name not in ("c_fc", "c_proj", "ln"))
    key = type(act).__name__ + (f":{act.approximate}" if hasattr(act, "approximate") else "")
    if key not in _ACTIVATIONS:
        raise ValueError(f"open_clip MLP activation {key} has no transformers equivalent")
    return _ACTIVATIONS[key]


def converted_state_dict(visual) -> dict[str, Any]:
    """open_clip visual weights under CLIPVisionModel's names (without the model's own prefix). Every weight but
    ``proj`` must find a place: anything left over is a feature the conversion would silently drop."""
    sd = visual.state_dict()
    out = {
        "embeddings.class_embedding": sd["class_embedding"],
        "embeddings.patch_embedding.weight": sd["conv1.weight"],
        "embeddings.position_embedding.weight": sd["positional_embedding"],
    }
    pairs = {"ln_pre": "pre_layrnorm", "ln_post": "post_layernorm"}
    for i in range(len(visual.transformer.resblocks)):
        src, dst = f"transformer.resblocks.{i}.", f"encoder.layers.{i}."
        for name, value in zip("qkv", sd[src + "attn.in_proj_weight"].chunk(3), strict=True):
            out[f"{dst}self_attn.{name}_proj.weight"] = value
        for name, value in zip("qkv", sd[src + "attn.in_proj_bias"].chunk(3), strict=True):
            out[f"{dst}self_attn.{name}_proj.bias"] = value
        pairs |= {src + "attn.out_proj": dst + "self_attn.out_proj", src + "ln_1": dst + "layer_norm1",
                  src + "ln_2": dst + "layer_norm2", src + "mlp.c_fc": dst + "mlp.fc1",
                  src + "mlp.c_proj": dst + "mlp.fc2"}  # fmt: skip
    for src, dst in pairs.items():
        out[f"{dst}.weight"], out[f"{dst}.bias"] = sd[f"{src}.weight"], sd[f"{src}.bias"]
    used = {"class_embedding", "conv1.weight", "positional_embedding", "proj"}
    used |= {k for k in sd if k.endswith(("attn.in_proj_weight", "attn.in_proj_bias"))}
    used |= {f"{src}.{p}" for src in pairs for p in ("weight", "bias")}
    left = sorted(set(sd) - used)
    if left:
        raise ValueError(f"open_clip weights with no place in CLIPVisionModel: {', '.join(left[:8])}")
    return out


def convert_visual(visual):
    """open_clip VisionTransformer -> transformers CLIPVisionModel with the same weights."""
    from transformers import CLIPVisionModel

    model = CLIPVisionModel(vision_config(visual))
    target = model.state_dict()
    prefix = next(k for k in target if k.endswith("embeddings.class_embedding"))[: -len("embeddings.class_embedding")]
    state = {prefix + k: v.detach().clone() for k, v in converted_state_dict(visual).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]  # a buffer transformers builds itself
    if missing or unexpected:
        raise ValueError(f"conversion left CLIPVisionModel weights unset: {missing[:8]} {unexpected[:8]}")
    return model.eval()


def image_processor_of(preprocess_cfg: dict[str, Any]):
    """A CLIPImageProcessor that does what open_clip's transform does: resize, crop, mean, std."""
    from transformers import CLIPImageProcessor

    size = preprocess_cfg["size"]
    side = int(size[0] if isinstance(size, tuple | list) else size)
    mode = preprocess_cfg.get("resize_mode", "shortest")
    if mode not in ("shortest", "squash"):
        raise ValueError(f"open_clip resize_mode {mode!r} has no CLIPImageProcessor equivalent")
    resample = {"bicubic": 3, "bilinear": 2}.get(preprocess_cfg.get("interpolation", "bicubic"), 3)
    return CLIPImageProcessor(
        size={"shortest_edge": side} if mode == "shortest" else {"height": side, "width": side},
        crop_size={"height": side, "width": side},
        do_center_crop=mode == "shortest",
        image_mean=list(preprocess_cfg["mean"]),
        image_std=list(preprocess_cfg["std"]),
        resample=resample,
    )


def check_conversion(visual, model, pixel_values=None) -> dict[str, float]:
    """Max abs differences between open_clip and the converted model on the same pixels: the class token after
    ln_post (``pooled``) and, through open_clip's ``proj``, the image embedding (``embedding``)."""
    import torch

    if pixel_values is None:
        generator = torch.Generator().manual_seed(0)
        pixel_values = torch.randn(2, 3, visual.image_size[0], visual.image_size[1], generator=generator)
    captured = {}
    hook = visual.ln_post.register_forward_hook(lambda _m, _i, out: captured.update(tokens=out))
    try:
        with torch.inference_mode():
            embedding = visual(pixel_values)
            pooled_hf = model(pixel_values=pixel_values).pooler_output
    finally:
        hook.remove()
    result = {"pooled": (captured["tokens"][:, 0] - pooled_hf).abs().max().item()}
    if visual.proj is not None:
        result["embedding"] = (embedding - pooled_hf @ visual.proj.detach()).abs().max().item()
    return result
