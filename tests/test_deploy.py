"""prefect.yaml and the work-pool templates stay consistent with the flows they name."""

import importlib
import inspect
import json
from pathlib import Path

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
        assert deployment["work_pool"]["name"] in {"pathgen-cpu", "pathgen-a100"}


def test_pool_templates_are_prefect_base_job_templates():
    for path in (ROOT / "deploy" / "pools").glob("*.json"):
        template = json.loads(path.read_text())
        assert set(template) == {"job_configuration", "variables"}, path.name
        assert "properties" in template["variables"], path.name
    a100 = json.loads((ROOT / "deploy" / "pools" / "a100-process.json").read_text())
    # Each worker's own CUDA_VISIBLE_DEVICES must reach its flow runs: the template may not set it (see
    # tests/test_parts_workers.py for the flow runs' environments rendered by the worker's own code).
    assert "CUDA_VISIBLE_DEVICES" not in a100["variables"]["properties"]["env"]["default"]
    k8s = json.loads((ROOT / "deploy" / "pools" / "a100-kubernetes.json").read_text())
    container = k8s["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" in container["resources"]["limits"]
