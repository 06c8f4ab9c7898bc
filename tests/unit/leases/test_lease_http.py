"""The lease HTTP API, through HTTP: who may call it, what it refuses and why, and the protocol's stories.

Each test serves one small campaign (ParityMachine, 8 units) from a CampaignService over a LocalStore in
tmp_path, on a loopback aiohttp server (tests/api_fixtures.py); a fake clock drives leases and URL
expiry. Errors are checked as a worker sees them: the status, a problem+json body naming the problem,
and for 401 the WWW-Authenticate challenge.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
from mlds_contract.errors import StorageUnavailable
from mlds_contract.lease import (
    PROBLEM_JSON,
    CompleteReply,
    ErrorReply,
    FailKind,
    FailRequest,
    FileDigest,
    HeartbeatReply,
    HeartbeatRequest,
    LeaseGrant,
    LeaseRequest,
    NoLease,
    NoLeaseReason,
    Outcome,
    ReleaseReply,
    ReleaseRequest,
    UnitAttempt,
    UnitState,
)
from mlds_operator.artifacts.generate import default_root
from mlds_operator.leases.http import MAX_BODY, openapi_document, render_openapi_json
from mlds_operator.storage.store import Checked
from mlds_worker.client import LeaseClient, NotHeld, Rejected, Unauthorized, Unreachable

from tests.api_fixtures import NAME, NAMESPACE, POOL, TOKEN, ApiHarness, open_api, result_files

SOME_LEASE = "NoSuchLease_0123456789"  # well-formed, never issued
SHA = "ab" * 32


def assert_problem(status: int, headers: dict[str, str], body: Any, want: int, kind: str | None = None) -> ErrorReply:
    """The answer is an RFC 9457 problem of status ``want`` (and type ``urn:mlds:lease:<kind>``)."""
    assert status == want, body
    assert headers["Content-Type"].startswith(PROBLEM_JSON)
    problem = ErrorReply.model_validate(body)
    assert problem.status == want
    assert problem.detail
    if kind is not None:
        assert problem.type == f"urn:mlds:lease:{kind}", problem
    return problem


def wire(model: Any) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(model.model_dump_json(by_alias=True))
    return out


# Valid bodies, in wire form, per endpoint: each test breaks exactly one thing.
LEASE_BODY = wire(LeaseRequest(worker="w-1", pool=POOL, accelerator="cpu", device_name="cpu", max_units=2))
HEARTBEAT_BODY = wire(HeartbeatRequest(worker="w-1", pool=POOL, units=[UnitAttempt(unit=0, attempt=0)]))
RELEASE_BODY = wire(ReleaseRequest(worker="w-1", reason="shutting down"))
COMPLETE_BODY: dict[str, Any] = {
    "worker": "w-1",
    "pool": POOL,
    "unit": 0,
    "attempt": 0,
    "converged": True,
    "files": {"model.safetensors": {"sha256": SHA, "size": 10}, "meta.json": {"sha256": SHA, "size": 5}},
    "trainingSeconds": 1.5,
    "epochs": 3,
}
FAIL_BODY = wire(FailRequest(worker="w-1", pool=POOL, unit=0, attempt=0, kind=FailKind.fail, reason="NaN loss"))

ENDPOINTS: dict[str, tuple[str, dict[str, Any]]] = {
    "lease": ("/leases", LEASE_BODY),
    "heartbeat": (f"/leases/{SOME_LEASE}/heartbeat", HEARTBEAT_BODY),
    "release": (f"/leases/{SOME_LEASE}/release", RELEASE_BODY),
    "complete": ("/units/0/complete", COMPLETE_BODY),
    "fail": ("/units/0/fail", FAIL_BODY),
}

_DROP = object()


def changed(body: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A deep copy of ``body`` with ``path`` (keys joined by "/") set to ``value`` (or removed, for ``_DROP``)."""
    out: dict[str, Any] = json.loads(json.dumps(body))
    *parents, last = path.split("/")
    node = out
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if value is _DROP:
        del node[last]
    elif isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return out


@pytest.fixture
async def api(tmp_path: Path) -> Any:
    async with open_api(tmp_path) as harness:
        yield harness


# ---------------------------------------------------------------------------------------------- 401


