"""The A100 Kubernetes pool (deploy/pools/a100-kubernetes.json), rendered by the Kubernetes worker's own code.

prefect-kubernetes turns a work pool's base job template plus a deployment's (and a flow run's) job variables into
the Job it creates: ``KubernetesWorkerJobConfiguration.resolve_for_flow_run``, which the worker calls for every
flow run it submits (``from_template_and_values`` then ``prepare_for_flow_run``). These tests call exactly that,
with the Prefect API objects built in memory (no server, no cluster), and check the pod the Job would start: GPU
node selection, tolerations, nvidia.com/gpu limits and requests, image, the environment the worker adds
(PREFECT_API_URL, the flow run's id) and the command that runs the flow. The pool itself goes through the checks
the Prefect server makes on ``prefect work-pool create`` and on a deployment's job variables.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from fastapi import HTTPException
from kubernetes_asyncio.client import ApiClient
from prefect.client.schemas.objects import Flow, FlowRun, WorkPool
from prefect.client.schemas.responses import DeploymentResponse
from prefect.server.api.validation import (
    validate_job_variable_defaults_for_work_pool,
    validate_job_variables_for_deployment,
)
from prefect.server.schemas import actions as server_actions
from prefect.server.schemas import core as server_core
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.utilities.templating import find_placeholders
from prefect_kubernetes.worker import KubernetesWorker, KubernetesWorkerJobConfiguration

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE_PATH = ROOT / "deploy" / "pools" / "a100-kubernetes.json"
POOL = "pathgen-a100-k8s"
API_URL = "http://prefect-server.pathgen.svc.cluster.local:4200/api"
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
# The Kubernetes worker insists on these two in the pod template (see prefect_kubernetes.worker._get_base_job_manifest)
# although they are Job fields: the API server drops them there, and so do the Kubernetes client's models.
WORKER_REQUIRED_EXTRAS = {"parallelism": 1, "completions": 1}


def template() -> dict[str, Any]:
    return json.loads(TEMPLATE_PATH.read_text())


class _Api:
    """The two reads the worker makes while resolving a flow run's job configuration; any other call fails."""

    def __init__(self, deployment: DeploymentResponse, flow: Flow):
        self.deployment, self.flow = deployment, flow

    async def read_deployment(self, deployment_id: uuid.UUID) -> DeploymentResponse:
        assert deployment_id == self.deployment.id
        return self.deployment

    async def read_flow(self, flow_id: uuid.UUID) -> Flow:
        assert flow_id == self.flow.id
        return self.flow


def render(
    deployment_variables: dict[str, Any] | None = None, run_variables: dict[str, Any] | None = None
) -> tuple[KubernetesWorkerJobConfiguration, FlowRun, DeploymentResponse]:
    """The job configuration a Kubernetes worker of the pool builds for a run of the caption-k8s deployment."""
    flow = Flow(id=uuid.uuid4(), name="caption")
    deployment = DeploymentResponse(
        id=uuid.uuid4(),
        name="caption-k8s",
        flow_id=flow.id,
        work_pool_name=POOL,
        job_variables=deployment_variables or {},
        updated=datetime.now(UTC),
    )
    flow_run = FlowRun(
        id=uuid.uuid4(),
        name="crimson-otter",
        flow_id=flow.id,
        deployment_id=deployment.id,
        job_variables=run_variables or {},
    )
    work_pool = WorkPool(id=uuid.uuid4(), name=POOL, type="kubernetes", base_job_template=template())
    assert KubernetesWorker.job_configuration is KubernetesWorkerJobConfiguration
    with temporary_settings({PREFECT_API_URL: API_URL}):  # the worker's own setting, which its flow runs inherit
        configuration = asyncio.run(
            KubernetesWorker.job_configuration.resolve_for_flow_run(
                flow_run, client=_Api(deployment, flow), work_pool=work_pool, worker_name="k8s-worker-0"
            )
        )
    return configuration, flow_run, deployment


def pod_spec(configuration: KubernetesWorkerJobConfiguration) -> dict[str, Any]:
    return configuration.job_manifest["spec"]["template"]["spec"]


def env_of(container: dict[str, Any]) -> dict[str, str]:
    assert all(set(item) == {"name", "value"} for item in container["env"]), container["env"]
    names = [item["name"] for item in container["env"]]
    assert len(names) == len(set(names)), names
    return {item["name"]: item["value"] for item in container["env"]}


