"""Bundle uploads: a unit's files in one PUT (``LeaseRequest.bundleUploads``, ``LeasedUnit.bundleUpload``).

Served like every lease-API test (tests/api_fixtures.py: a CampaignService over a LocalStore on a loopback
aiohttp server, fake clock). What must hold: a worker that does not ask sees exactly the old wire format
(workers refuse unknown keys); a bundled result is verified part by part and published like one uploaded
file by file, byte for byte, with nothing left behind in staging; a bundle that disagrees with the
completion is refused and counts nothing; a bundle URL reaches only its own unit's staging key, and only
while its lease holds the unit.
"""

from __future__ import annotations

import json
import os
import urllib.parse
from collections.abc import Callable
from pathlib import Path

import pytest
from mlds_contract.lease import FileDigest, LeasedUnit, LeaseGrant
from mlds_contract.results import result_files_for
from mlds_operator.storage.store import STAGING_PREFIX

from tests.api_fixtures import ApiHarness, digests, open_api, result_files


def bundle_of(leased: LeasedUnit, files: dict[str, bytes]) -> bytes:
    """The body a worker PUTs: the files concatenated in the order the grant's ``uploads`` lists them."""
    return b"".join(files[name] for name in leased.uploads)


def files_on_disk(api: ApiHarness) -> list[str]:
    """Every file under the store's folder, temporary and private ones included, relative to it."""
    root = api.store.root
    return sorted(
        Path(folder, name).relative_to(root).as_posix() for folder, _, names in os.walk(root) for name in names
    )


async def test_a_worker_that_does_not_ask_sees_the_old_wire_format(tmp_path: Path) -> None:
    async with open_api(tmp_path) as api:
        # A worker that predates bundles sends no bundleUploads and refuses unknown keys in what it gets.
        status, body = await api.post(
            f"{api.base}/leases",
            {"worker": "w-1", "pool": "cpu", "accelerator": "cpu", "deviceName": "cpu", "maxUnits": 1},
        )
        assert status == 200, body
        assert set(body["units"][0]) == {"spec", "uploads"}
        leased = LeaseGrant.model_validate(body).units[0]
        files = result_files(leased.spec)
        completion = api.completion(leased, files)
        assert "bundled" not in json.loads(completion.model_dump_json(by_alias=True))
        await api.upload(leased, files)
        status, reply = await api.post(api.complete_path(0), completion)
        assert (status, reply["status"]) == (200, "accepted")


async def test_a_bundled_result_is_published_like_one_uploaded_file_by_file(tmp_path: Path) -> None:
    async with open_api(tmp_path) as api:
        grant = await api.grant(bundles=True)
        leased = grant.units[0]
        assert leased.bundle_upload is not None
        key = urllib.parse.unquote(urllib.parse.urlsplit(leased.bundle_upload).path.removeprefix("/v1/objects/"))
        assert key == f"{STAGING_PREFIX}0-0-w-1~bundle"
        assert list(leased.uploads) == list(result_files_for(leased.spec.dataset))  # the bundle's order
        files = result_files(leased.spec)
        assert await api.upload_bundle(leased, bundle_of(leased, files)) == 200

        status, reply = await api.post(api.complete_path(0), api.completion(leased, files, bundled=True))

        assert (status, reply["status"], reply["state"]) == (200, "accepted", "succeeded")
        folder = leased.spec.key
        for name in ("model.safetensors", "history.csv"):
            assert api.store.get_bytes(f"{folder}/{name}") == files[name], name
        row = json.loads(api.store.get_bytes(f"{folder}/meta.json") or b"")
        assert (row["unit"], row["sha256"], row["key"]) == (0, digests(files)["model.safetensors"].sha256, folder)
        await api.service.flush()
        # Nothing of the upload is left: no staged bundle, no private link, no temporary file.
        assert [f for f in files_on_disk(api) if not f.startswith("_mlds/") or "staging" in f] == sorted(
            f"{folder}/{name}" for name in ("history.csv", "meta.json", "model.safetensors")
        )


def _declared_sha_of_another(leased: LeasedUnit, files: dict[str, bytes]) -> tuple[bytes, dict[str, FileDigest]]:
    declared = digests(files)
    declared["history.csv"] = FileDigest(sha256="0" * 64, size=len(files["history.csv"]))
    return bundle_of(leased, files), declared


def _files_in_another_order(leased: LeasedUnit, files: dict[str, bytes]) -> tuple[bytes, dict[str, FileDigest]]:
    return b"".join(files[name] for name in reversed(list(leased.uploads))), digests(files)


def _one_byte_more(leased: LeasedUnit, files: dict[str, bytes]) -> tuple[bytes, dict[str, FileDigest]]:
    return bundle_of(leased, files) + b"\n", digests(files)


def _one_byte_less(leased: LeasedUnit, files: dict[str, bytes]) -> tuple[bytes, dict[str, FileDigest]]:
    return bundle_of(leased, files)[:-1], digests(files)


def _declared_size_moved(leased: LeasedUnit, files: dict[str, bytes]) -> tuple[bytes, dict[str, FileDigest]]:
    # The same total, split elsewhere: the model one byte shorter, history one byte longer.
    declared = digests(files)
    model, history = declared["model.safetensors"], declared["history.csv"]
    declared["model.safetensors"] = FileDigest(sha256=model.sha256, size=model.size - 1)
    declared["history.csv"] = FileDigest(sha256=history.sha256, size=history.size + 1)
    return bundle_of(leased, files), declared