TOKEN_CASES = [
    pytest.param(f"/v1/campaigns/{NAMESPACE}/{NAME}", {}, id="no Authorization header"),
    pytest.param(f"/v1/campaigns/{NAMESPACE}/{NAME}", {"Authorization": "Bearer wrong"}, id="wrong token"),
    pytest.param(f"/v1/campaigns/{NAMESPACE}/{NAME}", {"Authorization": "Bearer "}, id="empty bearer token"),
    pytest.param(
        f"/v1/campaigns/{NAMESPACE}/{NAME}", {"Authorization": f"Bearer {TOKEN}x"}, id="right token with a suffix"
    ),
    pytest.param(f"/v1/campaigns/{NAMESPACE}/{NAME}", {"Authorization": f"Basic {TOKEN}"}, id="right token, Basic"),
    pytest.param(f"/v1/campaigns/{NAMESPACE}/{NAME}", {"Authorization": TOKEN}, id="right token without a scheme"),
    pytest.param(
        f"/v1/campaigns/{NAMESPACE}/other", {"Authorization": f"Bearer {TOKEN}"}, id="right token, unknown campaign"
    ),
    pytest.param(
        f"/v1/campaigns/default/{NAME}", {"Authorization": f"Bearer {TOKEN}"}, id="right token, other namespace"
    ),
]


@pytest.mark.parametrize("endpoint", list(ENDPOINTS))
@pytest.mark.parametrize(("base", "headers"), TOKEN_CASES)
async def test_every_endpoint_refuses_a_caller_without_this_campaigns_token(
    api: ApiHarness, endpoint: str, base: str, headers: dict[str, str]
) -> None:
    path, body = ENDPOINTS[endpoint]
    status, got, reply = await api.request("POST", base + path, body, headers=headers)
    problem = assert_problem(status, got, reply, 401, "unauthorized")
    assert got["WWW-Authenticate"].startswith("Bearer ")
    # The same words whether the campaign exists or not: a token holder cannot probe for other campaigns.
    assert problem.detail == "missing or wrong bearer token for this campaign"
    assert api.service.book.stats().leased == 0


@pytest.mark.parametrize("endpoint", list(ENDPOINTS))
async def test_the_token_is_checked_before_the_body(api: ApiHarness, endpoint: str) -> None:
    path, _ = ENDPOINTS[endpoint]
    status, headers, reply = await api.request("POST", api.base + path, b"{not json", headers={})
    assert_problem(status, headers, reply, 401, "unauthorized")


