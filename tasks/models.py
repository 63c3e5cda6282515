"""Which models of a run would have random weights, and the guard that refuses them where real models are required.

Decided from the settings before anything loads: an unset model is a tiny random-weight one, an open_clip name
without pretrained weights is random initialisation, and a local model folder marked by :mod:`agents.tiny` is random
whatever its name. A hub model whose weights turn out missing when loaded is caught where it loads
(:class:`agents.pipeline.CaptionPipeline`).
"""

from __future__ import annotations

from collections.abc import Iterable

from pathgen.settings import Settings, SettingsError

# The factory's stages in their order; DEFAULT_STAGES run unless others are chosen (PathGen-LLaVA's data and
# training are asked for by name: --stages ...,instruct,train-llava).
STAGES = ("extract", "caption", "instruct", "train-clip", "evaluate", "train-llava")
DEFAULT_STAGES = ("extract", "caption", "train-clip", "evaluate")
MODEL_STAGES = STAGES
ROLES = ("describe", "revise", "summarize")


class RandomWeightsRefused(SettingsError):
    """``models.allow_random_weights`` is false and a model of the run would have random weights."""


def random_weight_models(settings: Settings, stages: Iterable[str], evaluate_model: str | None = None) -> list[str]:
    """One line per model of ``stages`` that would run with random weights, naming the setting that chooses it."""
    from tasks.clip.spec import parse_model_spec
    from tasks.clip.stages import start_spec
    from tasks.selection.embedding import embedding_spec

    stages = set(stages)
    unknown = stages - set(MODEL_STAGES)
    if unknown:
        raise ValueError(f"unknown stages {sorted(unknown)}; known: {', '.join(MODEL_STAGES)}")
    found = []
    if "extract" in stages and settings.selection.method == "representative":
        spec = embedding_spec(settings.embedding)
        if spec.random_weights:
            found.append(f"embedding.model / embedding.pretrained: {spec.label} has no pretrained weights")
    if "caption" in stages:
        found += _random_agents(settings)
    if "instruct" in stages:
        found += _random_instruct(settings)
    if "train-llava" in stages:
        found += _random_llava_language_model(settings)
    if "train-clip" in stages and start_spec(settings.clip).random_weights:
        found.append(f"clip.pretrained is unset: training would start {start_spec(settings.clip).label} from random")
    if "evaluate" in stages and evaluate_model and parse_model_spec(evaluate_model).random_weights:
        found.append(f"the evaluated model {evaluate_model} has no pretrained weights or checkpoint")
    return found


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
    """Raise :class:`RandomWeightsRefused` when random weights are not allowed and a model of ``stages`` has them."""
    if settings.models.allow_random_weights:
        return
    found = random_weight_models(settings, stages, evaluate_model)
    if found:
        raise RandomWeightsRefused(
            "models.allow_random_weights is false and this run would use random weights: "
            + "; ".join(found)
            + ". Set those models (see deploy/production.yaml), or models.allow_random_weights=true for a test run"
        )
