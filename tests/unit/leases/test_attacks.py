"""Issue 13's attacks against the lease API as the operator and ``mlds run`` serve it (create_app on loopback).

Each test sends the attacker's real requests (tests/attacks.py: the base URL and the token a worker pod
holds) to a real aiohttp server and checks the answer it must now get, then that no published result,
checkpoint or manifest changed, and that the campaign still flushes and reopens. The same attacks run
against a real ``mlds run`` process in tests/e2e/test_attacks_run.py.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from mlds_contract.lease import UnitState
from mlds_contract.plan import UnitSpec
from mlds_operator.storage import manifest as mf

from tests.api_fixtures import POOL, ApiHarness, open_api, result_files, safetensors_bytes
from tests.attacks import Attacker, deep_json, deep_meta, published_state


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[ApiHarness]:
    async with open_api(tmp_path, networks=8) as harness:
        yield harness


def attacker(api: ApiHarness) -> Attacker:
    return Attacker(api.client.session, str(api.client.make_url(api.base)), api.token, POOL)


async def published_one(api: ApiHarness) -> dict[str, str]:
    """An honest worker publishes unit 0 and the service checkpoints; returns the store's published state."""
    grant = await api.grant("w-1")
    status, body = await api.deliver(grant.units[0])
    assert status == 200, body
    await api.service.flush()
    return published_state(api.store.root)


async def still_sound(api: ApiHarness, before: dict[str, str]) -> None:
    """Nothing published changed, the next flush works and a restarted service opens and counts the same."""
    assert published_state(api.store.root) == before
    succeeded = api.service.snapshot().stats.succeeded
    await api.service.flush()
    restarted = await api.restart()
    assert restarted.snapshot().stats.succeeded == succeeded
    assert restarted.snapshot().unreadable == ()


FORGED_META = {
    "an epoch count past uint64": {"epochs": 18446744073709551616},
    "unit 0.0 for unit 1": {"unit": 1.0},
    "a string epoch count": {"epochs": "3"},
    "a NaN loss": None,  # raw, below
    "a loss of 1e300": {"eval_loss": 1e300},
    "a duplicate key": None,
    "a nested field beside its dotted twin": None,
    "nesting 100,000 deep": None,
    "a list": None,
}


def forged_meta(name: str, spec: UnitSpec) -> tuple[bytes | None, dict[str, object]]:
    honest = json.loads(result_files(spec)["meta.json"])
    raw = {
        "a NaN loss": json.dumps({**honest, "eval_loss": float("nan")}).encode(),
        "a duplicate key": json.dumps(honest)[:-1].encode() + b', "epochs": 2}',
        "a nested field beside its dotted twin": json.dumps(
            {**honest, "seeds.init": 1, "seeds": {"init": 2}, "epochs": 10**30}
        ).encode(),
        "nesting 100,000 deep": deep_meta(100_000),
        "a list": b"[]",
    }.get(name)
    return raw, FORGED_META[name] or {}


@pytest.mark.parametrize("name", FORGED_META)
async def test_a_forged_meta_json_is_a_422_and_cannot_stop_a_flush(api: ApiHarness, name: str) -> None:
    before = await published_one(api)
    intruder = attacker(api)
    grant = await intruder.lease()
    assert grant is not None
    unit = grant["units"][0]
    spec = UnitSpec.model_validate(unit["spec"])
    raw, fields = forged_meta(name, spec)

    seen = await intruder.deliver_forged(unit, raw, **fields)

    assert (seen.status, seen.kind) == (422, "urn:mlds:lease:result-bad_meta"), seen
    # Never a manifest row: the unit is pending again, its attempt not counted, for another worker.
    assert (api.service.book.unit(spec.unit).state, api.service.book.unit(spec.unit).attempts) == (
        UnitState.pending,
        0,
    )
    await still_sound(api, before)


