"""The route table is the one list of the lease API: the server, its OpenAPI document and the worker agree."""

from __future__ import annotations

import pytest
from mlds_contract.lease import RejectReason
from mlds_contract.routes import CAMPAIGN_PATH, COMPLETE, ERRORS, HEALTH, HEARTBEAT, LEASE, ROUTES, UPLOAD
from mlds_operator.leases.http import create_app, openapi_document
from mlds_operator.leases.registry import Campaigns


def test_the_server_serves_exactly_the_routes_of_the_table() -> None:
    app = create_app(Campaigns())
    served = {
        (r.method, r.resource.canonical) for r in app.router.routes() if r.resource is not None and r.method != "HEAD"
    }
    assert served == {(route.method, route.path) for route in ROUTES}


def test_the_openapi_document_lists_each_documented_route_with_its_own_errors() -> None:
    paths = openapi_document()["paths"]
    for route in ROUTES:
        if not route.documented:
            assert route.path not in paths
            continue
        op = paths[route.path][route.method.lower()]
        assert op["operationId"] == route.operation
        assert op["summary"] == route.summary
        assert set(op["responses"]) == {"200", *(str(s) for s in route.errors)}
        for status in route.errors:
            assert op["responses"][str(status)]["description"] == ERRORS[status]
    # A lease is never answered "unknown unit"; a completion never "not the lease holder".
    assert "404" not in paths[LEASE.path]["post"]["responses"]
    assert "409" not in paths[COMPLETE.path]["post"]["responses"]


def test_a_worker_appends_campaign_paths_to_its_base_url() -> None:
    assert LEASE.campaign_path() == "/leases"
    assert HEARTBEAT.campaign_path(lease="L-1") == "/leases/L-1/heartbeat"
    assert COMPLETE.campaign_path(unit=7) == "/units/7/complete"
    assert COMPLETE.path == CAMPAIGN_PATH + "/units/{unit}/complete"
    with pytest.raises(ValueError, match="not a campaign route"):
        HEALTH.campaign_path()


def test_uploads_are_served_for_keys_with_slashes_but_left_out_of_the_document() -> None:
    assert UPLOAD.parameters == ("key",)
    assert "key" in UPLOAD.multi_segment
    assert not UPLOAD.documented


def test_rejection_reasons_are_the_problem_types_and_metric_labels() -> None:
    assert [r.value for r in RejectReason] == [
        "missing",
        "size_mismatch",
        "sha_mismatch",
        "bad_files",
        "bad_meta",
        "bad_model",
    ]
