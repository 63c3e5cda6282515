"""Which models of a run would have random weights, and the guard that refuses them where real models are required.

Decided from the settings before anything loads: an unset model is a tiny random-weight one, an open_clip name
without pretrained weights is random initialisation, and a local model folder marked by :mod:`agents.tiny` is random
whatever its name. A hub model whose weights turn out missing when loaded is caught where it loads
(:class:`agents.pipeline.CaptionPipeline`). The slide features' encoder is the one model read from the store: unset
(or a run name), it is the store's newest PathGen-CLIP, whose run record says whether it started from random weights,
and train-mil's features say in their manifest which encoder made them.

The same check then resolves every chosen stage's weights (:func:`resolve_model_weights`): an open_clip tag is
fetched into its cache, a hub model is found on the hub (or, offline or when the hub cannot be reached, in the
local cache), a file or folder must exist. Weights that cannot be had are infrastructure (:class:`ModelUnavailable`):
nothing starts, and every slide stays pending instead of failing one by one.
"""

from __future__ import annotations

from collections.abc import Iterable

from pathgen.errors import ModelUnavailable, redact_urls, short_error
from pathgen.settings import Settings, SettingsError

# The factory's stages in their order; DEFAULT_STAGES run unless others are chosen (PathGen-LLaVA's data and
# training, and the whole-slide path, are asked for by name: --stages ...,instruct,train-llava or
# --stages ...,features,train-mil). features comes after train-clip and evaluate: its default encoder is the newest
# PathGen-CLIP in the store, so in one run it features the slides with the model that run trained, and train-mil
# (whose default features are those of the current settings) finds exactly the features the run made.
STAGES = ("extract", "caption", "instruct", "train-clip", "evaluate", "features", "train-mil", "train-llava")
DEFAULT_STAGES = ("extract", "caption", "train-clip", "evaluate")
MODEL_STAGES = STAGES
ROLES = ("describe", "revise", "summarize")


class RandomWeightsRefused(SettingsError):
    """``models.allow_random_weights`` is false and a model of the run would have random weights."""


def random_weight_models(settings: Settings, stages: Iterable[str], evaluate_model: str | None = None) -> list[str]:
    """One line per model of ``stages`` that would run with random weights, naming the setting that chooses it."""
    from tasks.clip.spec import has_random_weights, parse_model_spec
    from tasks.clip.stages import start_spec
    from tasks.selection.embedding import embedding_spec

    stages = set(stages)
    unknown = stages - set(MODEL_STAGES)
    if unknown:
        raise ValueError(f"unknown stages {sorted(unknown)}; known: {', '.join(MODEL_STAGES)}")
    found = []
    if "extract" in stages and settings.selection.method == "representative":
        spec = embedding_spec(settings.embedding)
        if has_random_weights(spec):
            found.append(
                f"embedding.model / embedding.pretrained: {spec.label} has no pretrained weights (or was trained from "
                "random initialisation)"
            )
    if "caption" in stages:
        found += _random_agents(settings)
    if "instruct" in stages:
        found += _random_instruct(settings)
    if "train-llava" in stages:
        found += _random_llava_language_model(settings)
    if "train-clip" in stages and start_spec(settings.clip).random_weights:
        found.append(f"clip.pretrained is unset: training would start {start_spec(settings.clip).label} from random")
    if "evaluate" in stages and evaluate_model and has_random_weights(parse_model_spec(evaluate_model)):
        found.append(
            f"the evaluated model {evaluate_model} has no pretrained weights or checkpoint, or was trained from "
            "random initialisation"
        )
    if "features" in stages:
        found += _random_features_encoder(settings, "train-clip" in stages)
    if "train-mil" in stages and settings.mil.task:  # without a task the factory skips train-mil
        found += _random_mil_features(settings, stages)
    return found


def _random_features_encoder(settings: Settings, clip_trained_first: bool) -> list[str]:
    """The features encoder: ``features.encoder`` as :func:`tasks.features.encoder.resolve_encoder_spec` resolves
    it (unset: the store's newest PathGen-CLIP, else tiny-random). When train-clip runs first in the same factory
    run, an unset encoder is the model it trains, random exactly when its start is."""
    from tasks.clip.spec import TINY_RANDOM, has_random_weights, parse_model_spec
    from tasks.clip.stages import start_spec

    spec = settings.features.encoder
    if spec is None and clip_trained_first:
        start = start_spec(settings.clip)
        if not start.random_weights:
            return []
        return [f"features.encoder is unset: the PathGen-CLIP this run trains, started from random ({start.label})"]
    from tasks.features.encoder import resolve_encoder_spec
    from tasks.store.objects import Store

    store = Store(settings.store, settings.s3)
    resolved = resolve_encoder_spec(spec, store)
    if not has_random_weights(parse_model_spec(resolved)):
        return []
    if spec is None:
        return [
            f"features.encoder is unset and {store.uri('models/clip')} holds no PathGen-CLIP checkpoint: the "
            f"features would come from {resolved}"
            if resolved == TINY_RANDOM
            else f"features.encoder is unset: the newest PathGen-CLIP {resolved} was trained from random weights"
        ]
    return [f"features.encoder {spec}: {resolved} has no pretrained weights, or was trained from random weights"]


