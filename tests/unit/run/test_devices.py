"""`mlds run`'s device plan: which device each worker trains on, from the pool and what torch sees.

Pure: the probe (what ``python -m mlds_worker.device`` prints) is given as data, so the GPU cases run
on CPU-only machines. The real refusal on a machine without a GPU is tested end to end in
tests/e2e/test_run_devices.py.
"""

from __future__ import annotations

import pytest
from mlds_contract.campaign import Accelerator, CampaignSpec, Pool, TrainingCampaign, Workload
from mlds_contract.errors import UserError
from mlds_operator.run.command import plan_devices


def campaign(accelerator: Accelerator) -> TrainingCampaign:
    spec = CampaignSpec(
        workload=Workload(dataset="ds1"), networks_per_target=1, pools=[Pool(name="gpu", accelerator=accelerator)]
    )
    return TrainingCampaign(metadata={"name": "c"}, spec=spec)


def probe(vendor: str = "nvidia", gpus: int = 2) -> dict[str, object]:
    return {"torch": "2.11.0+cu130", "vendor": vendor, "gpus": [f"NVIDIA H200 #{i}" for i in range(gpus)], "cpu": "x"}


def test_a_gpu_pool_trains_on_every_visible_gpu_in_turn() -> None:
    plan = plan_devices(campaign(Accelerator.nvidia), "auto", probe(gpus=2))
    assert plan.devices == ("cuda:0", "cuda:1")
    assert plan.accelerator is Accelerator.nvidia
    assert plan.description == "2 nvidia GPUs: cuda:0 NVIDIA H200 #0, cuda:1 NVIDIA H200 #1"


def test_a_rocm_pool_uses_the_cuda_device_type_of_a_rocm_build() -> None:
    plan = plan_devices(campaign(Accelerator.rocm), "auto", probe(vendor="rocm", gpus=1))
    assert plan.devices == ("cuda:0",)
    assert plan.accelerator is Accelerator.rocm


@pytest.mark.parametrize(
    ("accelerator", "seen", "says"),
    [
        (Accelerator.nvidia, probe(gpus=0), "pool 'gpu' asks for nvidia GPUs, but torch 2.11.0+cu130 sees none here"),
        (Accelerator.rocm, probe(vendor="nvidia", gpus=1), "this torch build (2.11.0+cu130) drives nvidia GPUs"),
    ],
    ids=["no-gpu", "wrong-vendor"],
)
def test_a_gpu_pool_without_its_gpu_is_refused_with_the_way_out(
    accelerator: Accelerator, seen: dict[str, object], says: str
) -> None:
    with pytest.raises(UserError, match="run with --device cpu to train on the CPU instead") as err:
        plan_devices(campaign(accelerator), "auto", seen)
    assert says in str(err.value)


def test_device_cpu_trains_a_gpu_pool_on_the_cpu_on_purpose() -> None:
    plan = plan_devices(campaign(Accelerator.nvidia), "cpu", None)
    assert plan.devices == ("cpu",)
    assert plan.accelerator is Accelerator.cpu
