"""The worker Job and token Secret builders (controller.pods): what a platform engineer checks on the objects."""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest
from mlds_contract.campaign import Accelerator, CampaignSpec, Pool, Toleration, Workload
from mlds_contract.errors import ExitCode
from mlds_operator.controller import pods

REF = pods.CampaignRef(name="ds1-parity", namespace="research", uid="0b9e-uid")
SETTINGS = pods.WorkerSettings(
    lease_base_url="http://mlds-operator.mlds-system.svc:8080",
    images=pods.default_images("0.1.0"),
)


def spec(*pools: Pool, suspend: bool = False) -> CampaignSpec:
    return CampaignSpec(
        workload=Workload(dataset="ds1", machines=["ParityMachine"]),
        networks_per_target=10,
        pools=list(pools) or [Pool(name="cpu")],
        suspend=suspend,
    )


def job_for(pool: Pool, *, suspend: bool = False) -> dict[str, Any]:
    return pods.worker_job(REF, spec(pool, suspend=suspend), pool, SETTINGS)


def container(job: dict[str, Any]) -> dict[str, Any]:
    (only,) = job["spec"]["template"]["spec"]["containers"]
    return dict(only)


def env(job: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container(job)["env"]}


# ------------------------------------------------------------------------------ accelerators


@pytest.mark.parametrize(
    ("accelerator", "image", "gpu_key", "device"),
    [
        pytest.param(Accelerator.cpu, "ghcr.io/mlds/worker:0.1.0-cpu", None, "cpu", id="cpu-pool-runs-the-cpu-image"),
        pytest.param(
            Accelerator.nvidia,
            "ghcr.io/mlds/worker:0.1.0-cuda",
            "nvidia.com/gpu",
            "cuda",
            id="nvidia-pool-asks-for-an-nvidia-gpu",
        ),
        pytest.param(
            Accelerator.rocm,
            "ghcr.io/mlds/worker:0.1.0-rocm",
            "amd.com/gpu",
            "cuda",
            id="rocm-pool-asks-for-an-amd-gpu",
        ),
    ],
)
def test_each_accelerator_gets_its_image_device_and_gpu(
    accelerator: Accelerator, image: str, gpu_key: str | None, device: str
) -> None:
    job = job_for(Pool(name="p", accelerator=accelerator))
    c = container(job)
    assert c["image"] == image
    assert env(job)["MLDS_DEVICE"] == device
    assert env(job)["MLDS_ACCELERATOR"] == accelerator.value
    limits = c["resources"]["limits"]
    gpu_limits = {k: v for k, v in limits.items() if k.endswith("/gpu")}
    if gpu_key is None:
        assert gpu_limits == {}
        assert env(job)["OMP_NUM_THREADS"] == "1"
    else:
        assert gpu_limits == {gpu_key: 1}
        assert "OMP_NUM_THREADS" not in env(job)
        tolerations = job["spec"]["template"]["spec"]["tolerations"]
        assert {"key": gpu_key, "operator": "Exists", "effect": "NoSchedule"} in tolerations


def test_a_pool_can_ask_for_more_gpus_and_its_own_image() -> None:
    pool = Pool(
        name="big",
        accelerator=Accelerator.nvidia,
        image="registry.example/mlds/worker:custom",
        resources={"requests": {"nvidia.com/gpu": 2, "cpu": "4"}, "limits": {"memory": "16Gi"}},
    )
    c = container(job_for(pool))
    assert c["image"] == "registry.example/mlds/worker:custom"
    assert c["resources"] == {
        "requests": {"nvidia.com/gpu": 2, "cpu": "4"},
        "limits": {"memory": "16Gi", "nvidia.com/gpu": 2},
    }


@pytest.mark.parametrize(
    ("resources", "threads"),
    [
        pytest.param(None, "1", id="default-resources-one-core"),
        pytest.param({"limits": {"cpu": "500m"}}, "1", id="half-a-core-rounds-up-to-one"),
        pytest.param({"limits": {"cpu": "2"}}, "2", id="two-cores"),
        pytest.param({"limits": {"cpu": "2.5"}}, "3", id="fractional-cores-round-up"),
        pytest.param({"limits": {"cpu": 4}}, "4", id="a-number-not-a-string"),
        pytest.param({"limits": {"cpu": "3500m"}}, "4", id="millicores"),
        pytest.param({"requests": {"cpu": "8"}}, "1", id="requests-without-a-limit-mean-one-thread"),
    ],
)
def test_cpu_workers_get_one_thread_per_core_of_their_limit(resources: dict[str, Any] | None, threads: str) -> None:
    e = env(job_for(Pool(name="cpu", resources=resources)))
    assert e["OMP_NUM_THREADS"] == threads
    assert e["MKL_NUM_THREADS"] == threads


def test_node_selector_and_tolerations_reach_the_pods_without_duplicating_the_gpu_toleration() -> None:
    pool = Pool(
        name="a100",
        accelerator=Accelerator.nvidia,
        node_selector={"gpu": "a100"},
        tolerations=[Toleration(key="nvidia.com/gpu", operator="Exists"), Toleration(key="spot", value="true")],
    )
    pod = job_for(pool)["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"gpu": "a100"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists"}, {"key": "spot", "value": "true"}]


# ----------------------------------------------------------------------------- the pod's shape