async def test_a_non_utf8_authorization_header_is_a_wrong_token_not_a_crash(api: ApiHarness) -> None:
    port = api.client.port
    body = json.dumps(LEASE_BODY).encode()
    request = (
        f"POST {api.base}/leases HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n".encode()
        + b"Authorization: Bearer \xff\xfe"
        + TOKEN.encode()
        + f"\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    answer = await reader.read()
    writer.close()
    await writer.wait_closed()
    assert answer.startswith(b"HTTP/1.1 401 "), answer[:200]


# ---------------------------------------------------------------------------------------------- 422

MALFORMED = [
    # lease
    pytest.param("lease", b'{"worker": ', "Invalid JSON", id="lease: invalid JSON"),
    pytest.param("lease", b"", "object", id="lease: empty body"),
    pytest.param("lease", b"[]", "object", id="lease: a JSON array"),
    pytest.param("lease", changed(LEASE_BODY, "maxUnits", "2"), "maxUnits", id="lease: maxUnits as a string"),
    pytest.param("lease", changed(LEASE_BODY, "maxUnits", True), "maxUnits", id="lease: maxUnits as a boolean"),
    pytest.param("lease", changed(LEASE_BODY, "maxUnits", 2.5), "maxUnits", id="lease: maxUnits as a fraction"),
    pytest.param("lease", changed(LEASE_BODY, "maxUnits", 0), "maxUnits", id="lease: zero maxUnits"),
    pytest.param("lease", changed(LEASE_BODY, "maxUnits", -3), "maxUnits", id="lease: negative maxUnits"),
    pytest.param("lease", changed(LEASE_BODY, "maxUnits", 4097), "maxUnits", id="lease: maxUnits over 4096"),
    pytest.param("lease", changed(LEASE_BODY, "accelerator", "tpu"), "accelerator", id="lease: unknown accelerator"),
    pytest.param("lease", changed(LEASE_BODY, "priority", 1), "priority", id="lease: unknown field"),
    pytest.param("lease", changed(LEASE_BODY, "worker", _DROP), "worker", id="lease: missing worker"),
    pytest.param("lease", changed(LEASE_BODY, "worker", "w" * 254), "worker", id="lease: worker id too long"),
    pytest.param("lease", changed(LEASE_BODY, "worker", "../w"), "worker", id="lease: worker id with a slash"),
    pytest.param("lease", changed(LEASE_BODY, "pool", "CPU"), "pool", id="lease: pool not a DNS label"),
    pytest.param("lease", changed(LEASE_BODY, "deviceName", "x" * 201), "deviceName", id="lease: deviceName too long"),
    pytest.param(
        "lease", changed(LEASE_BODY, "allowSpeculative", "yes"), "allowSpeculative", id="lease: boolean as a string"
    ),
    # heartbeat
    pytest.param(
        "heartbeat", changed(HEARTBEAT_BODY, "units/0/unit", -1), "units.0.unit", id="heartbeat: negative unit"
    ),
    pytest.param(
        "heartbeat",
        changed(HEARTBEAT_BODY, "units", [{"unit": 0, "attempt": 0}, {"unit": 0, "attempt": 1}]),
        "listed twice",
        id="heartbeat: unit listed twice",
    ),
    pytest.param("heartbeat", changed(HEARTBEAT_BODY, "units", {"0": 0}), "units", id="heartbeat: units not a list"),
    pytest.param("heartbeat", changed(HEARTBEAT_BODY, "pool", _DROP), "pool", id="heartbeat: missing pool"),
    # release
    pytest.param("release", changed(RELEASE_BODY, "reason", "r" * 4097), "reason", id="release: reason too long"),
    pytest.param("release", changed(RELEASE_BODY, "worker", _DROP), "worker", id="release: missing worker"),
    # complete
    pytest.param("complete", changed(COMPLETE_BODY, "unit", -1), "unit", id="complete: negative unit"),
    pytest.param(
        "complete",
        changed(COMPLETE_BODY, "files/model.safetensors", {"sha256": "not-hex", "size": 10}),
        "files.model.safetensors.sha256",
        id="complete: sha256 not hex",
    ),
    pytest.param(
        "complete",
        changed(COMPLETE_BODY, "files/model.safetensors", {"sha256": SHA, "size": -1}),
        "files.model.safetensors.size",
        id="complete: negative file size",
    ),
    pytest.param(
        "complete",
        changed(COMPLETE_BODY, "files", {"../escape": {"sha256": SHA, "size": 1}}),
        "files",
        id="complete: file name climbing out of the unit folder",
    ),
    pytest.param("complete", changed(COMPLETE_BODY, "files", {}), "files", id="complete: no files"),
    pytest.param("complete", changed(COMPLETE_BODY, "converged", "yes"), "converged", id="complete: converged as text"),
    pytest.param(
        "complete", changed(COMPLETE_BODY, "trainingSeconds", -1), "trainingSeconds", id="complete: negative seconds"
    ),
    pytest.param(
        "complete", changed(COMPLETE_BODY, "meta", {"unit": 0}), "meta", id="complete: meta.json inline (an upload)"
    ),
    # fail
    pytest.param("fail", changed(FAIL_BODY, "kind", "retry"), "kind", id="fail: unknown kind"),
    pytest.param("fail", changed(FAIL_BODY, "reason", "r" * 4097), "reason", id="fail: reason too long"),
    pytest.param("fail", changed(FAIL_BODY, "attempt", -1), "attempt", id="fail: negative attempt"),
    pytest.param("fail", changed(FAIL_BODY, "unit", "0"), "unit", id="fail: unit as a string"),
]


@pytest.mark.parametrize(("endpoint", "body", "named"), MALFORMED)
async def test_a_malformed_body_is_refused_naming_what_is_wrong(
    api: ApiHarness, endpoint: str, body: dict[str, Any] | bytes, named: str
) -> None:
    path, _ = ENDPOINTS[endpoint]
    status, headers, reply = await api.request("POST", api.base + path, body)
    problem = assert_problem(status, headers, reply, 422, "malformed")
    assert problem.detail is not None
    assert named in problem.detail
    assert api.service.book.stats().leased == 0


async def test_a_body_over_the_limit_is_refused_before_it_is_parsed(api: ApiHarness) -> None:
    units = [{"unit": i, "attempt": 0} for i in range(MAX_BODY // 20)]
    body = json.dumps({"worker": "w-1", "pool": POOL, "units": units}).encode()
    assert len(body) > MAX_BODY
    status, headers, reply = await api.request("POST", api.heartbeat_path(SOME_LEASE), body)
    assert_problem(status, headers, reply, 413, "too-large")


@pytest.mark.parametrize(
    ("size", "want"),
    [pytest.param(0, 200, id="a small chunked body is read"), pytest.param(MAX_BODY, 413, id="a large one is refused")],
)
async def test_a_chunked_body_without_a_length_is_held_to_the_same_limit(api: ApiHarness, size: int, want: int) -> None:
    body = json.dumps({**LEASE_BODY, "deviceName": "cpu"}).encode()
    padded = body[:-1] + b" " * size + b"}"  # JSON whitespace: the same request, longer

    async def chunks() -> Any:
        for i in range(0, len(padded), 1 << 16):
            yield padded[i : i + (1 << 16)]

    async with api.client.post(f"{api.base}/leases", data=chunks(), headers=api.auth) as resp:
        assert resp.status == want, await resp.text()
        assert resp.request_info.headers.get("Transfer-Encoding") == "chunked"


# ---------------------------------------------------------------------------------------------- 409


async def _grant_to_w1(api: ApiHarness) -> LeaseGrant:
    return await api.grant("w-1", max_units=2)


NOT_HOLDER = [
    pytest.param(
        lambda g: ("heartbeat", g.lease_id, {**HEARTBEAT_BODY, "worker": "w-2"}), id="heartbeat by another worker"
    ),
    pytest.param(lambda g: ("release", g.lease_id, {**RELEASE_BODY, "worker": "w-2"}), id="release by another worker"),
    pytest.param(
        lambda g: ("heartbeat", SOME_LEASE, {**HEARTBEAT_BODY, "units": []}),
        id="heartbeat of an unknown lease listing no units",
    ),
    pytest.param(
        lambda g: ("heartbeat", SOME_LEASE, {**HEARTBEAT_BODY, "worker": "w-2"}),
        id="heartbeat of an unknown lease whose units another worker holds",
    ),
    pytest.param(lambda g: ("release", SOME_LEASE, RELEASE_BODY), id="release of an unknown lease"),
]


@pytest.mark.parametrize("request_for", NOT_HOLDER)
async def test_acting_on_a_lease_one_does_not_hold_is_a_conflict_that_changes_nothing(
    api: ApiHarness, request_for: Any
) -> None:
    grant = await _grant_to_w1(api)
    action, lease_id, body = request_for(grant)
    path = api.heartbeat_path(lease_id) if action == "heartbeat" else api.release_path(lease_id)
    status, headers, reply = await api.request("POST", path, body)
    assert_problem(status, headers, reply, 409, "not-holder")
    # w-1 still holds both units under its lease.
    assert api.service.book.lease(grant.lease_id) is not None
    assert api.service.book.lease(grant.lease_id).units == (0, 1)  # type: ignore[union-attr]


# ---------------------------------------------------------------------------------------- 404 / 422


@pytest.mark.parametrize(
    ("url_unit", "body_unit", "endpoint", "want", "kind"),
    [
        pytest.param("8", 8, "complete", 404, "unknown-unit", id="complete: the unit just past the campaign's end"),
        pytest.param("8", 8, "fail", 404, "unknown-unit", id="fail: the unit just past the campaign's end"),
        pytest.param("999999999999", 999999999999, "complete", 404, "unknown-unit", id="complete: a huge unit"),
        pytest.param("abc", 0, "complete", 404, "unknown-unit", id="complete: a unit that is not a number"),
        pytest.param("-1", 0, "fail", 404, "unknown-unit", id="fail: a negative unit in the URL"),
        pytest.param("1", 0, "complete", 422, "malformed", id="complete: URL and body name different units"),
        pytest.param("1", 0, "fail", 422, "malformed", id="fail: URL and body name different units"),
    ],
)
async def test_units_are_addressed_by_an_index_inside_the_campaign(
    api: ApiHarness, url_unit: str, body_unit: int, endpoint: str, want: int, kind: str
) -> None:
    body = {**(COMPLETE_BODY if endpoint == "complete" else FAIL_BODY), "unit": body_unit}
    path = api.complete_path(url_unit) if endpoint == "complete" else api.fail_path(url_unit)
    status, headers, reply = await api.request("POST", path, body)
    assert_problem(status, headers, reply, want, kind)


@pytest.mark.parametrize(
    ("name", "headers", "want", "kind"),
    [
        pytest.param("train-images-idx3-ubyte", {}, 401, "unauthorized", id="no token"),
        pytest.param("train-images-idx3-ubyte", None, 404, "unknown-input", id="MNIST's, of a ds1 campaign"),
        pytest.param("_mlds%2Fcheckpoint.bin", None, 404, "unknown-input", id="a key of the store"),
        pytest.param("upload-secret", None, 404, "unknown-input", id="a name that is not an input"),
    ],
)
async def test_the_input_route_serves_only_the_campaign_s_input_files_to_its_token_holders(
    api: ApiHarness, name: str, headers: dict[str, str] | None, want: int, kind: str
) -> None:
    status, got, reply = await api.request("GET", f"{api.base}/inputs/{name}", headers=headers)
    assert_problem(status, got, reply, want, kind)


@pytest.mark.parametrize(
    ("method", "path", "want"),
    [
        pytest.param("GET", "/nowhere", 404, id="unknown route"),
        pytest.param("GET", f"/v1/campaigns/{NAMESPACE}/{NAME}/leases", 405, id="GET on a POST route"),
        pytest.param("DELETE", f"/v1/campaigns/{NAMESPACE}/{NAME}/units/0/complete", 405, id="DELETE on a POST route"),
    ],
)
async def test_routing_errors_are_problem_details_too(api: ApiHarness, method: str, path: str, want: int) -> None:
    status, headers, reply = await api.request(method, path)
    assert_problem(status, headers, reply, want)


# ----------------------------------------------------------------------------------- the protocol


async def test_a_verified_result_is_counted_once_and_published(api: ApiHarness) -> None:
    grant = await api.grant("w-1", max_units=2)
    assert [u.spec.unit for u in grant.units] == [0, 1]
    assert grant.lease_seconds == 600
    leased = grant.units[0]
    assert set(leased.uploads) == {"model.safetensors", "history.csv", "meta.json"}

    files = result_files(leased.spec)
    await api.upload(leased, files)
    status, reply = await api.post(api.complete_path(0), api.completion(leased, files))
    assert status == 200
    assert CompleteReply.model_validate(reply) == CompleteReply(status=Outcome.accepted, state=UnitState.succeeded)

    # The server wrote the final folder itself (meta.json is its own row), and cleared the staging copies.
    for name in ("model.safetensors", "history.csv"):
        assert api.store.get_bytes(f"ParityMachine/00000/{name}") == files[name]
    row = json.loads(api.store.get_bytes("ParityMachine/00000/meta.json") or b"")
    assert (row["unit"], row["target"], row["key"]) == (0, "ParityMachine", "ParityMachine/00000")
    await api.service.flush()  # staged copies are deleted in batches, with the manifest rows
    assert not list(api.store.list("_mlds/staging/"))

    status, reply = await api.post(api.complete_path(0), api.completion(leased, files))
    assert status == 200
    assert CompleteReply.model_validate(reply) == CompleteReply(status=Outcome.duplicate, state=UnitState.succeeded)
    stats = api.service.book.stats()
    assert (stats.succeeded, stats.leased, stats.pending) == (1, 1, 6)
    assert api.service.snapshot().training_seconds == 12.5  # counted once


def _other_sha(files: dict[str, bytes], name: str) -> dict[str, FileDigest]:
    declared = {n: FileDigest(sha256=hashlib.sha256(d).hexdigest(), size=len(d)) for n, d in files.items()}
    declared[name] = FileDigest(sha256="0" * 64, size=len(files[name]))
    return declared


def _other_size(files: dict[str, bytes], name: str) -> dict[str, FileDigest]:
    declared = {n: FileDigest(sha256=hashlib.sha256(d).hexdigest(), size=len(d)) for n, d in files.items()}
    declared[name] = FileDigest(sha256=declared[name].sha256, size=len(files[name]) + 1)
    return declared


@pytest.mark.parametrize(
    ("declare", "skip_upload", "reason"),
    [
        pytest.param(lambda f: _other_sha(f, "model.safetensors"), None, "sha_mismatch", id="model bytes differ"),
        pytest.param(lambda f: _other_sha(f, "history.csv"), None, "sha_mismatch", id="history bytes differ"),
        pytest.param(lambda f: _other_size(f, "model.safetensors"), None, "size_mismatch", id="model size differs"),
        pytest.param(None, "model.safetensors", "missing", id="model never uploaded"),
        pytest.param(None, "meta.json", "missing", id="meta.json never uploaded"),
    ],
)
async def test_a_result_that_fails_verification_is_refused_and_not_counted(
    api: ApiHarness, declare: Any, skip_upload: str | None, reason: str
) -> None:
    grant = await api.grant("w-1")
    leased = grant.units[0]
    files = result_files(leased.spec)
    await api.upload(leased, {n: d for n, d in files.items() if n != skip_upload})
    declared = declare(files) if declare is not None else None
    status, headers, reply = await api.request(
        "POST", api.complete_path(0), api.completion(leased, files, declared=declared)
    )
    assert_problem(status, headers, reply, 422, f"result-{reason}")
    assert api.service.book.unit(0).state is UnitState.leased
    assert api.service.book.stats().succeeded == 0
    assert api.store.stat("ParityMachine/00000/meta.json") is None
    assert api.service.snapshot().rejected == {reason: 1}

    # The worker still holds the unit: a truthful completion is accepted.
    await api.upload(leased, files)
    status, reply = await api.post(api.complete_path(0), api.completion(leased, files))
    assert (status, reply["status"]) == (200, "accepted")


async def test_a_worker_cannot_complete_with_files_another_worker_uploaded(api: ApiHarness) -> None:
    grant = await api.grant("w-1")
    leased = grant.units[0]
    files = result_files(leased.spec)
    await api.upload(leased, files)
    status, headers, reply = await api.request(
        "POST", api.complete_path(0), api.completion(leased, files, worker="w-2")
    )
    assert_problem(status, headers, reply, 422, "result-missing")


async def test_a_storage_outage_asks_the_worker_to_retry_later(api: ApiHarness, monkeypatch: Any) -> None:
    grant = await api.grant("w-1")
    leased = grant.units[0]
    files = result_files(leased.spec)
    await api.upload(leased, files)

    def outage(rel: str, size: int, sha256: str) -> Checked | None:
        raise StorageUnavailable("disk unplugged", delay=7.0)

    monkeypatch.setattr(api.store, "check", outage)
    status, headers, reply = await api.request("POST", api.complete_path(0), api.completion(leased, files))
    assert_problem(status, headers, reply, 503, "unavailable")
    assert headers["Retry-After"] == "7"
    assert api.service.book.unit(0).state is UnitState.leased

    monkeypatch.undo()
    status, reply = await api.post(api.complete_path(0), api.completion(leased, files))
    assert (status, reply["status"]) == (200, "accepted")


@pytest.mark.parametrize(
    ("networks", "suspend", "before", "reason", "retry_after"),
    [
        pytest.param(2, False, "lease all", NoLeaseReason.busy, 5.0, id="busy: every unit is leased"),
        pytest.param(2, True, "nothing", NoLeaseReason.paused, 5.0, id="paused: the campaign is suspended"),
        pytest.param(1, False, "deliver all", NoLeaseReason.finished, 0.0, id="finished: every unit succeeded"),
    ],
)
async def test_no_lease_says_why(
    tmp_path: Path, networks: int, suspend: bool, before: str, reason: NoLeaseReason, retry_after: float
) -> None:
    async with open_api(tmp_path, networks=networks, suspend=suspend) as api:
        if before != "nothing":
            grant = await api.grant("w-1", max_units=networks)
            if before == "deliver all":
                for leased in grant.units:
                    status, _ = await api.deliver(leased)
                    assert status == 200
        reply = await api.lease("w-2", max_units=4)
        assert reply == NoLease(reason=reason, retry_after_seconds=retry_after)


async def test_any_reply_tells_a_worker_which_of_its_units_another_worker_completed(api: ApiHarness) -> None:
    original = await api.grant("w-1", max_units=8)  # everything: nothing is pending after this
    copy = await api.lease("w-2", max_units=2, speculative=True)
    assert isinstance(copy, LeaseGrant)
    assert copy.speculative
    assert [u.spec.unit for u in copy.units] == [0, 1]

    status, reply = await api.deliver(copy.units[0], worker="w-2")  # the copy wins unit 0
    assert (status, reply["cancel"]) == (200, [])
    # w-1's next top-up request says so at once (no heartbeat needed), and only once.
    told = await api.lease("w-1", max_units=1)
    assert isinstance(told, NoLease)
    assert told.cancel == [0]
    again = await api.lease("w-1", max_units=1)
    assert isinstance(again, NoLease)
    assert again.cancel == []

    status, reply = await api.deliver(original.units[1], worker="w-1")  # the original wins unit 1
    assert status == 200
    assert reply["status"] == "accepted"
    # w-2 hears of it in the reply to whatever it sends next: here, a top-up request. (It can no longer
    # upload its copy of unit 1: upload rights end with the unit's lease, issue 13.)
    told = await api.lease("w-2", max_units=1)
    assert isinstance(told, NoLease)
    assert told.cancel == [1]


async def test_release_returns_every_held_unit_uncounted(api: ApiHarness) -> None:
    grant = await api.grant("w-1", max_units=3)
    status, reply = await api.post(api.release_path(grant.lease_id), RELEASE_BODY)
    assert status == 200
    assert ReleaseReply.model_validate(reply).released == [0, 1, 2]
    again = await api.grant("w-2", max_units=1)
    assert (again.units[0].spec.unit, again.units[0].spec.attempt) == (0, 0)  # same unit, attempt not counted


async def test_a_failed_unit_comes_back_with_new_seeds(api: ApiHarness) -> None:
    first = await api.grant("w-1")
    body = FailRequest(worker="w-1", pool=POOL, unit=0, attempt=0, kind=FailKind.fail, reason="NaN loss")
    status, reply = await api.post(api.fail_path(0), body)
    assert (status, reply) == (200, {"status": "accepted", "state": "pending"})
    again = await api.grant("w-2")
    spec = again.units[0].spec
    assert (spec.unit, spec.attempt) == (0, 1)
    assert spec.init_seed != first.units[0].spec.init_seed


async def test_heartbeats_extend_the_lease_and_an_expired_lease_is_reissued(api: ApiHarness) -> None:
    grant = await api.grant("w-1")
    api.clock.advance(500)
    status, reply = await api.post(api.heartbeat_path(grant.lease_id), HEARTBEAT_BODY)
    assert status == 200
    beat = HeartbeatReply.model_validate(reply)
    assert (beat.lease_seconds, beat.cancel, beat.readopted) == (600, [], False)
    assert beat.deadline.timestamp() == pytest.approx(api.clock.wall() + 600)

    api.clock.advance(601)  # silent past the deadline: the unit goes to the next worker, attempt counted
    other = await api.grant("w-2")
    assert (other.units[0].spec.unit, other.units[0].spec.attempt) == (0, 1)
    status, headers, reply = await api.request("POST", api.heartbeat_path(grant.lease_id), HEARTBEAT_BODY)
    assert_problem(status, headers, reply, 409, "not-holder")


async def test_a_heartbeat_after_a_server_restart_readopts_the_lease(api: ApiHarness) -> None:
    grant = await api.grant("w-1", max_units=2)
    await api.restart()  # a new service, opened from the store's checkpoint; lease ids are gone

    # Meanwhile nobody else is given the restarted lease's units.
    other = await api.grant("w-2", max_units=2)
    assert [u.spec.unit for u in other.units] == [2, 3]

    units = [UnitAttempt(unit=u.spec.unit, attempt=u.spec.attempt) for u in grant.units]
    body = HeartbeatRequest(worker="w-1", pool=POOL, units=units)
    status, reply = await api.post(api.heartbeat_path(grant.lease_id), body)
    assert status == 200
    beat = HeartbeatReply.model_validate(reply)
    assert (beat.readopted, beat.cancel) == (True, [])
    assert api.service.book.lease(grant.lease_id).units == (0, 1)  # type: ignore[union-attr]

    status, reply = await api.deliver(grant.units[0])
    assert (status, reply["status"]) == (200, "accepted")


async def test_a_finished_campaign_known_by_its_token_only_tells_its_workers_to_exit(api: ApiHarness) -> None:
    # The operator restarted after the campaign ended and did not reopen it: it knows the token only.
    api.campaigns.remove(NAMESPACE, NAME)
    api.campaigns.add_finished(NAMESPACE, NAME, TOKEN)

    status, reply = await api.post(api.base + "/leases", LeaseRequest.model_validate(LEASE_BODY))
    assert status == 200
    assert NoLease.model_validate(reply).reason is NoLeaseReason.finished  # the worker exits 0
    async with LeaseClient(str(api.client.make_url(api.base)), TOKEN) as client:  # as the worker reads it
        got = await client.lease(LeaseRequest.model_validate(LEASE_BODY))
        assert isinstance(got, NoLease)
        assert got.reason is NoLeaseReason.finished
    for endpoint in ("heartbeat", "release"):  # it holds no lease: stop training it
        path, body = ENDPOINTS[endpoint]
        status, headers, problem = await api.request("POST", api.base + path, body)
        assert_problem(status, headers, problem, 409, "not-holder")
    for endpoint in ("complete", "fail"):  # gone, as far as results go
        path, body = ENDPOINTS[endpoint]
        status, headers, problem = await api.request("POST", api.base + path, body)
        assert_problem(status, headers, problem, 401, "unauthorized")
    # Without the token nothing changes: the same 401 as for any campaign.
    status, headers, problem = await api.request(
        "POST", api.base + "/leases", LEASE_BODY, headers={"Authorization": "Bearer wrong"}
    )
    assert_problem(status, headers, problem, 401, "unauthorized")

    # Serving the campaign again (re-created on the same name) replaces the finished entry.
    api.campaigns.add(NAMESPACE, NAME, api.service)
    grant = await api.grant("w-1")
    assert grant.units
    api.campaigns.remove(NAMESPACE, NAME)  # and deleting it forgets the token too
    status, headers, problem = await api.request("POST", api.base + "/leases", LEASE_BODY)
    assert_problem(status, headers, problem, 401, "unauthorized")


# ---------------------------------------------------------------------------------- upload route


def _with_query(url: str, **changes: str) -> str:
    parts = urllib.parse.urlsplit(url)
    query = dict(urllib.parse.parse_qsl(parts.query))
    query.update(changes)
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))


def _tamper(url: str) -> str:
    sig = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))["sig"]
    return _with_query(url, sig=sig[:-1] + ("0" if sig[-1] != "0" else "1"))


