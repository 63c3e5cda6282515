"""The transformers backend: AutoModelForImageTextToText or AutoModelForCausalLM with their processor or
tokenizer, batched ``generate`` with left padding, on CPU or GPU. Model ids are hub ids or local folders."""

from __future__ import annotations

import io

from agents.protocol import ChatReply, ChatRequest, Sampling


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

        self.model_id = model_id
        self.random_weights = random_weights
        self.batch_size = batch_size
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        config = AutoConfig.from_pretrained(model_id, revision=revision)
        self.vision = hasattr(config, "vision_config")
        dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        if self.vision:
            from transformers import AutoModelForImageTextToText, AutoProcessor

            self.processor = AutoProcessor.from_pretrained(model_id, revision=revision)
            self.tokenizer = self.processor.tokenizer
            self.model = AutoModelForImageTextToText.from_pretrained(model_id, dtype=dtype, revision=revision)
        else:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            self.processor = self.tokenizer = AutoTokenizer.from_pretrained(
                model_id, padding_side="left", revision=revision
            )
            self.model = AutoModelForCausalLM.from_pretrained(model_id, dtype=dtype, revision=revision)
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

    def _generate(self, requests: list[ChatRequest], sampling: Sampling) -> list[ChatReply]:
        import torch

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
        torch.manual_seed(sampling.seed)
        sample = sampling.temperature > 0
        with torch.inference_mode():
            output = self.model.generate(
                **inputs,
                max_new_tokens=sampling.max_new_tokens,
                do_sample=sample,
                temperature=sampling.temperature if sample else None,
                top_p=sampling.top_p if sample else None,
                pad_token_id=self.tokenizer.pad_token_id,
            )
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        texts = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        eos = self.tokenizer.eos_token_id
        return [
            ChatReply(text.strip(), None, "stop" if (row == eos).any() else "length")
            for text, row in zip(texts, new_tokens, strict=True)
        ]
