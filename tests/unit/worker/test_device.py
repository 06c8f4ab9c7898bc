"""Vendor-neutral device choice: cpu/cuda/auto, ROCm told apart from NVIDIA, clear errors for missing GPUs."""

from __future__ import annotations

import pytest
import torch
from mlds_contract.campaign import Accelerator
from mlds_contract.errors import UserError
from mlds_worker import device as device_module
from mlds_worker.device import describe_device, device_for_accelerator, resolve_device


@pytest.fixture
def no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def two_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: f"Test GPU {index}")


@pytest.mark.usefixtures("no_gpu")
def test_auto_falls_back_to_the_cpu_without_a_gpu() -> None:
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.usefixtures("two_gpus")
def test_auto_and_cuda_pick_the_first_gpu_and_cuda_n_picks_n() -> None:
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("CUDA:1") == torch.device("cuda", 1)


@pytest.mark.usefixtures("two_gpus")
def test_a_gpu_index_beyond_the_visible_ones_is_a_user_error() -> None:
    with pytest.raises(UserError, match="only 2 GPU"):
        resolve_device("cuda:2")


@pytest.mark.usefixtures("no_gpu")
def test_asking_for_a_gpu_on_a_machine_without_one_is_a_user_error() -> None:
    with pytest.raises(UserError, match="sees no GPU"):
        resolve_device("cuda")


@pytest.mark.parametrize("choice", ["tpu", "gpu", "cuda:x", "meta"])
def test_unknown_device_names_are_user_errors(choice: str) -> None:
    with pytest.raises(UserError, match="device"):
        resolve_device(choice)


@pytest.mark.usefixtures("two_gpus")
@pytest.mark.parametrize(("hip", "vendor"), [(None, "nvidia"), ("6.2.41133", "rocm")], ids=["cuda-build", "rocm-build"])
def test_gpus_are_named_by_vendor_from_the_torch_build(
    monkeypatch: pytest.MonkeyPatch, hip: str | None, vendor: str
) -> None:
    monkeypatch.setattr(torch.version, "hip", hip, raising=False)
    info = describe_device("cuda:1")
    assert (info.torch_device, info.type, info.name) == ("cuda:1", vendor, "Test GPU 1")
    assert device_for_accelerator(Accelerator(vendor)) == torch.device("cuda", 0)


@pytest.mark.usefixtures("two_gpus")
def test_a_pool_whose_accelerator_disagrees_with_the_torch_build_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.version, "hip", None, raising=False)
    with pytest.raises(UserError, match="pool accelerator is rocm, but this torch build drives nvidia"):
        device_for_accelerator(Accelerator.rocm)


def test_the_cpu_is_described_by_its_model_name(monkeypatch: pytest.MonkeyPatch) -> None:
    info = describe_device("cpu")
    assert (info.torch_device, info.type) == ("cpu", "cpu")
    assert info.name
    assert device_for_accelerator(Accelerator.cpu) == torch.device("cpu")
    monkeypatch.setattr(device_module, "Path", _NoProcfs)
    monkeypatch.setattr("platform.processor", lambda: "")
    monkeypatch.setattr("platform.machine", lambda: "x86_64")
    assert device_module.cpu_name() == "x86_64"


class _NoProcfs:
    def __init__(self, *_: object) -> None:
        pass

    def read_text(self, **_: object) -> str:
        raise FileNotFoundError