def _other_key(url: str) -> str:
    return url.replace("/model.safetensors?", "/history.csv?")


def _later_expiry(url: str) -> str:
    expires = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))["expires"]
    return _with_query(url, expires=str(int(expires) + 3600))


@pytest.mark.parametrize(
    ("forge", "advance"),
    [
        pytest.param(_tamper, 0.0, id="tampered signature"),
        pytest.param(_other_key, 0.0, id="signed for another key"),
        pytest.param(_later_expiry, 0.0, id="expiry pushed later"),
        pytest.param(lambda u: u.split("?")[0], 0.0, id="no signature"),
        pytest.param(lambda u: u, 24 * 3600 + 1.0, id="expired"),
    ],
)
async def test_the_upload_route_refuses_urls_it_did_not_sign_for_this_key_and_time(
    api: ApiHarness, forge: Any, advance: float
) -> None:
    grant = await api.grant("w-1")
    url = forge(grant.units[0].uploads["model.safetensors"])
    api.clock.advance(advance)
    async with api.client.session.put(url, data=b"weights", headers={"Content-Type": "application/octet-stream"}) as r:
        body = await r.json(content_type=None)
        assert_problem(r.status, dict(r.headers), body, 403, "forbidden")
    assert not list(api.store.list("_mlds/staging/"))  # nothing was written


