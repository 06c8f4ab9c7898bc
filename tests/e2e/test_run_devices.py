"""`mlds run` with a GPU pool, on whatever this machine is: it trains on the GPU, or says why not.

On a machine where torch sees no GPU (CI), an ``nvidia`` pool is refused with one line and exit 2
instead of training on the CPU without a word (as it used to), and ``--device cpu`` trains it on the
CPU on purpose and says so. Where torch does see an NVIDIA GPU, the same campaign trains on it and
says which.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.run_fixtures import activity, manifest_rows, reap, start_mlds, worker_env, write_campaign

pytestmark = pytest.mark.e2e


def probe() -> dict[str, object]:
    """What torch sees here, asked as `mlds run` asks it."""
    out = subprocess.run(
        [sys.executable, "-m", "mlds_worker.device"], capture_output=True, text=True, check=True, env=worker_env()
    ).stdout
    seen: dict[str, object] = json.loads(out)
    return seen


def nvidia_campaign(folder: Path) -> Path:
    path = write_campaign(folder / "gpu.yaml", name="gpu", networks_per_target=1, machines=["SingleInvertMachine"])
    doc = yaml.safe_load(path.read_text())
    doc["spec"]["pools"][0] |= {"name": "gpu", "accelerator": "nvidia"}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def test_an_nvidia_pool_without_a_gpu_is_refused_in_one_line(tmp_path: Path) -> None:
    seen = probe()
    if seen["gpus"]:
        pytest.skip("torch sees a GPU here: the refusal cannot happen")
    proc = start_mlds(["run", nvidia_campaign(tmp_path), "--store", "store"], cwd=tmp_path, tag="gpu")
    code = proc.wait(what="mlds run to refuse", progress=lambda: activity(tmp_path))
    assert code == 2, proc.describe()
    assert proc.stderr.splitlines() == [
        f"error: pool 'gpu' asks for nvidia GPUs, but torch {seen['torch']} sees none here; "
        "run with --device cpu to train on the CPU instead"
    ]
    assert not (tmp_path / "store").exists()


@pytest.mark.slow
def test_device_cpu_trains_an_nvidia_pool_on_the_cpu_and_says_so(tmp_path: Path) -> None:
    proc = start_mlds(
        ["run", nvidia_campaign(tmp_path), "--store", "store", "--device", "cpu", "-q"], cwd=tmp_path, tag="cpu"
    )
    code = proc.wait(what="mlds run to finish", progress=lambda: activity(tmp_path))
    assert code == 0, proc.describe()
    assert proc.stderr.startswith("gpu: training on the CPU, one thread per worker; ")
    assert [row["device_type"] for row in manifest_rows(tmp_path / "store" / "manifest.parquet")] == ["cpu"]
    assert reap(str(tmp_path), wait=True) == []
