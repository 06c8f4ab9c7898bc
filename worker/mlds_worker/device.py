"""Vendor-neutral device choice and naming for training.

Called by the trainer (to record what trained a network), by `mlds train --device`, by the worker
loop (which maps its pool's accelerator to a device) and, as ``python -m mlds_worker.device``, by `mlds run`
to learn which GPUs torch sees without importing torch itself. PyTorch's ROCm builds report AMD GPUs through
the ``cuda`` device type, so code asks for ``cuda`` on both vendors; what vendor it is comes from
``torch.version.hip`` (set on ROCm builds, ``None`` on CUDA builds), and is recorded in every result as
the device type ``nvidia`` or ``rocm`` (the names of :class:`mlds_contract.campaign.Accelerator`).
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path

import torch
from mlds_contract.campaign import Accelerator
from mlds_contract.errors import UserError

__all__ = [
    "DEVICE_CHOICES",
    "DeviceInfo",
    "cpu_name",
    "describe_device",
    "device_for_accelerator",
    "gpu_vendor",
    "probe",
    "resolve_device",
]

#: What `--device` accepts besides ``cuda:N``.
DEVICE_CHOICES: tuple[str, ...] = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class DeviceInfo:
    """A device as a result records it."""

    torch_device: str  # what torch calls it: "cpu", "cuda:0"
    type: str  # "cpu", "nvidia" or "rocm" (or torch's type name for anything else, e.g. "mps")
    name: str  # "NVIDIA H100 80GB HBM3", "AMD EPYC 7B13", ...


def resolve_device(choice: str) -> torch.device:
    """Turn ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` into a device that exists here.

    ``auto`` picks the first GPU when torch sees one (NVIDIA or AMD), else the CPU. Asking for a GPU
    that is not there is a :class:`UserError` (a wrong flag, not a crash).
    """
    text = choice.strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError as exc:
        raise UserError(f"unknown device {choice!r}; expected auto, cpu, cuda or cuda:N") from exc
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise UserError(f"unsupported device {choice!r}; expected auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise UserError(f"device {choice!r} asked for, but this torch build sees no GPU (torch {torch.__version__})")
    count = torch.cuda.device_count()
    index = device.index if device.index is not None else 0
    if index >= count:
        raise UserError(f"device {choice!r} asked for, but only {count} GPU(s) are visible")
    return torch.device("cuda", index)


def device_for_accelerator(accelerator: Accelerator) -> torch.device:
    """The device a worker of a pool with this accelerator trains on; raises :class:`UserError` on a mismatch.

    A pool says nvidia or rocm; the torch build in the image must agree, or every unit would silently
    train on the wrong thing (or the CPU).
    """
    if accelerator is Accelerator.cpu:
        return torch.device("cpu")
    device = resolve_device("cuda")
    vendor = gpu_vendor()
    if vendor != accelerator.value:
        raise UserError(f"pool accelerator is {accelerator.value}, but this torch build drives {vendor} GPUs")
    return device


def gpu_vendor() -> str:
    """``rocm`` on a ROCm build of torch, else ``nvidia`` (the only other build with a ``cuda`` device)."""
    return "rocm" if getattr(torch.version, "hip", None) else "nvidia"


def describe_device(device: torch.device | str) -> DeviceInfo:
    """Type and human name of ``device``, as recorded in a result's meta.json."""
    device = torch.device(device)
    if device.type == "cpu":
        return DeviceInfo(torch_device="cpu", type="cpu", name=cpu_name())
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return DeviceInfo(torch_device=f"cuda:{index}", type=gpu_vendor(), name=str(torch.cuda.get_device_name(index)))
    return DeviceInfo(torch_device=str(device), type=device.type, name=device.type)


def cpu_name() -> str:
    """The CPU model ("AMD EPYC 7B13"), from /proc/cpuinfo on Linux, else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "Hardware") and value.strip():
                return value.strip()
    except OSError:
        pass  # not Linux, or no procfs: fall back below
    return platform.processor() or platform.machine() or "cpu"


def probe() -> dict[str, object]:
    """What torch sees here, as JSON-ready data: `mlds run` asks this of a subprocess (it imports no torch)."""
    gpus = [str(torch.cuda.get_device_name(i)) for i in range(torch.cuda.device_count())]
    return {"torch": torch.__version__, "vendor": gpu_vendor(), "gpus": gpus, "cpu": cpu_name()}


if __name__ == "__main__":  # `python -m mlds_worker.device`: the probe of `mlds run` (mlds_operator.run.command)
    import json

    print(json.dumps(probe()))
