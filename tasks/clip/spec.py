"""Which open_clip model to load, from one string: a name with a pretrained tag (``ViT-B-16:openai``), a name with a
checkpoint (``ViT-B-16:/runs/x/epoch_2.pt``), a bare checkpoint of ours (its model is read from the run's
``params.txt``), a ``local-dir:`` / ``hf-hub:`` model, or a bare name.

A model is random weights when nothing was loaded into it: a bare name has open_clip's random initialisation,
whatever the name, so it is declared random exactly like the tiny model.

A pretrained tag whose weights were trained with QuickGELU (``openai``, and a few others) on a config that builds GELU
(open_clip's plain ``ViT-B-16``) names the config's ``-quickgelu`` twin instead (:func:`quick_gelu_name`): open_clip
itself only warns, and builds a model whose features are wrong. The twin's name is the model's identity everywhere
(run names, extraction and features hashes), so exactly the specs whose model changes get new hashes.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

TINY_RANDOM = "tiny-random"
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
_SELF_CONTAINED = ("local-dir:", "hf-hub:")  # open_clip loads config and weights from these by themselves
QUICK_GELU_SUFFIX = "-quickgelu"
MODEL_CONFIGS = Path(__file__).parents[1] / "selection" / "data" / "open_clip"  # tiny-random.json

log = logging.getLogger("pathgen.clip")
_switched: set[tuple[str, str]] = set()  # (name, tag) pairs already logged as switched to their -quickgelu twin


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
    return ModelSpec(quick_gelu_name(name, pretrained or None), pretrained or None)


def needs_quick_gelu(name: str, pretrained: str | None) -> bool:
    """Whether open_clip's ``pretrained`` tag for ``name`` was trained with QuickGELU that ``name``'s config lacks
    (``ViT-B-16`` with ``openai``). Reads open_clip's registries only: nothing is downloaded or built."""
    if not pretrained or not re.fullmatch(r"[\w-]+", pretrained) or not name or name.startswith(_SELF_CONTAINED):
        return False  # no tag: no weights, or a checkpoint (whose run's params.txt names its model)
    import open_clip

    if not open_clip.get_pretrained_cfg(name, pretrained).get("quick_gelu", False):
        return False  # not a tag of name (a checkpoint, another tag), or a GELU-trained one
    return not (open_clip.get_model_config(name) or {}).get("quick_gelu", False)


def quick_gelu_name(name: str, pretrained: str | None) -> str:
    """``name``, or its ``-quickgelu`` twin where :func:`needs_quick_gelu` (logged once per pair)."""
    if not needs_quick_gelu(name, pretrained):
        return name
    import open_clip

    twin = name + QUICK_GELU_SUFFIX
    if not open_clip.get_pretrained_cfg(twin, pretrained):
        raise ValueError(
            f"{name}:{pretrained}: the {pretrained} weights were trained with QuickGELU, which open_clip's {name} "
            f"lacks, and open_clip has no {twin} with that tag; name a QuickGELU config of that architecture"
        )
    if (name, pretrained) not in _switched:
        _switched.add((name, pretrained))
        log.info("%s:%s builds %s: the %s weights were trained with QuickGELU, %s has GELU", name, pretrained, twin,
                 pretrained, name)  # fmt: skip
    return twin


def checkpoint_model_name(checkpoint: str) -> str:
    """The open_clip model a trainer checkpoint holds, from ``params.txt`` of its run (``<run>/checkpoints/x.pt``).

    open_clip_train's checkpoints carry weights, not the architecture, so a bare path needs the run beside it. A run
    trained with ``--force-quick-gelu`` holds the model's ``-quickgelu`` twin."""
    for folder in _parents(checkpoint):
        params = _read_text(f"{folder}/params.txt")
        if params is None:
            continue
        match = re.search(r"^model: (\S+)$", params, re.MULTILINE)
        if match:
            forced = re.search(r"^force_quick_gelu: True$", params, re.MULTILINE)
            return _quick_gelu_twin(match.group(1), checkpoint) if forced else match.group(1)
    raise ValueError(
        f"cannot tell which open_clip model {checkpoint} holds: no params.txt of its training run beside it; "
        f"name the model as NAME:{checkpoint} (for example ViT-B-16:{checkpoint})"
    )


def register_model_configs() -> None:
    """Add our own open_clip configs (``tiny-random``) to open_clip's registry, once, before a name is looked up."""
    import open_clip

    if TINY_RANDOM not in open_clip.list_models():
        open_clip.add_model_config(MODEL_CONFIGS)


def _quick_gelu_twin(name: str, checkpoint: str) -> str:
    import open_clip

    register_model_configs()
    if (open_clip.get_model_config(name) or {}).get("quick_gelu", False) or name.endswith(QUICK_GELU_SUFFIX):
        return name
    if name + QUICK_GELU_SUFFIX not in open_clip.list_models():
        raise ValueError(
            f"{checkpoint} was trained as {name} with QuickGELU forced, and open_clip has no {name}{QUICK_GELU_SUFFIX}"
            f' config to load it into; add one (the {name} config with "quick_gelu": true)'
        )
    return name + QUICK_GELU_SUFFIX