# ------------------------------------------------------------------------------- the worker client


async def test_the_worker_client_maps_answers_to_what_the_worker_does_next(api: ApiHarness) -> None:
    url = str(api.client.make_url(api.base))
    request = LeaseRequest(worker="w-1", pool=POOL, accelerator="cpu", device_name="cpu", max_units=1)
    async with LeaseClient(url, "wrong") as client:
        with pytest.raises(Unauthorized):
            await client.lease(request)
    async with LeaseClient(url, TOKEN) as client:
        grant = await client.lease(request)
        assert isinstance(grant, LeaseGrant)
        with pytest.raises(NotHeld):
            await client.heartbeat(grant.lease_id, HeartbeatRequest(worker="w-2", pool=POOL, units=[]))
        with pytest.raises(Rejected) as rejected:
            await client.fail(FailRequest(worker="w-1", pool=POOL, unit=99, attempt=0, kind=FailKind.fail))
        assert rejected.value.status == 404
    async with LeaseClient("http://127.0.0.1:9/v1/campaigns/x/y", TOKEN, timeout=2) as client:
        with pytest.raises(Unreachable):
            await client.lease(request)


# ------------------------------------------------------------------------------------ housekeeping


async def test_the_served_openapi_document_is_the_generated_one(api: ApiHarness) -> None:
    status, _, doc = await api.request("GET", "/openapi.json", headers={})
    assert status == 200
    assert doc == json.loads(json.dumps(openapi_document()))
    assert set(doc["paths"]) >= {api.base.replace(f"{NAMESPACE}/{NAME}", "{namespace}/{name}") + "/leases"}
    status, _, health = await api.request("GET", "/healthz", headers={})
    assert (status, health) == (200, {"status": "ok", "campaigns": 1})


def test_the_checked_in_openapi_document_is_not_stale() -> None:
    checked_in = default_root() / "docs" / "lease-api.openapi.json"
    assert checked_in.read_text(encoding="utf-8") == render_openapi_json(), "stale: run `make generate`"


async def test_the_request_observer_sees_route_templates_never_unit_or_lease_ids(tmp_path: Path) -> None:
    seen: list[tuple[str, int]] = []
    async with open_api(tmp_path, observer=lambda endpoint, status, _: seen.append((endpoint, status))) as api:
        grant = await api.grant("w-1")
        await api.post(api.heartbeat_path(grant.lease_id), HEARTBEAT_BODY)
        await api.post(api.complete_path(7), {**COMPLETE_BODY, "unit": 7})
        await api.request("GET", "/nowhere")
    base = "/v1/campaigns/{namespace}/{name}"
    assert seen == [
        (f"{base}/leases", 200),
        (f"{base}/leases/{{lease}}/heartbeat", 200),
        (f"{base}/units/{{unit}}/complete", 422),
        ("unmatched", 404),
    ]
