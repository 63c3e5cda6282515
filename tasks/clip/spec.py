"""Which open_clip model to load, from one string: a name with a pretrained tag (``ViT-B-16:openai``), a name with a
checkpoint (``ViT-B-16:/runs/x/epoch_2.pt``), a bare checkpoint of ours (its model is read from the run's
``params.txt``), a ``local-dir:`` / ``hf-hub:`` model, or a bare name.

A model is random weights when nothing was loaded into it: a bare name has open_clip's random initialisation,
whatever the name, so it is declared random exactly like the tiny model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

TINY_RANDOM = "tiny-random"
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
_SELF_CONTAINED = ("local-dir:", "hf-hub:")  # open_clip loads config and weights from these by themselves


@dataclass(frozen=True)
class ModelSpec:
    name: str
    pretrained: str | None = None

    @property
    def random_weights(self) -> bool:
        return not self.pretrained and not self.name.startswith(_SELF_CONTAINED)

    @property
    def label(self) -> str:
        return f"{self.name}:{self.pretrained}" if self.pretrained else self.name


def parse_model_spec(text: str) -> ModelSpec:
    """``NAME``, ``NAME:TAG``, ``NAME:PATH`` or a bare checkpoint ``PATH`` (or URL) of a PathGen-CLIP run."""
    text = text.strip()
    if not text:
        raise ValueError("empty model: give an open_clip name such as ViT-B-16:openai or a checkpoint path")
    if text.startswith(_SELF_CONTAINED):
        return ModelSpec(text)
    if "://" in text or text.lower().endswith(CHECKPOINT_SUFFIXES) or Path(text).is_file():
        name, sep, rest = text.partition(":")
        if sep and not rest.startswith("//") and not Path(text).exists() and re.fullmatch(r"[\w.@/-]+", name):
            return ModelSpec(name, rest)  # NAME:PATH
        return ModelSpec(checkpoint_model_name(text), text)
    name, _, pretrained = text.partition(":")
    return ModelSpec(name, pretrained or None)


def checkpoint_model_name(checkpoint: str) -> str:
    """The open_clip model a trainer checkpoint holds, from ``params.txt`` of its run (``<run>/checkpoints/x.pt``).

    open_clip_train's checkpoints carry weights, not the architecture, so a bare path needs the run beside it."""
    for folder in _parents(checkpoint):
        params = _read_text(f"{folder}/params.txt")
        if params is None:
            continue
        match = re.search(r"^model: (\S+)$", params, re.MULTILINE)
        if match:
            return match.group(1)
    raise ValueError(
        f"cannot tell which open_clip model {checkpoint} holds: no params.txt of its training run beside it; "
        f"name the model as NAME:{checkpoint} (for example ViT-B-16:{checkpoint})"
    )


def _parents(path: str) -> list[str]:
    head = path.rstrip("/").rsplit("/", 1)[0]
    return [head, head.rsplit("/", 1)[0]]


def local_checkpoint(pretrained: str | None) -> str | None:
    """A checkpoint in object storage is fetched once into the local cache (open_clip loads local files only);
    tags and local paths pass through."""
    if not pretrained or "://" not in pretrained or pretrained.startswith("file://"):
        return pretrained.removeprefix("file://") if pretrained else pretrained
    import hashlib
    import os

    import fsspec

    from tasks.store.objects import storage_options

    fs, path = fsspec.core.url_to_fs(pretrained, **storage_options(pretrained))
    info = fs.info(path)
    version = f"{pretrained}|{info.get('size')}|{info.get('ETag') or info.get('mtime') or info.get('LastModified')}"
    folder = Path.home() / ".cache" / "pathgen" / "checkpoints" / hashlib.sha256(version.encode()).hexdigest()[:16]
    target = folder / Path(path).name
    if not target.exists():
        folder.mkdir(parents=True, exist_ok=True)
        partial = folder / f".{target.name}.{os.getpid()}.part"
        fs.get(path, str(partial))
        os.replace(partial, target)
    return str(target)


def _read_text(url: str) -> str | None:
    import fsspec

    from tasks.store.objects import storage_options

    try:
        with fsspec.open(url, "rt", **storage_options(url)) as handle:
            return handle.read()
    except FileNotFoundError:  # any other error (access denied, an outage) is the store's, not a missing run
        return None
