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
    stages |= {"features_flow": "features", "train_mil_flow": "train-mil", "benchmark_flow": "evaluate"}
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


# -- the paper's profile (deploy/paper.yaml) and settings variants -------------------------------------------------

PAPER = ROOT / "deploy" / "paper.yaml"
RUN_STAGES = ["extract", "caption", "instruct", "train-clip", "train-llava"]


def test_the_paper_profile_and_its_clip_l_variant_load_as_a_run_loads_them():
    from pathgen.settings import load_settings
    from tasks.models import random_weight_models

    paper = load_settings(str(PAPER), environ={})
    large = _run_settings({"parameters": {"config": "deploy/paper.yaml#clip-l"}})  # as a deployment's parameter
    assert (paper.clip.model, paper.clip.pretrained, paper.clip.run) == ("ViT-B-16-quickgelu", "openai", None)
    assert (large.clip.model, large.clip.pretrained, large.clip.run) == ("ViT-L-14-336-quickgelu", "openai",
                                                                         "pathgen-clip-l")  # fmt: skip
    # The variant changes the CLIP model and its run's name, nothing else.
    assert large.model_dump(exclude={"clip"}) == paper.model_dump(exclude={"clip"})
    assert large.clip.model_dump(exclude={"model", "run"}) == paper.clip.model_dump(exclude={"model", "run"})
    assert (paper.clip.lr, paper.clip.weight_decay, paper.clip.batch_size, paper.clip.holdout_fraction) == (
        3e-5, 0.1, 384, 0.0)  # fmt: skip
    assert [paper.clip.stage1.epochs, paper.clip.stage2.epochs] == [1, 2] and paper.clip.stage2.external
    assert paper.clip.stage2.folder.startswith("/FILL-IN/") and paper.eval.root.startswith("/FILL-IN/")
    # PathGen-LLaVA's tower is the clip-l variant's last checkpoint, in this profile's store.
    tower = f"{paper.store}/models/clip/{large.clip.run}/stage2/checkpoints/epoch_{paper.clip.stage2.epochs}.pt"
    assert paper.llava.vision == tower
    assert (paper.llava.lr_stage1, paper.llava.lr_stage2) == (1e-3, 2e-5)
    assert (paper.patch.positions_box_px, paper.patch.positions_resample) == (672, False)
    assert (paper.selection.retrieval_top_k, paper.selection.duplicate_threshold) == (64, 0.88)
    assert (paper.eval.probe, paper.eval.suite, paper.eval.probe_shots) == ("paper", "paper", 256)
    assert paper.models.allow_random_weights is False
    for settings in (paper, large):
        assert random_weight_models(settings, RUN_STAGES) == []


