"""prefect.yaml and the work-pool templates stay consistent with the flows they name."""

import importlib
import inspect
import json
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_every_deployment_names_a_flow_and_valid_parameters():
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    assert spec["deployments"]
    for deployment in spec["deployments"]:
        module_path, flow_name = deployment["entrypoint"].split(":")
        module = importlib.import_module(module_path.removesuffix(".py").replace("/", "."))
        flow = getattr(module, flow_name)
        signature = inspect.signature(flow.fn)
        signature.bind(**deployment.get("parameters", {}))  # raises on an unknown or missing parameter
        assert deployment["work_pool"]["name"] in {"pathgen-cpu", "pathgen-a100", "pathgen-a100-k8s"}


def test_pool_templates_are_prefect_base_job_templates():
    for path in (ROOT / "deploy" / "pools").glob("*.json"):
        template = json.loads(path.read_text())
        assert set(template) == {"job_configuration", "variables"}, path.name
        assert "properties" in template["variables"], path.name
    a100 = json.loads((ROOT / "deploy" / "pools" / "a100-process.json").read_text())
    # Each worker's own CUDA_VISIBLE_DEVICES must reach its flow runs: the template may not set it (see
    # tests/test_parts_workers.py for the flow runs' environments rendered by the worker's own code).
    assert "CUDA_VISIBLE_DEVICES" not in a100["variables"]["properties"]["env"]["default"]
    # a100-kubernetes.json: rendered into Kubernetes Jobs by the Kubernetes worker's own code in tests/test_k8s.py.


# -- the settings each deployment and schedule would run with ------------------------------------------------------


def _deployments() -> dict[str, dict]:
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    return {d["name"]: d for d in spec["deployments"]}


def _run_settings(deployment: dict):
    """What a flow run of ``deployment`` loads: its parameters, with the config path as the pull step's folder sees
    it (the repository root), and no PATHGEN_ variables from this machine."""
    from pathgen.settings import load_settings

    params = deployment.get("parameters", {})
    overrides = dict(params.get("overrides") or {})
    if params.get("store"):
        overrides["store"] = params["store"]
    config = str(ROOT / params["config"]) if params.get("config") else None
    return load_settings(config, overrides, environ={})


def _stages(deployment: dict) -> list[str]:
    flow = deployment["entrypoint"].split(":")[1]
    if flow == "factory_flow":
        return deployment.get("parameters", {}).get("stages") or ["extract", "caption", "train-clip", "evaluate"]
    stages = {"extract_flow": "extract", "caption_flow": "caption", "train_clip_flow": "train-clip"}
    stages |= {"instruct_flow": "instruct", "train_llava_flow": "train-llava", "evaluate_flow": "evaluate"}
    stages |= {"features_flow": "features", "train_mil_flow": "train-mil"}
    return [stages[flow]]


STORE_CHECKED = {"features", "train-mil"}  # their encoder is the store's newest PathGen-CLIP: checked with a store


def test_every_deployment_and_schedule_runs_with_real_models():
    from tasks.models import random_weight_models

    for name, deployment in _deployments().items():
        settings = _run_settings(deployment)
        assert deployment["parameters"].get("config") == "deploy/production.yaml", name
        assert settings.models.allow_random_weights is False, name
        if STORE_CHECKED & set(_stages(deployment)):
            continue  # test_whole_slide_deployments_use_the_stores_pathgen_clip: against a store that holds one
        assert random_weight_models(settings, _stages(deployment)) == [], name
        assert settings.store.startswith("s3://"), name


def test_production_without_a_model_fails_naming_its_setting():
    from pathgen.settings import load_settings
    from tasks.models import RandomWeightsRefused, require_real_models

    settings = load_settings(str(ROOT / "deploy" / "production.yaml"), {"agents.revise.model": None}, environ={})
    with pytest.raises(RandomWeightsRefused, match=r"agents\.revise\.model is unset"):
        require_real_models(settings, ["caption"])
    settings = load_settings(str(ROOT / "deploy" / "production.yaml"), {"embedding.pretrained": None}, environ={})
    with pytest.raises(RandomWeightsRefused, match=r"embedding\.model / embedding\.pretrained: ViT-L-14-336"):
        require_real_models(settings, ["extract"])


