"""The transformers backend: AutoModelForImageTextToText or AutoModelForCausalLM with their processor or
tokenizer, batched ``generate`` with left padding, on CPU or GPU. Model ids are hub ids or local folders.

``random_weights`` is decided by what was loaded, not by the model's name: the caller's word (the tiny models), a
config that says the weights are random, a local folder with a config but no weight files (the model is then built
from its config, seeded, and says so), or weight files that lacked most of the model's parameters."""

from __future__ import annotations

import gc
import io
import logging
from pathlib import Path

from agents.protocol import ChatReply, ChatRequest, Sampling
from pathgen.devices import empty_cuda_cache
from pathgen.errors import BackendError

log = logging.getLogger("pathgen.agents")
MOSTLY_MISSING = 0.5  # above this share of parameters (by count) left uninitialised, the model is random weights


def missing_share(model, missing_keys) -> float:
    """Share of the model's parameter values (not tensors) that its weight files did not provide."""
    state = model.state_dict()
    total = sum(t.numel() for t in state.values())
    missing = sum(state[k].numel() for k in set(missing_keys) if k in state)
    return missing / total if total else 1.0


def load_model(cls, model_id: str, config, dtype, revision: str | None) -> tuple[object, str | None]:
    """The model and, when its weights were not (mostly) loaded, why it is random weights."""
    import torch

    from agents.backends.weights import has_weight_files

    if Path(model_id).expanduser().is_dir() and not has_weight_files(model_id):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # the same random model on every worker
            model = cls.from_config(config, dtype=dtype)
        try:
            from transformers import GenerationConfig

            model.generation_config = GenerationConfig.from_pretrained(model_id)
        except OSError:
            pass  # no generation_config.json: the defaults from the config
        return model, "no weight files (*.safetensors, *.bin) in its folder: built from config.json with random weights"
    model, info = cls.from_pretrained(model_id, dtype=dtype, revision=revision, output_loading_info=True)
    share = missing_share(model, info.get("missing_keys", ()))
    if share > MOSTLY_MISSING:
        return model, f"{share:.0%} of its parameters were not in its weight files and were initialised at random"
    if share > 0:
        log.warning(
            "%s: %.1f%% of its parameters were not in its weight files (initialised at random)", model_id, share * 100
        )
    return model, None


class ItemSampler:
    """A transformers logits processor that samples each row's next token with that row's own generator
    (temperature, then nucleus top-p) and leaves only that token possible, so that greedy search takes it. A row's
    draws then come from its own seed alone; its logits can still differ in the last bits with the batch's
    padding."""

    def __init__(self, seeds: list[int], temperature: float, top_p: float, device: str) -> None:
        import torch

        self.generators = [torch.Generator(device=device).manual_seed(seed) for seed in seeds]
        self.temperature = temperature
        self.top_p = top_p

    def __call__(self, input_ids, scores):
        import torch

        probs = torch.softmax(scores.float() / self.temperature, dim=-1)
        if self.top_p < 1.0:
            ordered, order = probs.sort(dim=-1, descending=True)
            outside = ordered.cumsum(dim=-1) - ordered > self.top_p  # the most likely token always stays
            probs = probs.scatter(-1, order, ordered.masked_fill(outside, 0.0))
        chosen = torch.stack(
            [torch.multinomial(row, 1, generator=g) for row, g in zip(probs, self.generators, strict=True)]
        )
        only = torch.full_like(scores, float("-inf"))
        return only.scatter(-1, chosen, 0.0)


