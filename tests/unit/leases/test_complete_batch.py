"""The completeBatch route and the publish path: a stack's worth of completions in one request.

Served like every lease-API test (tests/api_fixtures.py: a CampaignService over a LocalStore on a loopback
aiohttp server, fake clock). What a worker sees: one item per completion, in order; a refused result
refuses only itself; a unit completed twice (in one batch, across batches, or beside the single route)
counts once; the final folder holds exactly the bytes that were verified, and a staged file replaced
after its check is never published.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path
from typing import Any

from mlds_contract.lease import CompleteBatchReply, CompleteBatchRequest, FileDigest
from mlds_contract.routes import COMPLETE_BATCH
from mlds_operator.storage import manifest as mf
from mlds_operator.storage.store import Checked, LocalStore

from tests.api_fixtures import open_api, result_files


def batch_path(api: Any) -> str:
    return api.base + COMPLETE_BATCH.campaign_path()


async def test_a_batch_counts_each_unit_once_and_refuses_only_the_bad_result(tmp_path: Path) -> None:
    async with open_api(tmp_path, networks=8) as api:
        grant = await api.grant("w-1", max_units=4)
        requests = []
        for leased in grant.units:
            files = result_files(leased.spec)
            await api.upload(leased, files)
            declared = None
            if leased.spec.unit == 2:  # claims another model: its sha256 cannot match what was uploaded
                declared = {
                    **api.completion(leased, files).files,
                    "model.safetensors": FileDigest(sha256="0" * 64, size=len(files["model.safetensors"])),
                }
            requests.append(api.completion(leased, files, declared=declared))
        status, body = await api.post(batch_path(api), CompleteBatchRequest(completions=requests))
        assert status == 200, body
        reply = CompleteBatchReply.model_validate(body)
        assert [item.unit for item in reply.results] == [0, 1, 2, 3]
        assert [item.status for item in reply.results] == ["accepted", "accepted", None, "accepted"]
        refused = reply.results[2].error
        assert refused is not None
        assert refused.status == 422
        assert refused.type.endswith("result-sha_mismatch")

        # The same completions again, in a batch and singly: nothing counts twice.
        status, body = await api.post(batch_path(api), CompleteBatchRequest(completions=[requests[0], requests[1]]))
        assert [item["status"] for item in body["results"]] == ["duplicate", "duplicate"]
        status, body = await api.post(api.complete_path(3), requests[3])
        assert body["status"] == "duplicate"

        stats = api.service.book.stats()
        assert stats.succeeded == 3
        await api.service.flush()
        table = mf.compact_manifest(api.store)
        assert sorted(table.column("unit").to_pylist()) == [0, 1, 3]


async def test_a_batch_naming_a_unit_twice_is_malformed(tmp_path: Path) -> None:
    async with open_api(tmp_path, networks=8) as api:
        grant = await api.grant("w-1", max_units=1)
        leased = grant.units[0]
        files = result_files(leased.spec)
        await api.upload(leased, files)
        one = api.completion(leased, files).model_dump(mode="json", by_alias=True)
        status, body = await api.post(batch_path(api), {"completions": [one, one]})
        assert status == 422
        assert "at most once" in body["detail"]
        assert api.service.book.stats().succeeded == 0


async def test_published_files_are_the_verified_bytes_and_staging_is_cleared(tmp_path: Path) -> None:
    async with open_api(tmp_path, networks=8) as api:
        grant = await api.grant("w-1", max_units=2)
        sent = {}
        requests = []
        for leased in grant.units:
            files = result_files(leased.spec)
            sent[leased.spec.key] = files
            await api.upload(leased, files)
            requests.append(api.completion(leased, files))
        _status, body = await api.post(batch_path(api), CompleteBatchRequest(completions=requests))
        assert [item["status"] for item in body["results"]] == ["accepted", "accepted"]
        for key, files in sent.items():
            for name, data in files.items():
                if name == "meta.json":  # the server publishes its own row, built from the plan
                    assert json.loads(api.store.get_bytes(f"{key}/{name}") or b"")["key"] == key
                else:
                    assert api.store.get_bytes(f"{key}/{name}") == data
        await api.service.flush()  # staged leftovers go in batches with the rows
        assert list(api.store.list("_mlds/staging/")) == []
        assert not (api.store.root / "_mlds" / "staging").exists()  # emptied folders are removed too


def test_a_re_upload_after_the_check_is_never_published(tmp_path: Path) -> None:
    store = LocalStore(tmp_path, durable=False)
    staged = "_mlds/staging/0/0-w/model.safetensors"
    store.put_upload(staged, b"checked bytes")
    checked = store.check(staged, 13, hashlib.sha256(b"checked bytes").hexdigest())
    assert isinstance(checked, Checked)
    assert checked.data == b"checked bytes"
    store.put_upload(staged, b"swapped bytes")  # a late re-upload to the same signed URL
    assert store.publish([(staged, "T/00000/model.safetensors", checked.version)]) is None
    assert store.get_bytes("T/00000/model.safetensors") == b"checked bytes"
    assert store.publish([(staged, "T/00001/model.safetensors", checked.version)]) == staged  # published once
    assert list(store.list("")) == ["T/00000/model.safetensors", staged]  # the private link is never listed


async def test_concurrent_batches_with_a_twin_publish_one_copy(tmp_path: Path) -> None:
    # A speculative twin: two workers complete the same unit in two batches at once; one is accepted.
    async with open_api(tmp_path, networks=8) as api:
        grant = await api.grant("w-1", max_units=1)
        leased = grant.units[0]
        staged = {}
        for worker in ("w-1", "w-2"):
            files = result_files(leased.spec)
            prefix = api.service.staging_prefix(leased.spec.unit, leased.spec.attempt, worker)
            for name, data in files.items():
                api.store.put_upload(f"{prefix}/{name}", data)
            staged[worker] = api.completion(leased, files, worker=worker)
        answers = await asyncio.gather(
            *(api.post(batch_path(api), CompleteBatchRequest(completions=[req])) for req in staged.values())
        )
        outcomes = sorted(body["results"][0]["status"] for _, body in answers)
        assert outcomes == ["accepted", "duplicate"]
        assert api.service.book.stats().succeeded == 1
