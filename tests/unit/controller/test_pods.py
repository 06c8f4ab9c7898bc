"""The worker Job and token Secret builders (controller.pods): what a platform engineer checks on the objects."""

from __future__ import annotations

import dataclasses
import json
import re
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


# ------------------------------------------------------------------ platform defaults (the chart's workers.pod)

#: What a platform engineer puts in the chart (workers.pod / workers.acceleratorPod), as the operator receives it.
PLATFORM = {
    "all": {
        "imagePullSecrets": [{"name": "regcred"}],
        "labels": {"team": "ml-platform", "app.kubernetes.io/name": "not-ours"},
        "annotations": {"sidecar.istio.io/inject": "false"},
        "priorityClassName": "batch-low",
        "affinity": {
            "nodeAffinity": {
                "preferredDuringSchedulingIgnoredDuringExecution": [
                    {
                        "weight": 1,
                        "preference": {"matchExpressions": [{"key": "spot", "operator": "In", "values": ["1"]}]},
                    }
                ]
            }
        },
        "nodeSelector": {"kubernetes.io/arch": "amd64", "pool": "batch"},
        "tolerations": [{"key": "batch", "operator": "Exists", "effect": "NoSchedule"}],
    },
    "nvidia": {
        "imagePullSecrets": ["nvcr"],
        "priorityClassName": "gpu-high",
        "runtimeClassName": "nvidia",
        "nodeSelector": {"pool": "gpu"},
    },
    "rocm": {"securityContext": {"supplementalGroups": [44, 110]}, "runtimeClassName": ""},
}


def platform_settings(raw: dict[str, Any] | None = None) -> pods.WorkerSettings:
    common, per = pods.parse_pod_defaults(json.dumps(raw if raw is not None else PLATFORM))
    return dataclasses.replace(SETTINGS, pod_defaults=common, accelerator_pod_defaults=per)


def platform_job(pool: Pool, *, queue: str | None = None) -> dict[str, Any]:
    s = spec(pool).model_copy(update={"queue_name": queue})
    return pods.worker_job(REF, s, pool, platform_settings())


def test_the_platforms_defaults_reach_every_worker_pod() -> None:
    job = platform_job(Pool(name="cpu"))
    pod = job["spec"]["template"]["spec"]
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["priorityClassName"] == "batch-low"
    assert "runtimeClassName" not in pod
    assert pod["affinity"] == PLATFORM["all"]["affinity"]
    assert pod["nodeSelector"] == {"kubernetes.io/arch": "amd64", "pool": "batch"}
    assert pod["tolerations"] == [{"key": "batch", "operator": "Exists", "effect": "NoSchedule"}]
    assert job["spec"]["template"]["metadata"]["annotations"] == {"sidecar.istio.io/inject": "false"}
    # Extra labels on the Job and its pods; the operator's own labels cannot be replaced.
    for labels in (job["metadata"]["labels"], job["spec"]["template"]["metadata"]["labels"]):
        assert labels["team"] == "ml-platform"
        assert labels["app.kubernetes.io/name"] == "mlds"
        assert labels[pods.LABEL_CAMPAIGN] == "ds1-parity"


def test_an_accelerators_defaults_merge_over_the_common_ones() -> None:
    """Maps merge key by key (accelerator wins), lists add up, priority/runtime class are replaced."""
    pod = platform_job(Pool(name="gpu", accelerator=Accelerator.nvidia))["spec"]["template"]["spec"]
    assert pod["imagePullSecrets"] == [{"name": "regcred"}, {"name": "nvcr"}]
    assert pod["priorityClassName"] == "gpu-high"
    assert pod["runtimeClassName"] == "nvidia"
    assert pod["nodeSelector"] == {"kubernetes.io/arch": "amd64", "pool": "gpu"}
    assert {t["key"] for t in pod["tolerations"]} == {"batch", "nvidia.com/gpu"}


