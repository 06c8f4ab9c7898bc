"""The lease protocol's wire types: camelCase JSON, round trips, and readable refusals of bad bodies."""

from __future__ import annotations

import inspect
import json
from datetime import UTC, datetime
from typing import Any

import pytest
from mlds_contract import lease as wire
from mlds_contract.campaign import CampaignSpec, Model, Workload
from mlds_contract.lease import (
    CompleteBatchItem,
    CompleteBatchReply,
    CompleteBatchRequest,
    CompleteReply,
    CompleteRequest,
    ErrorReply,
    FailKind,
    FailReply,
    FailRequest,
    FileDigest,
    HeartbeatReply,
    HeartbeatRequest,
    LeasedUnit,
    LeaseGrant,
    LeaseRequest,
    NoLease,
    NoLeaseReason,
    Outcome,
    RejectReason,
    ReleaseReply,
    ReleaseRequest,
    StackReport,
    UnitAttempt,
    UnitState,
)
from mlds_contract.plan import unit_spec
from pydantic import BaseModel, ValidationError

SHA = "ab" * 32
DEADLINE = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)


def a_unit(unit: int = 3, attempt: int = 1) -> LeasedUnit:
    spec = CampaignSpec(workload=Workload(dataset="ds1", machines=["ParityMachine"]), networks_per_target=5)
    return LeasedUnit(
        spec=unit_spec(spec, unit, attempt, campaign="parity"),
        uploads={"model.safetensors": "http://s3.local/b/k?X-Amz-Signature=1", "meta.json": "http://s3.local/b/m"},
    )


EXAMPLES: list[Model] = [
    LeaseRequest(
        worker="parity-cpu-0-x7k2p", pool="cpu", accelerator="nvidia", device_name="NVIDIA H100", max_units=16
    ),
    LeaseRequest(
        worker="parity-cpu-0-x7k2p",
        pool="cpu",
        accelerator="cpu",
        device_name="cpu",
        max_units=3,
        stack=StackReport(slots=64, live=61, member_seconds=3050.5, slot_seconds=3200.0),
    ),
    LeaseGrant(
        lease_id="Z3c9xQk1_-aaaaaaaaaa",
        deadline=DEADLINE,
        lease_seconds=600,
        heartbeat_seconds=200,
        units=[a_unit(3), a_unit(4, 0).model_copy(update={"bundle_upload": "http://127.0.0.1:9/v1/objects/b"})],
    ),
    NoLease(reason=NoLeaseReason.busy, retry_after_seconds=5),
    HeartbeatRequest(worker="w-1", pool="cpu", units=[UnitAttempt(unit=3, attempt=1), UnitAttempt(unit=4, attempt=0)]),
    HeartbeatReply(deadline=DEADLINE, lease_seconds=600, cancel=[4], readopted=True),
    CompleteRequest(
        worker="w-1",
        pool="cpu",
        unit=3,
        attempt=1,
        converged=True,
        files={"model.safetensors": FileDigest(sha256=SHA, size=17_000), "meta.json": FileDigest(sha256=SHA, size=900)},
        training_seconds=41.5,
        epochs=812,
        bundled=True,
    ),
    CompleteReply(status=Outcome.duplicate, state=UnitState.succeeded),
    CompleteBatchRequest(
        completions=[
            CompleteRequest(
                worker="w-1",
                pool="cpu",
                unit=unit,
                attempt=0,
                converged=True,
                files={"model.safetensors": FileDigest(sha256=SHA, size=17_000)},
                training_seconds=30.0,
                epochs=300,
            )
            for unit in (3, 4)
        ]
    ),
    CompleteBatchReply(
        results=[
            CompleteBatchItem(unit=3, status=Outcome.accepted, state=UnitState.succeeded),
            CompleteBatchItem(
                unit=4,
                error=ErrorReply(
                    type="urn:mlds:lease:result-sha_mismatch", title="Result rejected", status=422, detail="unit 4: ..."
                ),
            ),
        ]
    ),
    FailRequest(worker="w-1", pool="cpu", unit=3, attempt=1, kind=FailKind.release, reason="SIGTERM"),
    FailReply(status=Outcome.accepted, state=UnitState.pending),
    ReleaseRequest(worker="w-1", reason="shutting down"),
    ReleaseReply(released=[3, 4]),
    ErrorReply(
        type="urn:mlds:lease:not-holder",
        title="Not the lease holder",
        status=409,
        detail="lease x is held by another worker",
    ),
    LeaseRequest(
        worker="parity-cpu-0-x7k2p", pool="cpu", accelerator="cpu", device_name="cpu", max_units=4, bundle_uploads=True
    ),
]


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda m: type(m).__name__)
def test_every_message_survives_a_json_round_trip(message: Model) -> None:
    text = json.dumps(message.wire())
    assert type(message).model_validate_json(text) == message