def test_workers_reach_the_lease_api_with_a_mounted_token_and_their_pod_name() -> None:
    job = job_for(Pool(name="cpu", units_per_lease=8))
    e = env(job)
    assert e["MLDS_LEASE_URL"] == "http://mlds-operator.mlds-system.svc:8080/v1/campaigns/research/ds1-parity"
    assert e["MLDS_TOKEN_FILE"] == "/var/run/mlds/token"
    assert e["MLDS_POOL"] == "cpu"
    assert e["MLDS_UNITS_PER_LEASE"] == "8"
    assert e["POD_NAME"] == {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.name"}}
    assert container(job)["command"] == ["mlds", "worker"]
    volumes = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
    assert volumes["token"]["secret"]["secretName"] == "ds1-parity-lease-token"
    assert not any("token" in str(v.get("value", "")) and v["name"] != "MLDS_TOKEN_FILE" for v in container(job)["env"])


def test_pods_run_under_the_restricted_security_profile() -> None:
    job = job_for(Pool(name="cpu"))
    pod = job["spec"]["template"]["spec"]
    c = container(job)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    assert c["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    assert {e["name"]: e.get("value") for e in c["env"]}["HOME"] == "/tmp"


def test_the_job_runs_replicas_workers_until_they_drain_the_campaign() -> None:
    job = job_for(Pool(name="cpu", replicas=7), suspend=True)
    s = job["spec"]
    assert s["parallelism"] == 7
    assert "completions" not in s  # workers exit 0 when the campaign is drained; that completes the Job
    assert s["suspend"] is True
    assert s["template"]["spec"]["restartPolicy"] == "Never"
    rules = s["podFailurePolicy"]["rules"]
    assert rules[0] == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    assert rules[1]["action"] == "FailJob"
    # `mlds worker` exits ExitCode.config for a configuration error a new pod would repeat.
    assert rules[1]["onExitCodes"]["values"] == [ExitCode.config] == [2]


def test_what_the_operator_makes_is_owned_by_the_campaign_and_labelled() -> None:
    job = job_for(Pool(name="cpu"))
    secret = pods.token_secret(REF, "s3cr3t", plan_hash="abc")
    for obj in (job, secret):
        meta = obj["metadata"]
        assert meta["namespace"] == "research"
        assert meta["ownerReferences"] == [
            {
                "apiVersion": "mlds.dev/v1alpha1",
                "kind": "TrainingCampaign",
                "name": "ds1-parity",
                "uid": "0b9e-uid",
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
        assert meta["labels"][pods.LABEL_CAMPAIGN] == "ds1-parity"
        assert meta["labels"]["app.kubernetes.io/managed-by"] == "mlds-operator"
    assert job["metadata"]["labels"][pods.LABEL_POOL] == "cpu"
    assert job["spec"]["template"]["metadata"]["labels"][pods.LABEL_POOL] == "cpu"


@pytest.mark.parametrize("accelerator", list(Accelerator), ids=lambda a: f"{a.value}-job")
def test_jobs_and_secrets_are_valid_kubernetes_objects(accelerator: Accelerator) -> None:
    pool = Pool(
        name="p",
        accelerator=accelerator,
        node_selector={"pool": "x"},
        tolerations=[Toleration(key="spot", operator="Exists", effect="NoSchedule")],
    )
    kubernetes_validate.validate(job_for(pool), "1.32", strict=True)
    kubernetes_validate.validate(pods.token_secret(REF, "t", plan_hash="h"), "1.32", strict=True)


# ----------------------------------------------------------------------------- names, hashes


def test_template_hash_ignores_what_is_patched_in_place_and_sees_the_rest() -> None:
    base = job_for(Pool(name="cpu", replicas=2))
    annotation = pods.ANNOTATION_TEMPLATE
    assert (
        job_for(Pool(name="cpu", replicas=9), suspend=True)["metadata"]["annotations"][annotation]
        == (base["metadata"]["annotations"][annotation])
    )
    other = job_for(Pool(name="cpu", replicas=2, image="elsewhere/worker:1"))
    assert other["metadata"]["annotations"][annotation] != base["metadata"]["annotations"][annotation]


@pytest.mark.parametrize(
    "campaign",
    [
        pytest.param("ds1-parity", id="short-name-kept"),
        pytest.param("a-very-long-campaign-name-" + "x" * 60, id="long-name-cut-and-hashed"),
    ],
)
def test_names_fit_kubernetes_limits_and_stay_distinct(campaign: str) -> None:
    name = pods.job_name(campaign, "nvidia-a100")
    assert len(name) <= 52
    assert name.endswith("-nvidia-a100")
    assert pods.job_name(campaign, "cpu") != pods.job_name(campaign + "y", "cpu")
    assert len(pods.campaign_label(campaign)) <= 63
    if len(campaign) < 40:
        assert name == f"{campaign}-nvidia-a100"
        assert pods.campaign_label(campaign) == campaign


def test_the_token_survives_the_round_trip_through_its_secret() -> None:
    secret = pods.token_secret(REF, "tok-123", plan_hash="h")
    assert pods.token_from_secret(secret) == "tok-123"
    assert secret["metadata"]["annotations"][pods.ANNOTATION_PLAN] == "h"
    assert pods.token_from_secret(None) is None
    assert pods.token_from_secret({"data": {"token": "not base64!"}}) is None
    assert pods.token_from_secret({"data": {}}) is None


def test_default_lease_url_is_the_operator_service_in_its_namespace() -> None:
    assert pods.default_lease_base_url("mlds-system") == "http://mlds-operator.mlds-system.svc:8080"
