"""A ds4 campaign finishes with only the operator's dependencies importable.

When a campaign's last unit is verified, the lease service writes ``data/<target>.npz``, the data every
network of the target was trained on (docs/workloads.md §9). The operator image has no torch, no scikit-learn
(so no scipy) and no worker package, so this test runs the real :class:`CampaignService` over a
:class:`LocalStore` in a child process where importing any of those raises ``ModuleNotFoundError``
(a meta-path blocker installed before anything else is imported), completes every unit through the
real staging-and-verification path, and checks that the data files are written and hold ds4's images.
The result files are fabricated the way the other service tests fabricate them (tests/api_fixtures.py):
what is under test is the finalisation, not training.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
#: What the operator image does not install (Dockerfile.worker, target operator), by top-level name.
BLOCKED = ("torch", "sklearn", "scipy", "mlds_worker")

CHILD = textwrap.dedent(
    """
    import importlib.abc
    import sys


    class Blocker(importlib.abc.MetaPathFinder):
        # Refuse these top-level packages as if they were not installed.
        def __init__(self, names):
            self.names = frozenset(names)

        def find_spec(self, fullname, path=None, target=None):
            if fullname.partition(".")[0] in self.names:
                raise ModuleNotFoundError(f"No module named {fullname!r} (blocked)", name=fullname)
            return None


    sys.meta_path.insert(0, Blocker(sys.argv[2].split(",")))

    import asyncio
    import json
    from pathlib import Path

    from mlds_contract.campaign import CampaignSpec, Phase
    from mlds_contract.lease import CompleteRequest, LeaseGrant, LeaseRequest
    from mlds_operator.leases.service import CampaignService
    from mlds_operator.storage import manifest as mf
    from mlds_operator.storage.store import LocalStore
    from mlds_workloads import ImageData, load_data

    from tests.api_fixtures import FakeClock, digests, result_files

    POOL = "cpu"


    async def main(root: Path) -> dict[str, object]:
        store = LocalStore(root, upload_base_url="http://127.0.0.1:9", secret=b"s" * 32, durable=False)
        spec = CampaignSpec.model_validate(
            {"workload": {"dataset": "ds4", "variants": ["clean", "pixel"]}, "networksPerTarget": 2}
        )
        service = await CampaignService.open("digits", spec, store, token="t" * 32, pools=[POOL], clock=FakeClock())
        request = LeaseRequest(worker="w-1", pool=POOL, accelerator="cpu", device_name="cpu", max_units=4)
        grant = await service.grant(request)
        assert isinstance(grant, LeaseGrant), grant
        for leased in grant.units:
            files = result_files(leased.spec, pool=POOL)
            prefix = service.staging_prefix(leased.spec.unit, leased.spec.attempt, "w-1")
            for name, data in files.items():
                store.put_bytes(f"{prefix}/{name}", data)
            await service.complete(
                CompleteRequest(
                    worker="w-1",
                    pool=POOL,
                    unit=leased.spec.unit,
                    attempt=leased.spec.attempt,
                    converged=True,
                    files=digests(files),
                    training_seconds=1.0,
                    epochs=1,
                )
            )
        await service.tick()
        assert service.finalized
        assert service.snapshot().phase is Phase.Succeeded
        data = {}
        for target in ("clean", "pixel"):
            blob = store.get_bytes(mf.target_data_key(target))
            assert blob is not None, f"no data file for {target}"
            loaded = load_data(blob)
            assert isinstance(loaded, ImageData)
            data[target] = {
                "variant": loaded.meta["variant"],
                "train": list(loaded.train_x.shape),
                "test": list(loaded.test_x.shape),
                "asr": None if loaded.asr_x is None else list(loaded.asr_x.shape),
            }
        return {
            "units": len(grant.units),
            "data": data,
            "loaded": sorted(n for n in sys.modules if n.partition(".")[0] in sys.argv[2].split(",")),
        }


    print(json.dumps(asyncio.run(main(Path(sys.argv[1])))))
    """
)


def test_a_ds4_campaign_finalises_without_torch_sklearn_scipy_or_the_worker(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path), ",".join(BLOCKED)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["units"] == 4
    assert report["loaded"] == []
    assert report["data"] == {
        "clean": {"variant": "clean", "train": [1437, 1, 8, 8], "test": [360, 1, 8, 8], "asr": None},
        "pixel": {"variant": "pixel", "train": [1437, 1, 8, 8], "test": [360, 1, 8, 8], "asr": [319, 1, 8, 8]},
    }
    assert (tmp_path / "data" / "clean.npz").is_file()
    assert (tmp_path / "data" / "pixel.npz").is_file()


@pytest.mark.parametrize("name", BLOCKED)
def test_the_blocker_really_blocks(name: str) -> None:
    # Guards the test above against a blocker that blocks nothing (it would then prove nothing).
    probe = CHILD.split("import asyncio")[0] + f"import {name}\n"
    done = subprocess.run(
        [sys.executable, "-c", probe, "unused", ",".join(BLOCKED)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 1
    assert f"No module named {name!r} (blocked)" in done.stderr