def test_regeneration_skips_committed_work_and_recaption_changes_only_the_describe_model():
    from agents.identity import agents_hash, hash_inputs, identities
    from tasks.slides.hashing import slide_extraction_hash
    from tasks.slides.sources import SlideRef

    deployments = _deployments()
    ref = SlideRef("TCGA-XX-0001", "s3://pathgen-slides/tcga/TCGA-XX-0001.svs", "s3://pathgen-slides/tcga/")
    extract, regen = _run_settings(deployments["extract"]), _run_settings(deployments["factory-weekly-regeneration"])
    # The weekly run extracts with exactly the settings the slides were extracted with: committed slides are skipped.
    assert slide_extraction_hash(ref, regen) == slide_extraction_hash(ref, extract)
    assert regen.sources == extract.sources == deployments["extract"]["parameters"]["sources"]

    def agents_of(settings):
        found = identities(settings.agents, settings.retries)
        return agents_hash(settings.agents, found), hash_inputs(settings.agents, found)

    caption, regen_agents = agents_of(_run_settings(deployments["caption"])), agents_of(regen)
    assert regen_agents[0] == caption[0]  # it captions what is pending, into the same pairs/<agents_hash>/
    recaption = agents_of(_run_settings(deployments["recaption-new-describe-model"]))
    assert recaption[0] != caption[0]  # a new agents_hash: new pairs beside the old
    changed = {key for key in caption[1] if caption[1][key] != recaption[1][key]}
    roles = {name for name in caption[1]["roles"] if caption[1]["roles"][name] != recaption[1]["roles"][name]}
    assert (changed, roles) == ({"roles"}, {"describe"})


# -- the whole-slide deployments: features and train-mil ----------------------------------------------------------


def _clip_run(store_root: Path, run: str, random_start: bool) -> None:
    """A PathGen-CLIP run as train-clip leaves it in the store: run.json, the stage's params.txt, a checkpoint."""
    stage = store_root / "models" / "clip" / run / "stage1"
    (stage / "checkpoints").mkdir(parents=True)
    (stage.parent / "run.json").write_text(json.dumps({"random_weights": random_start}))
    (stage / "params.txt").write_text("model: ViT-B-16\npretrained: " + ("None" if random_start else "openai") + "\n")
    (stage / "checkpoints" / "epoch_1.pt").write_bytes(b"weights")


def test_whole_slide_deployments_use_the_stores_pathgen_clip(tmp_path: Path) -> None:
    """features and train-mil run with production settings: their encoder is the store's newest PathGen-CLIP, so
    they are refused while the store holds none (or one trained from random weights), naming features.encoder, and
    run once it holds one trained from real weights."""
    from tasks.models import RandomWeightsRefused, random_weight_models, require_real_models

    deployments = _deployments()
    for name in ("features", "train-mil"):
        assert STORE_CHECKED & set(_stages(deployments[name])), name
        store = tmp_path / name
        store.mkdir()
        deployment = dict(deployments[name], parameters={**deployments[name]["parameters"], "store": str(store)})
        settings = _run_settings(deployment)
        assert settings.mil.task and settings.features.encoder is None
        with pytest.raises(RandomWeightsRefused, match=r"features\.encoder is unset and .* holds no PathGen-CLIP"):
            require_real_models(settings, _stages(deployment))
        _clip_run(store, "from-random", random_start=True)
        found = random_weight_models(settings, _stages(deployment))
        assert len(found) == 1 and "from-random" in found[0] and "trained from random" in found[0], found
        time.sleep(0.01)  # the newer run's checkpoint is the newest
        _clip_run(store, "from-openai", random_start=False)
        assert random_weight_models(settings, _stages(deployment)) == [], name


def test_train_mil_on_features_of_a_random_encoder_is_refused(tmp_path: Path) -> None:
    from pathgen.settings import load_settings
    from tasks.features.store import manifest_key
    from tasks.models import random_weight_models
    from tasks.store.objects import Store

    store = Store(str(tmp_path / "store"))
    for features_hash, random_weights in (("a" * 16, True), ("b" * 16, False)):
        encoder = {"spec": f"encoder-{features_hash[0]}", "random_weights": random_weights}
        store.write_json(manifest_key(features_hash), {"encoder": encoder})
    production = str(ROOT / "deploy" / "production.yaml")
    for features_hash, expected in (("a" * 16, ["encoder-a"]), ("b" * 16, [])):
        overrides = {"store": store.url, "mil.features": features_hash}
        found = random_weight_models(load_settings(production, overrides, environ={}), ["train-mil"])
        assert [line.split("featured by ")[1].split(",")[0] for line in found] == expected, found
    unset_task = load_settings(production, {"store": store.url, "mil.task": None}, environ={})
    assert random_weight_models(unset_task, ["train-mil"]) == []  # no task: the factory skips train-mil