Tamper = Callable[[LeasedUnit, dict[str, bytes]], tuple[bytes, dict[str, FileDigest]]]


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        pytest.param(_declared_sha_of_another, "sha_mismatch", id="a part's sha256 does not match"),
        pytest.param(_files_in_another_order, "sha_mismatch", id="the files in another order"),
        pytest.param(_declared_size_moved, "sha_mismatch", id="parts split at other sizes"),
        pytest.param(_one_byte_more, "size_mismatch", id="longer than the declared files"),
        pytest.param(_one_byte_less, "size_mismatch", id="shorter than the declared files"),
    ],
)
async def test_a_bundle_that_disagrees_with_its_completion_is_refused_and_counts_nothing(
    tmp_path: Path, tamper: Tamper, reason: str
) -> None:
    async with open_api(tmp_path) as api:
        leased = (await api.grant(bundles=True)).units[0]
        files = result_files(leased.spec)
        body, declared = tamper(leased, files)
        assert await api.upload_bundle(leased, body) == 200

        status, reply = await api.post(
            api.complete_path(0), api.completion(leased, files, declared=declared, bundled=True)
        )

        assert status == 422, reply
        assert reply["type"] == f"urn:mlds:lease:result-{reason}"
        assert api.service.book.stats().succeeded == 0
        assert not list(api.store.list(leased.spec.key))


async def test_a_bundle_whose_meta_json_is_refused_leaves_nothing_behind(tmp_path: Path) -> None:
    async with open_api(tmp_path) as api:
        leased = (await api.grant(bundles=True)).units[0]
        files = result_files(leased.spec, unit=1)  # meta.json names another unit: refused after the bytes matched
        assert await api.upload_bundle(leased, bundle_of(leased, files)) == 200

        status, reply = await api.post(api.complete_path(0), api.completion(leased, files, bundled=True))

        assert (status, reply["type"]) == (422, "urn:mlds:lease:result-bad_meta")
        assert [f for f in files_on_disk(api) if ".mlds-tmp-" in f] == []  # the model's private link is gone too
        assert not list(api.store.list(leased.spec.key))


async def test_a_completion_that_says_bundled_without_a_bundle_is_refused_as_missing(tmp_path: Path) -> None:
    async with open_api(tmp_path) as api:
        leased = (await api.grant(bundles=True)).units[0]
        files = result_files(leased.spec)
        await api.upload(leased, files)  # file by file, but the completion claims a bundle

        status, reply = await api.post(api.complete_path(0), api.completion(leased, files, bundled=True))

        assert (status, reply["type"]) == (422, "urn:mlds:lease:result-missing")
        assert api.service.book.stats().succeeded == 0


async def test_a_bundle_url_reaches_only_its_own_key_while_its_lease_holds_the_unit(tmp_path: Path) -> None:
    async with open_api(tmp_path) as api:
        grant = await api.grant(bundles=True, max_units=2)
        first, second = grant.units
        assert first.bundle_upload is not None
        assert second.bundle_upload is not None
        # The signature covers the key: the first unit's URL with the second unit's key is refused.
        forged = first.bundle_upload.replace("/0-0-w-1~bundle?", "/1-0-w-1~bundle?")
        async with api.client.session.put(forged, data=b"x") as resp:
            assert resp.status == 403
        # Released units: the URLs were signed, but the right died with the lease.
        status, _ = await api.post(api.release_path(grant.lease_id), {"worker": "w-1"})
        assert status == 200
        assert await api.upload_bundle(second, b"late") == 409
        assert not list(api.store.list(STAGING_PREFIX))


@pytest.mark.parametrize(
    "key",
    [
        pytest.param(f"{STAGING_PREFIX}0-0-w-1~bundle", id="the lease's own bundle"),
        pytest.param(f"{STAGING_PREFIX}0-0-w-1/model.safetensors", id="one of the unit's files"),
    ],
)
async def test_the_upload_rule_takes_both_staging_layouts_of_a_held_unit(tmp_path: Path, key: str) -> None:
    async with open_api(tmp_path) as api:
        grant = await api.grant()
        assert api.service.upload_allowed(key, grant.lease_id)


@pytest.mark.parametrize(
    "key",
    [
        pytest.param(f"{STAGING_PREFIX}1-0-w-1~bundle", id="a unit the lease does not hold"),
        pytest.param(f"{STAGING_PREFIX}0-1-w-1~bundle", id="an attempt not issued"),
        pytest.param(f"{STAGING_PREFIX}0-0-w-2~bundle", id="another worker's"),
        pytest.param(f"{STAGING_PREFIX}0-0-w-1~bundle/model.safetensors", id="below a bundle"),
        pytest.param(f"{STAGING_PREFIX}0-0-w-1~other", id="another suffix"),
        pytest.param(f"{STAGING_PREFIX}0-0-w-1", id="the attempt folder itself"),
        pytest.param(f"{STAGING_PREFIX}0-0-w-1/notes.txt", id="not a result file"),
        pytest.param(f"{STAGING_PREFIX}0/0-w-1/model.safetensors", id="the layout before one folder per attempt"),
    ],
)
async def test_the_upload_rule_refuses_every_other_staging_key(tmp_path: Path, key: str) -> None:
    async with open_api(tmp_path) as api:
        grant = await api.grant()
        assert not api.service.upload_allowed(key, grant.lease_id)