class TransformersBackend:
    name = "transformers"

    def __init__(
        self,
        model_id: str,
        device: str = "auto",
        batch_size: int = 16,
        random_weights: bool = False,
        revision: str | None = None,
    ):
        import torch
        from transformers import AutoConfig

        from agents.tiny import RANDOM_MARKER

        self.model_id = model_id
        self.batch_size = batch_size
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        config = AutoConfig.from_pretrained(model_id, revision=revision)
        reasons = ["built with random weights"] if random_weights else []
        if getattr(config, RANDOM_MARKER, False):
            reasons.append(f"its config says it was built with random weights ({RANDOM_MARKER})")
        self.vision = hasattr(config, "vision_config")
        dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        if self.vision:
            from transformers import AutoModelForImageTextToText, AutoProcessor

            self.processor = AutoProcessor.from_pretrained(model_id, revision=revision)
            self.tokenizer = self.processor.tokenizer
            model_class = AutoModelForImageTextToText
        else:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            self.processor = self.tokenizer = AutoTokenizer.from_pretrained(
                model_id, padding_side="left", revision=revision
            )
            model_class = AutoModelForCausalLM
        self.model, unloaded = load_model(model_class, model_id, config, dtype, revision)
        if unloaded:
            reasons.append(unloaded)
            log.warning("%s is RANDOM WEIGHTS: %s; its replies are noise", model_id, unloaded)
        self.random_weights = bool(reasons)
        self.random_reason = "; ".join(reasons) or None
        self.tokenizer.padding_side = "left"  # generation appends on the right: pad on the left
        self.model.to(self.device).eval()

    def _conversation(self, request: ChatRequest) -> list[dict]:
        from PIL import Image

        parts: list[dict] = []
        if request.before_image:
            parts.append({"type": "text", "text": request.before_image})
        if request.image is not None:
            parts.append({"type": "image", "image": Image.open(io.BytesIO(request.image)).convert("RGB")})
        if request.after_image:
            parts.append({"type": "text", "text": request.after_image})
        if not self.vision:  # a text-only chat template takes plain strings
            parts = "\n".join(p["text"] for p in parts if p["type"] == "text")
        messages = [{"role": "system", "content": request.system}] if request.system else []
        return [*messages, {"role": "user", "content": parts}]

    def generate(self, requests: list[ChatRequest], sampling: Sampling) -> list[ChatReply]:
        replies: list[ChatReply] = []
        for start in range(0, len(requests), self.batch_size):
            replies.extend(self._generate(requests[start : start + self.batch_size], sampling))
        return replies

    def close(self) -> None:
        """Drop the model and its processor, and give the GPU memory back: the next stage needs it."""
        self.model = self.processor = self.tokenizer = None
        gc.collect()
        empty_cuda_cache()

    def _generate(self, requests: list[ChatRequest], sampling: Sampling) -> list[ChatReply]:
        import torch

        if self.model is None:
            raise BackendError(f"the transformers backend for {self.model_id} was released at the end of its stage")

        if not self.vision and any(r.image is not None for r in requests):
            raise ValueError(
                f"{self.model_id} is a text-only model but the describe and revise roles send an image: "
                "name a vision-language model for them"
            )
        conversations = [self._conversation(r) for r in requests]
        kwargs = {"processor_kwargs": {"padding": True}} if self.vision else {"padding": True}
        inputs = self.processor.apply_chat_template(
            conversations,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            **kwargs,
        ).to(self.device)
        # Greedy search over logits that ItemSampler has reduced to one token per row: sampling with each request's
        # own generator, never one generator shared by the batch (whose draws depend on the other rows).
        processors = []
        if sampling.temperature > 0:
            seeds = [r.seed_or(sampling) for r in requests]
            processors.append(ItemSampler(seeds, sampling.temperature, sampling.top_p, self.device))
        with torch.inference_mode():
            output = self.model.generate(
                **inputs,
                max_new_tokens=sampling.max_new_tokens,
                do_sample=False,
                logits_processor=processors,
                pad_token_id=self.tokenizer.pad_token_id,
            )
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        texts = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        eos = self.tokenizer.eos_token_id
        return [
            ChatReply(text.strip(), None, "stop" if (row == eos).any() else "length")
            for text, row in zip(texts, new_tokens, strict=True)
        ]