async def test_a_model_that_is_not_the_units_architecture_is_a_422(api: ApiHarness) -> None:
    before = await published_one(api)
    intruder = attacker(api)
    grant = await intruder.lease()
    assert grant is not None
    unit = grant["units"][0]
    spec = UnitSpec.model_validate(unit["spec"])
    files = result_files(spec)
    wrong = safetensors_bytes({"out.weight": (8, 12), "payload": (1 << 10,)})
    meta = json.loads(files["meta.json"])
    meta["sha256"] = hashlib.sha256(wrong).hexdigest()
    files.update({"model.safetensors": wrong, "meta.json": json.dumps(meta).encode()})
    for name, data in files.items():
        assert await intruder.put(unit["uploads"][name], data) == 200

    seen = await intruder.complete(spec, files)

    assert (seen.status, seen.kind) == (422, "urn:mlds:lease:result-bad_model"), seen
    await still_sound(api, before)


@pytest.mark.parametrize("key", ["ParityMachine/00000/model.safetensors", mf.CHECKPOINT_KEY, mf.MANIFEST_KEY])
async def test_no_upload_url_reaches_a_published_result_the_checkpoint_or_the_manifest(
    api: ApiHarness, key: str
) -> None:
    before = await published_one(api)
    intruder = attacker(api)
    grant = await intruder.lease()
    assert grant is not None
    granted = grant["units"][0]["uploads"]["model.safetensors"]

    statuses = [await intruder.put(url, b"overwritten") for url in intruder.forged_upload_urls(granted, key)]

    assert statuses == [403, 403, 403]
    await still_sound(api, before)


async def test_an_upload_right_dies_with_its_lease(api: ApiHarness) -> None:
    intruder = attacker(api)
    grant = await intruder.lease()
    assert grant is not None
    url = grant["units"][0]["uploads"]["meta.json"]
    released = await intruder.send("POST", f"/leases/{grant['leaseId']}/release", {"worker": intruder.worker})
    assert released.status == 200

    assert await intruder.put(url, b"{}") == 409  # a valid signature, but the lease is gone
    assert list(api.store.list("_mlds/staging/")) == []


async def test_a_failure_of_an_attempt_never_issued_changes_nothing(api: ApiHarness) -> None:
    before = await published_one(api)
    intruder = attacker(api)
    body = {"worker": intruder.worker, "pool": POOL, "unit": 5, "attempt": 1_000_000, "kind": "fail"}

    seen = await intruder.send("POST", "/units/5/fail", body)

    assert (seen.status, seen.kind) == (422, "urn:mlds:lease:not-issued"), seen
    # Attempt 0 was issued to nobody: reporting it is a duplicate, and counts nothing either.
    again = await intruder.send("POST", "/units/5/fail", {**body, "attempt": 0})
    assert (again.status, again.body["status"]) == (200, "duplicate")
    assert (api.service.book.unit(5).state, api.service.book.unit(5).attempts) == (UnitState.pending, 0)
    # A holder must name the attempt its lease was given.
    grant = await intruder.lease()
    assert grant is not None
    held = grant["units"][0]["spec"]["unit"]
    wrong = await intruder.send("POST", f"/units/{held}/fail", {**body, "unit": held, "attempt": 2})
    assert (wrong.status, wrong.kind) == (422, "urn:mlds:lease:not-issued")
    await still_sound(api, before)


async def test_a_heartbeat_on_an_invented_lease_readopts_nothing(api: ApiHarness) -> None:
    before = await published_one(api)
    intruder = attacker(api)
    units = [{"unit": u, "attempt": 0} for u in range(30_000)]

    seen = await intruder.send(
        "POST", "/leases/invented-lease-0000/heartbeat", {"worker": intruder.worker, "pool": POOL, "units": units}
    )

    assert (seen.status, seen.kind) == (409, "urn:mlds:lease:not-holder"), seen
    stats = api.service.book.stats()
    assert (stats.leases, stats.leased) == (0, 0)
    await still_sound(api, before)