def _random_mil_features(settings: Settings, stages: set[str]) -> list[str]:
    """train-mil's features: a features hash in the store says in its manifest whether its encoder had random
    weights; unset, they are the features of these settings (the features stage's encoder, checked there when it
    runs in the same factory run). An h5 folder's encoder is read by train-mil itself (its files' attributes)."""
    from tasks.features.store import manifest_key
    from tasks.store.objects import Store

    source = settings.mil.features
    if source is None:
        if "features" in stages:
            return []
        return [f"train-mil (mil.features unset): {line}" for line in _random_features_encoder(settings, False)]
    store = Store(settings.store, settings.s3)
    if "/" in source or not store.exists(manifest_key(source)):
        return []  # an h5 folder, or a hash train-mil will name as missing
    encoder = store.read_json(manifest_key(source)).get("encoder") or {}
    if encoder.get("random_weights"):
        return [f"mil.features {source}: featured by {encoder.get('spec', '?')}, which has random weights"]
    return []


def _random_agents(settings: Settings) -> list[str]:
    from agents.backends import folder_random_weights

    found = []
    for role in ROLES:
        model = getattr(settings.agents, role).model
        if model is None:
            found.append(f"agents.{role}.model is unset (the tiny random-weight model)")
        elif reason := folder_random_weights(model):
            found.append(f"agents.{role}.model {model}: {reason}")
    return found


def _random_instruct(settings: Settings) -> list[str]:
    from agents.backends import folder_random_weights

    model = settings.instruct.model
    if model is None:
        return ["instruct.model is unset (the tiny random-weight model)"]
    reason = folder_random_weights(model)
    return [f"instruct.model {model}: {reason}"] if reason else []


def _random_llava_language_model(settings: Settings) -> list[str]:
    """The LLaVA language model; its vision tower may be the CLIP stage's output, so the train-llava flow checks that
    once the stages before it have run."""
    from agents.backends import folder_random_weights

    model = settings.llava.language_model
    if model is None:
        return ["llava.language_model is unset (the tiny random-weight LM)"]
    reason = folder_random_weights(model)
    return [f"llava.language_model {model}: {reason}"] if reason else []


def require_real_models(settings: Settings, stages: Iterable[str], evaluate_model: str | None = None) -> None:
    """Raise :class:`RandomWeightsRefused` when random weights are not allowed and a model of ``stages`` has them,
    then :class:`ModelUnavailable` when a model's weights cannot be resolved (before any work starts)."""
    stages = list(stages)
    if not settings.models.allow_random_weights:
        _refuse_random(settings, stages, evaluate_model)
    resolve_model_weights(settings, stages, evaluate_model)


def _refuse_random(settings: Settings, stages: list[str], evaluate_model: str | None) -> None:
    found = random_weight_models(settings, stages, evaluate_model)
    if found:
        raise RandomWeightsRefused(
            "models.allow_random_weights is false and this run would use random weights: "
            + "; ".join(found)
            + ". Set those models (see deploy/production.yaml), or models.allow_random_weights=true for a test run"
        )


def stage_weights(settings: Settings, stages: Iterable[str], evaluate_model: str | None = None) -> list[tuple]:
    """``(setting, kind, model)`` for each model of ``stages`` that has weights to fetch: kind ``open_clip`` (a
    ModelSpec) or ``hub`` (a hub id or local folder). Random-weight models and served models have none."""
    from tasks.clip.spec import parse_model_spec
    from tasks.clip.stages import start_spec
    from tasks.selection.embedding import embedding_spec

    stages = set(stages)
    found: list[tuple] = []
    if "extract" in stages and settings.selection.method == "representative":
        found.append(("embedding.model / embedding.pretrained", "open_clip", embedding_spec(settings.embedding)))
    if "caption" in stages:
        for role in ROLES:
            cfg = getattr(settings.agents, role)
            if cfg.model and cfg.backend != "openai":
                found.append((f"agents.{role}.model", "hub", cfg.model))
    if "instruct" in stages and settings.instruct.model and settings.instruct.backend != "openai":
        found.append(("instruct.model", "hub", settings.instruct.model))
    if "train-clip" in stages:
        found.append(("clip.model / clip.pretrained", "open_clip", start_spec(settings.clip)))
    if "evaluate" in stages and evaluate_model:
        found.append(("the evaluated model", "open_clip", parse_model_spec(evaluate_model)))
    encoder = settings.features.encoder
    if "features" in stages and encoder and ":" in encoder and "://" not in encoder:  # NAME:PRETRAINED (a run
        # name or a checkpoint URL is read from the store by the features flow, which says what it cannot find)
        found.append(("features.encoder", "open_clip", parse_model_spec(encoder)))
    if "train-llava" in stages:
        if settings.llava.vision:  # unset: the store's newest PathGen-CLIP checkpoint, checked by train-llava
            from tasks.llava.vision import vision_source

            source = vision_source(settings.llava.vision)
            kind = "open_clip" if source.kind == "open_clip" else "hub"
            model = parse_model_spec(source.text) if kind == "open_clip" else source.text
            found.append(("llava.vision", kind, model))
        if settings.llava.language_model:
            found.append(("llava.language_model", "hub", settings.llava.language_model))
    return found