def as_kubernetes_job(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest read into the Kubernetes client's V1Job model and written back: a misspelt or misplaced field
    is dropped, a wrongly typed one fails."""

    async def roundtrip() -> dict[str, Any]:
        async with ApiClient() as api:
            job = api.deserialize(SimpleNamespace(data=json.dumps(manifest)), "V1Job")
            return api.sanitize_for_serialization(job)

    return asyncio.run(roundtrip())


def validate_deployment_variables(job_variables: dict[str, Any]) -> None:
    """The server's check of a deployment's job_variables against the pool (as on `prefect deploy`)."""
    pool = server_core.WorkPool(name=POOL, type="kubernetes", base_job_template=template())
    deployment = server_actions.DeploymentCreate(
        name="caption-k8s", flow_id=uuid.uuid4(), work_pool_name=POOL, job_variables=job_variables
    )
    asyncio.run(validate_job_variables_for_deployment(None, pool, deployment))


# -- the template ---------------------------------------------------------------------------------------------------


def test_template_keeps_the_kubernetes_worker_defaults_and_uses_every_variable():
    ours, default = template(), KubernetesWorker.get_default_base_job_template()
    # Everything the worker's own template has stays: its job_configuration fields and its variables.
    assert set(default["job_configuration"]) <= set(ours["job_configuration"])
    assert set(default["variables"]["properties"]) <= set(ours["variables"]["properties"])
    assert ours["variables"]["definitions"] == default["variables"]["definitions"]  # cluster_config's $ref
    for name, schema in default["variables"]["properties"].items():
        mine = ours["variables"]["properties"][name]
        for key in ("type", "anyOf", "enum", "additionalProperties", "minimum"):
            assert mine.get(key) == schema.get(key), (name, key)
    # Every placeholder is a variable, and every variable is used by the job configuration.
    placeholders = {p.name for p in find_placeholders(json.dumps(ours["job_configuration"]))}
    assert placeholders == set(ours["variables"]["properties"])
    manifest = json.dumps(ours["job_configuration"]["job_manifest"])
    for name in ("gpu_product", "gpus", "tolerations", "cpu_request", "cpu_limit", "memory_request", "memory_limit"):
        assert "{{ " + name + " }}" in manifest, name


def test_prefect_work_pool_create_accepts_the_template():
    """What the server checks on `prefect work-pool create --type kubernetes --base-job-template ...`."""
    pool = server_actions.WorkPoolCreate(name=POOL, type="kubernetes", base_job_template=template())
    assert pool.base_job_template == template()
    asyncio.run(validate_job_variable_defaults_for_work_pool(None, POOL, template()))
    # and a template naming an undeclared variable is refused by the same check
    broken = template()
    broken["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["priorityClassName"] = "{{ priority }}"
    with pytest.raises(ValueError, match="priority"):
        server_actions.WorkPoolCreate(name=POOL, type="kubernetes", base_job_template=broken)


# -- rendered by the worker -------------------------------------------------------------------------------------------


def test_deployment_gpu_values_render_into_the_pod():
    tolerations = [
        GPU_TOLERATION,
        {"key": "dedicated", "operator": "Equal", "value": "pathgen", "effect": "NoSchedule"},
    ]
    job_variables = {
        "gpus": 4,
        "gpu_product": "NVIDIA-A100-SXM4-40GB",
        "tolerations": tolerations,
        "image": "ghcr.io/pathgen-factory/worker-gpu:2024.06",
        "cpu_request": "32",
        "cpu_limit": "48",
        "memory_request": "320Gi",
        "memory_limit": "384Gi",
        "shm_size": "64Gi",
        "namespace": "pathgen-prod",
        "env": {"HF_HOME": "/models/hf"},
    }
    validate_deployment_variables(job_variables)
    configuration, flow_run, deployment = render(job_variables)
    manifest = configuration.job_manifest
    assert (manifest["apiVersion"], manifest["kind"]) == ("batch/v1", "Job")
    assert configuration.namespace == manifest["metadata"]["namespace"] == "pathgen-prod"
    assert manifest["metadata"]["generateName"] == f"{flow_run.name}-"
    assert manifest["spec"]["backoffLimit"] == 0
    assert manifest["spec"]["ttlSecondsAfterFinished"] == 3600

    pod = pod_spec(configuration)
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-40GB"}
    assert pod["tolerations"] == tolerations
    assert pod["restartPolicy"] == "Never"
    assert "serviceAccountName" not in pod  # unset: the namespace's default service account
    assert pod["volumes"] == [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "64Gi"}}]
    [container] = pod["containers"]
    assert container["name"] == "prefect-job"
    assert container["image"] == "ghcr.io/pathgen-factory/worker-gpu:2024.06"
    assert container["imagePullPolicy"] == "Always"
    assert container["resources"] == {
        "limits": {"nvidia.com/gpu": 4, "cpu": "48", "memory": "384Gi"},
        "requests": {"nvidia.com/gpu": 4, "cpu": "32", "memory": "320Gi"},
    }
    assert container["volumeMounts"] == [{"name": "dshm", "mountPath": "/dev/shm"}]
    assert container["envFrom"] == [{"secretRef": {"name": "pathgen-store", "optional": True}}]
    # The command the worker starts the flow run with; the run to execute comes from PREFECT__FLOW_RUN_ID.
    assert container["args"] == ["prefect", "flow-run", "execute"]
    env = env_of(container)
    assert env["PREFECT_API_URL"] == API_URL
    assert env["PREFECT__FLOW_RUN_ID"] == str(flow_run.id)
    assert env["PREFECT__DEPLOYMENT_ID"] == str(deployment.id)
    assert env["PREFECT__DEPLOYMENT_NAME"] == "caption-k8s"
    assert env["PREFECT__FLOW_NAME"] == "caption"
    assert env["PREFECT_FLOW_RUN_EXECUTE_SIGTERM_BEHAVIOR"] == "reschedule"  # backoffLimit 0: evicted runs come back
    assert env["HF_HOME"] == "/models/hf"
    assert "CUDA_VISIBLE_DEVICES" not in env  # the device plugin gives the container its GPUs

    labels = manifest["metadata"]["labels"]
    assert labels["prefect.io/flow-run-id"] == str(flow_run.id)
    assert labels["prefect.io/work-pool-name"] == POOL
    assert labels["prefect.io/deployment-name"] == "caption-k8s"
    assert manifest["spec"]["template"]["metadata"]["labels"] == labels

    # The Kubernetes client's own V1Job model reads the whole manifest, dropping nothing but the two fields the
    # worker requires in the pod template; quantities come back as strings.
    expected = json.loads(json.dumps(manifest))
    for key in WORKER_REQUIRED_EXTRAS:
        assert expected["spec"]["template"]["spec"].pop(key) == WORKER_REQUIRED_EXTRAS[key]
    for resources in expected["spec"]["template"]["spec"]["containers"][0]["resources"].values():
        resources["nvidia.com/gpu"] = str(resources["nvidia.com/gpu"])
    assert as_kubernetes_job(manifest) == expected


def test_pool_defaults_give_one_a100_80gb():
    configuration, flow_run, _ = render()
    pod = pod_spec(configuration)
    [container] = pod["containers"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
    assert pod["tolerations"] == [GPU_TOLERATION]
    assert container["resources"] == {
        "limits": {"nvidia.com/gpu": 1, "memory": "96Gi"},  # no CPU limit: no throttling of the data loaders
        "requests": {"nvidia.com/gpu": 1, "cpu": "8", "memory": "96Gi"},
    }
    assert container["image"] == "ghcr.io/pathgen-factory/worker-gpu:latest"
    assert container["args"] == ["prefect", "flow-run", "execute"]
    assert configuration.namespace == "pathgen"
    assert pod["volumes"][0]["emptyDir"]["sizeLimit"] == "16Gi"
    env = env_of(container)
    assert env["PREFECT_API_URL"] == API_URL
    assert env["PREFECT__FLOW_RUN_ID"] == str(flow_run.id)
    assert configuration.job_manifest["metadata"]["generateName"] == "crimson-otter-"


def test_a_flow_run_overrides_the_deployment_gpu_count():
    """`prefect deployment run caption/caption-k8s --job-variable gpus=2` on a deployment that asks for 4."""
    configuration, _, _ = render({"gpus": 4, "env": {"HF_HOME": "/models/hf"}}, {"gpus": 2, "env": {"X": "1"}})
    [container] = pod_spec(configuration)["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 2
    env = env_of(container)
    assert (env["HF_HOME"], env["X"]) == ("/models/hf", "1")


@pytest.mark.parametrize(
    "job_variables",
    [{"gpus": 0}, {"gpus": "two"}, {"gpu_product": 80}, {"tolerations": GPU_TOLERATION}, {"image_pull_policy": "x"}],
    ids=["no-gpu", "gpus-not-a-number", "product-not-a-string", "tolerations-not-a-list", "pull-policy"],
)
def test_the_server_refuses_bad_gpu_job_variables(job_variables):
    with pytest.raises(HTTPException) as raised:
        validate_deployment_variables(job_variables)
    assert raised.value.status_code == 422