async def test_an_invented_pool_is_a_422_and_grows_nothing(api: ApiHarness) -> None:
    before = await published_one(api)
    intruder = attacker(api)
    for n in range(64):
        body = {"worker": intruder.worker, "pool": f"fuzz-{n}", "accelerator": "cpu", "deviceName": "x", "maxUnits": 1}
        seen = await intruder.send("POST", "/leases", body)
        assert (seen.status, seen.kind) == (422, "urn:mlds:lease:unknown-pool"), seen

    assert api.service.book.pools == (POOL,)
    await still_sound(api, before)
    assert api.service.book.pools == (POOL,)  # nor in the checkpoint the restart read


#: Well-formed bodies, so that only the URL's unit (a Unicode digit) is wrong.
_COMPLETE_2 = json.dumps(
    {
        "worker": "intruder-0",
        "pool": POOL,
        "unit": 2,
        "attempt": 0,
        "converged": True,
        "files": {"meta.json": {"sha256": "0" * 64, "size": 1}},
        "trainingSeconds": 1.0,
        "epochs": 1,
    }
).encode()
_FAIL_3 = json.dumps({"worker": "intruder-0", "pool": POOL, "unit": 3, "attempt": 0, "kind": "fail"}).encode()


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        pytest.param(
            "PUT",
            "/v1/objects/_mlds/staging/0/0-w/meta.json?expires=9999999999&sig=\u00e9",
            b"x",
            403,
            id="non-ascii-signature",
        ),
        pytest.param("POST", "/units/\u00b2/complete", _COMPLETE_2, 404, id="superscript-two-as-unit"),
        pytest.param("POST", "/units/\u0663/fail", _FAIL_3, 404, id="arabic-indic-three-as-unit"),
        pytest.param("POST", "/leases", deep_json(100_000), 422, id="a-body-nested-100000-deep"),
        pytest.param("GET", "/metrics", None, 404, id="metrics-on-the-lease-port"),
    ],
)
async def test_hostile_requests_get_a_4xx_problem_never_a_500(
    api: ApiHarness, method: str, path: str, body: bytes | None, status: int
) -> None:
    intruder = attacker(api)
    url = intruder.server + path if path.startswith(("/v1/objects", "/metrics")) else path

    seen = await intruder.send(method, url, body)

    assert seen.status == status, seen
    assert isinstance(seen.body, dict)  # an RFC 9457 problem document
    assert seen.body["status"] == status


STACK = {"slots": 4, "live": 2, "memberSeconds": 10.0, "slotSeconds": 20.0}


@pytest.mark.parametrize("route", ["lease", "heartbeat"])
async def test_a_stack_report_from_an_invented_pool_is_a_422_and_adds_no_occupancy_series(
    api: ApiHarness, route: str
) -> None:
    # Found by the chaos driver (tests/chaos.py): the stack report was recorded before the pool was checked.
    intruder = attacker(api)
    body: dict[str, object] = {"worker": intruder.worker, "pool": "invented", "stack": STACK}
    if route == "lease":
        body |= {"accelerator": "cpu", "deviceName": "x", "maxUnits": 1}
        seen = await intruder.send("POST", "/leases", body)
    else:
        body["units"] = [{"unit": 0, "attempt": 0}]
        seen = await intruder.send("POST", "/leases/invented-0000/heartbeat", body)

    assert (seen.status, seen.kind) == (422, "urn:mlds:lease:unknown-pool"), seen
    assert api.service.snapshot().occupancy == {}


async def test_an_invented_pool_is_a_422_even_once_the_campaign_is_finished(tmp_path: Path) -> None:
    # Found by the chaos driver: a finished campaign answered any pool "finished" (200).
    async with open_api(tmp_path, networks=1) as api:
        grant = await api.grant("w-1")
        assert (await api.deliver(grant.units[0]))[0] == 200
        assert api.service.book.finished
        intruder = attacker(api)
        body = {"worker": intruder.worker, "pool": "invented", "accelerator": "cpu", "deviceName": "x", "maxUnits": 1}

        seen = await intruder.send("POST", "/leases", body)

        assert (seen.status, seen.kind) == (422, "urn:mlds:lease:unknown-pool"), seen
        honest = await intruder.send("POST", "/leases", {**body, "pool": POOL})
        assert (honest.status, honest.body["reason"]) == (200, "finished")