def test_rocm_pods_can_join_the_render_group_without_losing_the_restricted_profile() -> None:
    pod = platform_job(Pool(name="mi300", accelerator=Accelerator.rocm))["spec"]["template"]["spec"]
    assert pod["securityContext"]["supplementalGroups"] == [44, 110]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["priorityClassName"] == "batch-low"  # the common default, as rocm sets none
    (c,) = pod["containers"]
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}


def test_a_pools_own_node_selector_and_tolerations_win_over_the_defaults() -> None:
    pool = Pool(
        name="gpu",
        accelerator=Accelerator.nvidia,
        node_selector={"pool": "a100-spot"},
        tolerations=[Toleration(key="spot", operator="Exists", effect="NoSchedule")],
        image="registry.example.com/own:1",
    )
    job = platform_job(pool)
    pod = job["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"kubernetes.io/arch": "amd64", "pool": "a100-spot"}
    assert [t["key"] for t in pod["tolerations"]] == ["spot", "batch", "nvidia.com/gpu"]
    assert container(job)["image"] == "registry.example.com/own:1"


@pytest.mark.parametrize("accelerator", list(Accelerator))
def test_jobs_with_every_default_set_are_valid_kubernetes_objects(accelerator: Accelerator) -> None:
    job = platform_job(Pool(name="p", accelerator=accelerator), queue="gpu-queue")
    kubernetes_validate.validate(job, "1.32", strict=True)


def test_no_defaults_make_the_same_job_as_before() -> None:
    """An operator upgrade with no defaults set must not replace running Jobs: the same manifest and hash."""
    pool = Pool(name="cpu")
    assert pods.worker_job(REF, spec(pool), pool, platform_settings({})) == job_for(pool)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        pytest.param("{", "not JSON", id="not-json"),
        pytest.param('{"gpu": {}}', "unknown key(s) gpu", id="unknown-accelerator"),
        pytest.param('{"all": {"nodeSelectors": {}}}', "all: unknown key(s) nodeSelectors", id="misspelt-key"),
        pytest.param('{"rocm": {"tolerations": {"key": "x"}}}', "rocm.tolerations", id="tolerations-not-a-list"),
        pytest.param('{"all": {"imagePullSecrets": [{"nam": "x"}]}}', "all.imagePullSecrets", id="secret-without-name"),
    ],
)
def test_bad_defaults_are_refused_with_the_key_that_is_wrong(raw: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        pods.parse_pod_defaults(raw)


# ---------------------------------------------------------------------------------------------- Kueue


def test_a_queued_pool_gets_the_kueue_label_and_starts_suspended() -> None:
    job = platform_job(Pool(name="gpu", accelerator=Accelerator.nvidia), queue="gpu-queue")
    assert job["metadata"]["labels"][pods.KUEUE_QUEUE_LABEL] == "gpu-queue"
    assert job["spec"]["suspend"] is True  # Kueue unsuspends it on admission
    assert pods.KUEUE_QUEUE_LABEL not in job["spec"]["template"]["metadata"]["labels"]


def test_a_pools_queue_wins_over_the_campaigns_and_no_queue_means_no_kueue() -> None:
    own = Pool(name="gpu", accelerator=Accelerator.nvidia, queue_name="gpu-queue")
    plain = Pool(name="cpu")
    s = spec(own, plain).model_copy(update={"queue_name": "cpu-queue"})
    assert pods.queue_name(s, own) == "gpu-queue"
    assert pods.queue_name(s, plain) == "cpu-queue"
    assert pods.queue_name(spec(plain), plain) is None
    assert pods.KUEUE_QUEUE_LABEL not in job_for(plain)["metadata"]["labels"]
    assert job_for(plain)["spec"]["suspend"] is False


def test_changing_the_queue_changes_the_template_hash() -> None:
    """Kueue refuses a new queue-name on a running Job: the operator replaces the Job instead."""
    pool = Pool(name="gpu", accelerator=Accelerator.nvidia)
    hashes = {
        q: pods.worker_job(REF, spec(pool).model_copy(update={"queue_name": q}), pool, SETTINGS)["metadata"][
            "annotations"
        ][pods.ANNOTATION_TEMPLATE]
        for q in (None, "a", "b")
    }
    assert len(set(hashes.values())) == 3