def trained_from_random(checkpoint: str | None, hops: int = 4) -> bool:
    """Whether a PathGen-CLIP checkpoint (``<run>/<stage>/checkpoints/epoch_N.pt``) descends from random weights.

    Loading it loads weights, yet its run may have started from none: the run's ``run.json`` says so, else the
    trainer's ``params.txt`` of its stage names what it started from (nothing, or stage 1's checkpoint for stage 2,
    followed in turn). Tags, other files and checkpoints without their run beside them are taken as trained."""
    if not checkpoint or hops <= 0 or "/" not in checkpoint:
        return False
    folder, stage = _parents(checkpoint)
    if not folder.endswith("/checkpoints"):
        return False
    record = _read_text(f"{stage.rsplit('/', 1)[0]}/run.json")
    if record is not None:
        return bool(json.loads(record).get("random_weights"))
    params = _read_text(f"{stage}/params.txt")
    if params is None:
        return False
    model = re.search(r"^model: (.*)$", params, re.MULTILINE)
    start = re.search(r"^pretrained: (.*)$", params, re.MULTILINE)
    weights = start.group(1).strip() if start else ""
    if not weights or weights == "None":
        return ModelSpec(model.group(1).strip() if model else TINY_RANDOM).random_weights
    return trained_from_random(weights, hops - 1)


def has_random_weights(spec: ModelSpec) -> bool:
    """No pretrained weights: none given, or a PathGen-CLIP checkpoint whose run started from random weights (it
    loads weights, yet they descend from none). Every loaded model's and every run's ``random_weights`` is this."""
    return spec.random_weights or trained_from_random(spec.pretrained)


def _parents(path: str) -> list[str]:
    head = path.rstrip("/").rsplit("/", 1)[0]
    return [head, head.rsplit("/", 1)[0]]


CACHE_GB_ENV = "PATHGEN_CHECKPOINT_CACHE_GB"  # the fetched-checkpoint cache's bound; default 20
PARTIAL = re.compile(r"^\.(?P<name>.+?)(?:\.(?P<pid>\d+))?\.part$")


def checkpoint_cache() -> Path:
    return Path.home() / ".cache" / "pathgen" / "checkpoints"


def local_checkpoint(pretrained: str | None) -> str | None:
    """A checkpoint in object storage as a local file (open_clip loads local files only), fetched once through
    fsspec's whole-file cache (:func:`cached_copy`) into a folder of its version (its size and ETag or mtime), so a
    checkpoint written again is fetched again; tags and local paths pass through. The cache keeps the most recently
    used checkpoints within its bound."""
    if not pretrained or "://" not in pretrained or pretrained.startswith("file://"):
        return pretrained.removeprefix("file://") if pretrained else pretrained
    import hashlib

    import fsspec

    from tasks.store.objects import storage_options

    fs, path = fsspec.core.url_to_fs(pretrained, **storage_options(pretrained))
    info = fs.info(path)
    version = f"{pretrained}|{info.get('size')}|{info.get('ETag') or info.get('mtime') or info.get('LastModified')}"
    folder = checkpoint_cache() / hashlib.sha256(version.encode()).hexdigest()[:16]
    target = cached_copy(fs, path, folder)
    os.utime(target)  # recently used: evicted last
    evict_checkpoints(checkpoint_cache(), keep=folder)
    return str(target)


def cached_copy(fs, path: str, folder: Path) -> Path:
    """``path`` of ``fs`` through fsspec's whole-file cache (``simplecache``, named as the remote file) kept in
    ``folder``: the copy there, else one fetched into a staging folder of this process (the cache's writable layer)
    and renamed into ``folder`` when complete. simplecache writes its copy in place, so a fetch cut short there would
    later pass for the checkpoint; the staging folder never outlives this call, nor a killed process's the next."""
    from fsspec.implementations.cached import SimpleCacheFileSystem

    folder.mkdir(parents=True, exist_ok=True)
    remove_dead_partials(folder)
    staging = folder / f".fetch.{os.getpid()}.part"
    layers = [str(folder), str(staging)]  # looked up in order; only the last is written
    cache = SimpleCacheFileSystem(fs=fs, cache_storage=layers, same_names=True, skip_instance_cache=True)
    try:
        with cache.open(path, "rb") as handle:
            copy = Path(handle.name)
        if copy.parent == staging:
            os.replace(copy, folder / copy.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder / copy.name


def fetch_whole(fs, remote: str, target: Path) -> None:
    """``remote`` to ``target`` through a partial file of this process, renamed when complete. The partial file
    never outlives a failed or interrupted fetch here, and those of killed processes are removed first."""
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_partials(target.parent)
    partial = target.with_name(f".{target.name}.{os.getpid()}.part")
    try:
        fs.get(remote, str(partial))  # streamed to disk: checkpoints are gigabytes
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)


def remove_dead_partials(folder: Path) -> None:
    """Partial files and staging folders whose process is gone (killed mid-fetch), or that name no process (an
    older version's)."""
    from tasks.store.objects import pid_alive

    for path in folder.glob(".*.part"):
        match = PARTIAL.match(path.name)
        if match and not (match["pid"] and pid_alive(int(match["pid"]))):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def evict_checkpoints(root: Path, keep: Path) -> None:
    """The least recently used cached checkpoints go until the cache is within its bound (``keep`` stays)."""
    limit = float(os.environ.get(CACHE_GB_ENV) or 20) * 2**30
    entries = []
    for folder in (p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        files = [f for f in folder.iterdir() if f.is_file()]
        used = max((f.stat().st_mtime for f in files), default=0.0)
        entries.append((used, sum(f.stat().st_size for f in files), folder))
    total = sum(size for _, size, _ in entries)
    for _, size, folder in sorted(entries, key=lambda entry: entry[0]):
        if total <= limit:
            break
        if folder != keep and size:  # a folder of no checkpoint yet may be another process's fetch in progress
            shutil.rmtree(folder, ignore_errors=True)
            total -= size


def _read_text(url: str) -> str | None:
    import fsspec

    from tasks.store.objects import storage_options

    try:
        with fsspec.open(url, "rt", **storage_options(url)) as handle:
            return handle.read()
    except FileNotFoundError:  # any other error (access denied, an outage) is the store's, not a missing run
        return None