def test_every_wire_type_has_an_example_here() -> None:
    models = {
        name
        for name, obj in vars(wire).items()
        if inspect.isclass(obj) and issubclass(obj, Model) and obj.__module__ == wire.__name__
    }
    assert models - {"LeasedUnit", "UnitAttempt", "FileDigest", "StackReport", "CompleteBatchItem"} == {
        type(m).__name__ for m in EXAMPLES
    }


def _all_models(model: type[BaseModel], seen: set[type[BaseModel]]) -> set[type[BaseModel]]:
    if model in seen:
        return seen
    seen.add(model)
    for f in model.model_fields.values():
        for arg in [f.annotation, *getattr(f.annotation, "__args__", ())]:
            for inner in [arg, *getattr(arg, "__args__", ())]:
                if inspect.isclass(inner) and issubclass(inner, BaseModel):
                    _all_models(inner, seen)
    return seen


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda m: type(m).__name__)
def test_every_field_says_what_it_is(message: Model) -> None:
    for model in _all_models(type(message), set()):
        missing = [name for name, f in model.model_fields.items() if not f.description]
        assert missing == [], f"{model.__name__} fields without a description: {missing}"


def test_keys_are_camel_case_on_the_wire() -> None:
    grant = EXAMPLES[2].wire()
    assert set(grant) == {"leaseId", "deadline", "leaseSeconds", "heartbeatSeconds", "speculative", "units", "cancel"}
    assert grant["deadline"] == "2026-01-01T12:00:00Z"
    assert set(grant["units"][0]) == {"spec", "uploads"}
    assert grant["units"][0]["spec"]["initSeed"] > 0
    assert grant["units"][0]["spec"]["attempt"] == 1
    request = EXAMPLES[0].wire()
    assert {"deviceName", "maxUnits", "allowSpeculative"} <= set(request)
    complete = EXAMPLES[6].wire()
    assert {"trainingSeconds", "files"} <= set(complete)
    assert "meta" not in complete  # meta.json travels as an uploaded file the server reads, never inline
    assert set(complete["files"]["model.safetensors"]) == {"sha256", "size"}


def test_python_names_are_accepted_too() -> None:
    body = {"worker": "w", "pool": "cpu", "accelerator": "cpu", "device_name": "cpu", "max_units": 1}
    assert LeaseRequest.model_validate(body).max_units == 1


def _error(model: type[Model], body: dict[str, Any]) -> str:
    with pytest.raises(ValidationError) as info:
        model.model_validate(body)
    return str(info.value)


LEASE_REQUEST = {"worker": "w-1", "pool": "cpu", "accelerator": "cpu", "deviceName": "cpu", "maxUnits": 4}
COMPLETE = {
    "worker": "w-1",
    "pool": "cpu",
    "unit": 1,
    "attempt": 0,
    "converged": True,
    "trainingSeconds": 1,
    "epochs": 1,
    "files": {"model.safetensors": {"sha256": SHA, "size": 1}},
}
GRANT = {"leaseId": "abcdefgh", "deadline": "2026-01-01T12:00:00Z", "leaseSeconds": 1, "heartbeatSeconds": 1}


def param(model: type[Model], body: dict[str, Any], message: str, story: str) -> Any:
    return pytest.param(model, body, message, id=story)


