"""Requests in the OpenAI chat format, as the openai and vLLM backends send them; images capped in pixels."""

from __future__ import annotations

import base64
import io

from agents.protocol import ChatRequest


def shrink_jpeg(image: bytes, max_pixels: int) -> bytes:
    """Cap an image's pixel count (vision encoders' memory grows with it); small images pass through untouched."""
    from PIL import Image

    with Image.open(io.BytesIO(image)) as picture:
        width, height = picture.size
        if width * height <= max_pixels:
            return image
        scale = (max_pixels / (width * height)) ** 0.5
        smaller = picture.convert("RGB").resize((max(1, int(width * scale)), max(1, int(height * scale))))
        out = io.BytesIO()
        smaller.save(out, format="JPEG", quality=90)
        return out.getvalue()


def openai_messages(request: ChatRequest, max_pixels: int) -> list[dict]:
    """OpenAI chat format, as served by vLLM, SGLang and hosted APIs; the image is a base64 data URL."""
    parts: list[dict] = []
    if request.before_image:
        parts.append({"type": "text", "text": request.before_image})
    if request.image is not None:
        data = base64.b64encode(shrink_jpeg(request.image, max_pixels)).decode()
        parts.append({"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{data}"}})
    if request.after_image:
        parts.append({"type": "text", "text": request.after_image})
    messages = [{"role": "system", "content": request.system}] if request.system else []
    messages.append({"role": "user", "content": parts})
    return messages