def resolve_model_weights(settings: Settings, stages: Iterable[str], evaluate_model: str | None = None) -> None:
    """Fetch or find the weights of every model of ``stages``; :class:`ModelUnavailable` naming each one that cannot
    be had (a hub or network error, a missing model or file), so that nothing starts without them."""
    problems, seen = [], set()
    for setting, kind, model in stage_weights(settings, stages, evaluate_model):
        if (kind, model) in seen:
            continue
        seen.add((kind, model))
        try:
            _resolve_open_clip(model, settings) if kind == "open_clip" else _resolve_hub(str(model))
        except Exception as exc:  # noqa: BLE001 - every model's trouble is told at once
            label = model.label if kind == "open_clip" else model
            problems.append(redact_urls(f"{setting} {label}: {short_error(exc)}"))  # an endpoint's user:secret@
    if problems:
        raise ModelUnavailable(
            "the weights of these models cannot be fetched or found: "
            + "; ".join(problems)
            + ". Give the workers hub access (or pre-fill the hub cache, HF_HOME), or point the settings at local "
            "files, then run again: nothing was started and the work stays pending"
        )


def _resolve_open_clip(spec, settings: Settings) -> None:
    """An open_clip model's weights: a tag's file fetched into open_clip's cache, a checkpoint that exists."""
    from pathlib import Path

    from tasks.clip.spec import local_checkpoint

    if spec.name.startswith(("local-dir:", "hf-hub:")):
        if spec.name.startswith("local-dir:") and not Path(spec.name.removeprefix("local-dir:")).is_dir():
            raise FileNotFoundError(f"the open_clip folder {spec.name.removeprefix('local-dir:')} does not exist")
        if spec.name.startswith("hf-hub:"):
            _resolve_hub(spec.name.removeprefix("hf-hub:"))
        return
    if spec.random_weights or not spec.pretrained:
        return
    # Only here: importing open_clip (and torch, torchvision) takes seconds, which a run with nothing to fetch (the
    # tiny random-weight model, or every slide already done) should not pay before it starts.
    import open_clip

    from tasks.clip.spec import register_model_configs

    register_model_configs()
    if "://" in spec.pretrained and not spec.pretrained.startswith("file://"):
        local_checkpoint(spec.pretrained)  # fetched once into the local cache, as loading does
        return
    if spec.name not in open_clip.list_models():
        raise ValueError(f"open_clip has no model named {spec.name}; see open_clip.list_models()")
    tag_cfg = open_clip.get_pretrained_cfg(spec.name, spec.pretrained)
    if tag_cfg:
        open_clip.download_pretrained(tag_cfg)  # found in the cache, or fetched into it
        return
    path = spec.pretrained.removeprefix("file://")
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"{spec.pretrained!r} is neither an open_clip pretrained tag of {spec.name} "
            f"({', '.join(open_clip.list_pretrained_tags_by_model(spec.name)) or 'none'}) nor an existing file"
        )


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


def _resolve_hub(model_id: str) -> None:
    """A hub model: a local folder that exists, else a repository the hub lists with weight files, else (offline,
    or the hub cannot be reached) a snapshot with weight files in the local hub cache."""
    from pathlib import Path

    folder = Path(model_id).expanduser()
    if folder.exists() or model_id.startswith(("/", ".", "~")):
        if not folder.is_dir():
            raise FileNotFoundError(f"the model folder {model_id} does not exist")
        return
    from huggingface_hub import HfApi, constants

    if constants.HF_HUB_OFFLINE:
        _cached_snapshot(model_id)
        return
    try:
        info = HfApi().model_info(model_id)
    except Exception as exc:  # noqa: BLE001 - no answer, a 5xx or an auth error: the loaders fall back to the cache
        _cached_snapshot(model_id, exc)
        return
    names = [s.rfilename for s in info.siblings or []]
    if not any(n.endswith(WEIGHT_SUFFIXES) for n in names):
        raise FileNotFoundError(f"the hub repository {model_id} holds no weight files")


def _cached_snapshot(model_id: str, hub_error: BaseException | None = None) -> None:
    """The model's snapshot in the local hub cache (HF_HUB_CACHE), with weight files: what a worker without the hub
    loads. ``hub_error`` is why the hub itself was not asked or did not answer."""
    from pathlib import Path

    from huggingface_hub import snapshot_download

    why = (
        f"the hub cannot be reached ({short_error(hub_error)})" if hub_error else "the hub is offline (HF_HUB_OFFLINE)"
    )
    try:
        folder = Path(snapshot_download(model_id, local_files_only=True))
    except Exception as exc:  # noqa: BLE001 - not cached, whatever the library calls it
        raise FileNotFoundError(f"{why} and the local hub cache holds no snapshot of {model_id}") from exc
    if not any(p.name.endswith(WEIGHT_SUFFIXES) for p in folder.rglob("*")):
        raise FileNotFoundError(f"{why} and the local hub cache's snapshot of {model_id} holds no weight files")