@pytest.mark.parametrize(
    ("model", "body", "message"),
    [
        param(LeaseRequest, {**LEASE_REQUEST, "lease": 1}, "lease\n  Extra inputs are not permitted", "unknown key"),
        param(
            LeaseRequest, {**LEASE_REQUEST, "maxUnits": "x"}, "maxUnits\n  Input should be a valid integer", "a word"
        ),
        param(LeaseRequest, {**LEASE_REQUEST, "maxUnits": 0}, "greater than or equal to 1", "zero units"),
        param(LeaseRequest, {**LEASE_REQUEST, "accelerator": "tpu"}, "'cpu', 'nvidia' or 'rocm'", "a TPU"),
        param(LeaseRequest, {**LEASE_REQUEST, "pool": "CPU_Pool"}, "pool\n  String should match", "not a DNS label"),
        param(LeaseRequest, {"pool": "cpu"}, "worker\n  Field required", "missing worker"),
        param(
            HeartbeatRequest,
            {"worker": "w", "pool": "cpu", "units": [{"unit": 1, "attempt": 0}, {"unit": 1, "attempt": 1}]},
            "unit 1 is listed twice",
            "a unit listed twice",
        ),
        param(HeartbeatReply, {"deadline": "2026-01-01T12:00:00", "leaseSeconds": 5}, "timezone", "no time zone"),
        param(
            FailRequest,
            {"worker": "w", "pool": "cpu", "unit": 1, "attempt": 0, "kind": "crash"},
            "'fail' or 'release'",
            "unknown failure kind",
        ),
        param(
            CompleteRequest,
            {**COMPLETE, "files": {"../../etc/passwd": {"sha256": SHA, "size": 1}}},
            "files.`../../etc/passwd`.[key]\n  String should match pattern",
            "a file name that climbs out of the unit folder",
        ),
        param(
            CompleteRequest,
            {**COMPLETE, "files": {"model.safetensors": {"sha256": SHA, "size": (256 << 20) + 1}}},
            "Input should be less than or equal to 268435456",
            "a file larger than the server holds in memory to verify it",
        ),
        param(
            CompleteRequest,
            {**COMPLETE, "files": {"model.safetensors": {"sha256": "ABC", "size": 1}}},
            "sha256\n  String should match pattern '^[0-9a-f]{64}$'",
            "a digest that is not lower-case hex sha256",
        ),
        param(
            CompleteRequest, {**COMPLETE, "files": {}}, "files\n  Dictionary should have at least 1 item", "no files"
        ),
        param(
            CompleteRequest, {**COMPLETE, "unit": -1}, "unit\n  Input should be greater than or equal to 0", "unit -1"
        ),
        param(LeaseGrant, {**GRANT, "units": []}, "units\n  List should have at least 1 item", "a grant of nothing"),
        param(StackReport, {"slots": 4, "live": 5}, "live (5) exceeds slots (4)", "a stack fuller than full"),
        param(
            StackReport,
            {"slots": 4, "live": 4, "memberSeconds": 10.0, "slotSeconds": 5.0},
            "memberSeconds exceeds slotSeconds",
            "more member-seconds than slot-seconds (occupancy over 100%)",
        ),
        param(
            StackReport,
            {"slots": 4, "live": 4, "memberSeconds": float("inf"), "slotSeconds": float("inf")},
            "Input should be a finite number",
            "infinite totals (an occupancy of NaN)",
        ),
        param(
            StackReport,
            {"slots": 4, "live": 4, "memberSeconds": 0.0, "slotSeconds": 1e300},
            "less than or equal to",
            "totals no worker could have run up",
        ),
    ],
)
def test_bad_bodies_are_refused_with_a_readable_message(model: type[Model], body: dict[str, Any], message: str) -> None:
    assert message in _error(model, body)


def test_unset_optional_fields_stay_off_the_wire() -> None:
    assert ErrorReply(title="Not found").wire() == {"type": "about:blank", "title": "Not found"}


@pytest.mark.parametrize("reason", list(RejectReason), ids=str)
def test_a_rejection_reason_is_read_back_from_the_problem_type_the_server_names_it_by(reason: RejectReason) -> None:
    assert RejectReason.of_problem(f"urn:mlds:lease:{reason.problem_kind}") is reason


@pytest.mark.parametrize(
    "problem_type",
    ["urn:mlds:lease:not-issued", "urn:mlds:lease:result-", "urn:mlds:lease:result-nonsense", "result-missing", ""],
)
def test_any_other_problem_names_no_rejection_reason(problem_type: str) -> None:
    assert RejectReason.of_problem(problem_type) is None


def test_only_rejections_of_the_staged_copy_are_cured_by_a_fresh_upload() -> None:
    cured = {reason.value for reason in RejectReason if reason.cured_by_upload}
    assert cured == {"missing", "size_mismatch", "sha_mismatch"}


def test_bundle_fields_are_sent_only_when_used() -> None:
    # Workers and servers that predate bundles refuse unknown keys, so a peer that does not use bundles
    # must see exactly what it always saw, whatever serialisation the sender uses.
    request = LeaseRequest(worker="w-1", pool="cpu", accelerator="cpu", device_name="cpu", max_units=1)
    unit = a_unit()
    completion = CompleteRequest(
        worker="w-1",
        pool="cpu",
        unit=3,
        attempt=1,
        converged=True,
        files={"model.safetensors": FileDigest(sha256=SHA, size=17_000)},
        training_seconds=41.5,
        epochs=812,
    )
    for message, key in ((request, "bundleUploads"), (unit, "bundleUpload"), (completion, "bundled")):
        assert key not in json.loads(message.model_dump_json(by_alias=True)), key
        assert key not in message.model_dump(by_alias=True), key
    asked = request.model_copy(update={"bundle_uploads": True})
    assert json.loads(asked.model_dump_json(by_alias=True))["bundleUploads"] is True
    offered = unit.model_copy(update={"bundle_upload": "http://127.0.0.1:9/v1/objects/_mlds/staging/3-1-w~bundle"})
    assert json.loads(offered.model_dump_json(by_alias=True))["bundleUpload"].endswith("~bundle")