def _arg(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


@pytest.mark.parametrize("devices", [1, 2, 4])
def test_the_paper_profile_trains_clip_on_a_global_batch_of_384_on_any_number_of_devices(devices, tmp_path):
    """What open_clip_train is given, as train-clip builds it: each device's share of the global batch."""
    import logging

    from pathgen.settings import load_settings
    from tasks.clip.stages import stage_plan, start_spec
    from tasks.clip.train import trainer_args

    settings = load_settings(str(PAPER), {"clip.devices": devices, "clip.work_dir": str(tmp_path)}, environ={})
    export = tmp_path / "export"
    export.mkdir()
    (export / "sizes.json").write_text(json.dumps({f"{i:06d}.tar": 1000 for i in range(8)}))
    for stage, epochs in (("stage1", 1), ("stage2", 2)):
        plan = stage_plan(settings, "run", stage, export, start_spec(settings.clip), logging.getLogger("test"))
        args = trainer_args(plan)
        assert int(_arg(args, "--batch-size")) == 384 // devices and plan.devices == devices
        assert (float(_arg(args, "--lr")), float(_arg(args, "--wd"))) == (3e-5, 0.1)
        assert (_arg(args, "--model"), _arg(args, "--pretrained")) == ("ViT-B-16-quickgelu", "openai")
        assert int(_arg(args, "--epochs")) == epochs


def test_a_global_clip_batch_is_shared_by_the_devices_and_lowered_to_the_pairs_there_are():
    import logging

    from pathgen.settings import SettingsError, load_settings
    from tasks.clip.train import fitted_batch

    logger = logging.getLogger("test")
    assert [fitted_batch(384, 10_000, devices, logger) for devices in (1, 2, 4, 8)] == [384, 192, 96, 48]
    assert fitted_batch(384, 200, 2, logger) == 100  # 100 pairs per device: the trainer drops partial batches
    assert fitted_batch(8, 3, 1, logger) == 3 and fitted_batch(8, 2, 2, logger) == 1  # a step holds two pairs or more
    with pytest.raises(SettingsError, match=r"clip\.batch_size 384 is the global batch.*clip\.devices 5.*380 or 385"):
        fitted_batch(384, 10_000, 5, logger)
    with pytest.raises(SettingsError, match=r"clip\.batch_size 384 is the global batch.*clip\.devices 5"):
        load_settings(str(PAPER), {"clip.devices": 5}, environ={})  # before any work


@pytest.mark.parametrize(("devices", "accumulation"), [(1, [16, 8]), (2, [8, 4]), (8, [2, 1])])
def test_the_paper_profile_trains_llava_on_llava_15s_global_batches(devices, accumulation, tmp_path):
    from pathgen.settings import load_settings
    from tasks.llava.stages import run_name, stage_plan
    from tasks.llava.vision import VisionSource

    settings = load_settings(str(PAPER), {"llava.devices": devices}, environ={})
    plans = [stage_plan(settings, "run", stage, tmp_path, tmp_path, False) for stage in ("stage1", "stage2")]
    assert [plan.grad_accum for plan in plans] == accumulation
    assert [plan.batch_size * plan.grad_accum * plan.devices for plan in plans] == [256, 128]
    assert [plan.lr for plan in plans] == [1e-3, 2e-5]
    # The global batches are in a run's name when set (they change the training), and only then.
    vision = VisionSource("open_clip", "tiny-random", True)
    unset = settings.llava.model_copy(update={"global_batch_stage1": None, "global_batch_stage2": None})
    assert run_name(settings.llava, "data", vision) != run_name(unset, "data", vision)


def test_a_llava_global_batch_that_does_not_divide_fails_naming_the_settings():
    from pathgen.settings import SettingsError, load_settings

    with pytest.raises(SettingsError, match=r"llava\.global_batch_stage1 256 is no multiple of llava\.batch_size x "
                                            r"llava\.devices \(16 x 3 = 48\): set it to 240 or 288"):  # fmt: skip
        load_settings(str(PAPER), {"llava.devices": 3}, environ={})
    with pytest.raises(SettingsError, match=r"llava\.grad_accum 2 would be ignored"):
        load_settings(str(PAPER), {"llava.grad_accum": 2}, environ={})
    one_stage = load_settings(None, {"llava.global_batch_stage2": 64, "llava.grad_accum": 2}, environ={})
    assert [one_stage.llava.grad_accum_of(stage) for stage in ("stage1", "stage2")] == [2, 4]


def test_a_config_variant_is_merged_over_its_file_and_is_never_a_setting(tmp_path, capsys):
    from pathgen.cli import main
    from pathgen.settings import SettingsError, load_settings

    config = tmp_path / "profile.yaml"
    config.write_text(
        "clip:\n  lr: 1.0e-4\n  batch_size: 64\n"
        "variants:\n  big:\n    clip:\n      batch_size: 256\n    selection:\n      max_per_slide: 8\n  empty:\n"
    )
    base, big = load_settings(str(config), environ={}), load_settings(f"{config}#big", environ={})
    assert (base.clip.lr, base.clip.batch_size, base.selection.max_per_slide) == (1e-4, 64, 256)
    assert (big.clip.lr, big.clip.batch_size, big.selection.max_per_slide) == (1e-4, 256, 8)
    assert load_settings(f"{config}#empty", environ={}) == base
    assert "variants" not in base.model_dump()
    # The environment and --set still win over a variant.
    assert load_settings(f"{config}#big", environ={"PATHGEN_CLIP__BATCH_SIZE": "16"}).clip.batch_size == 16
    assert load_settings(f"{config}#big", {"clip.batch_size": 32}, environ={}).clip.batch_size == 32
    with pytest.raises(SettingsError, match=r"has no variant 'huge' \(its variants: big, empty\)"):
        load_settings(f"{config}#huge", environ={})
    with pytest.raises(SettingsError, match=r"names no variant after '#'"):
        load_settings(f"{config}#", environ={})
    with pytest.raises(SettingsError, match=r"missing\.yaml' does not exist"):
        load_settings(f"{tmp_path / 'missing.yaml'}#big", environ={})
    for name, text, error in (
        ("plain.yaml", "clip:\n  lr: 1.0e-4\n", r"has no variant 'big' \(its variants: none\)"),
        ("list.yaml", "variants: [big]\n", r"variants must map each variant's name to settings"),
        ("nested.yaml", "variants:\n  big:\n    variants: {}\n", r"variant 'big' must be a mapping of settings"),
        ("scalar.yaml", "variants:\n  big: 3\n", r"variant 'big' must be a mapping of settings"),
    ):
        (tmp_path / name).write_text(text)
        with pytest.raises(SettingsError, match=error):
            load_settings(f"{tmp_path / name}#big", environ={})
    named = tmp_path / "a#b.yaml"  # a file whose own name holds '#' is that file
    named.write_text("clip:\n  lr: 2.0e-4\n")
    assert load_settings(str(named), environ={}).clip.lr == 2e-4
    # Every command takes it as its --config.
    assert main(["settings", "--config", f"{config}#big"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["clip"]["batch_size"] == 256
