"""The lease server's Prometheus metrics (mlds_operator.leases.metrics): what each protocol event counts, the
naming rules of STYLE.md #10, and campaign series that vanish with their campaign.

Each test serves one campaign over the real lease API (tests/api_fixtures.py, fake clock) with its
:class:`CampaignMetrics`, drives the protocol over HTTP and reads the text exposition back through
prometheus_client's own parser, as Prometheus would see it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

import pytest
from aiohttp import ClientSession
from aiohttp.test_utils import TestClient, TestServer
from mlds_contract.files import load_campaign
from mlds_contract.lease import FailKind, FailRequest, FileDigest, HeartbeatRequest, RejectReason, UnitAttempt
from mlds_operator.leases.http import create_app
from mlds_operator.leases.metrics import (
    ATTEMPT_FAILURE_REASONS,
    METRIC_NAMES,
    CampaignMetrics,
    ServerMetrics,
    instrument,
)
from mlds_operator.run.runner import LOCAL_NAMESPACE, RunOptions, _open_server
from prometheus_client.parser import text_string_to_metric_families

from tests.api_fixtures import NAME, NAMESPACE, POOL, WALL_EPOCH, ApiHarness, open_api, result_files
from tests.run_fixtures import write_campaign

Labels = frozenset[tuple[str, str]]
POOL_KEY = {"namespace": NAMESPACE, "campaign": NAME, "pool": POOL, "accelerator": "cpu"}


def samples(server: ServerMetrics) -> dict[tuple[str, Labels], float]:
    """Every sample of a scrape, keyed by sample name and labels."""
    out: dict[tuple[str, Labels], float] = {}
    for family in text_string_to_metric_families(server.exposition().decode()):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(scraped: Mapping[tuple[str, Labels], float], name: str, **labels: str) -> float | None:
    return scraped.get((name, frozenset(labels.items())))


def pool_value(scraped: Mapping[tuple[str, Labels], float], name: str, **extra: str) -> float | None:
    return value(scraped, name, **POOL_KEY, **extra)


async def instrumented(api: ApiHarness) -> ServerMetrics:
    instrument(api.service, NAMESPACE)
    return ServerMetrics(api.campaigns, component="operator")


async def test_a_lease_story_is_counted_event_by_event(tmp_path: Path) -> None:
    async with open_api(tmp_path, networks=8, lease_seconds=60) as api:
        server = await instrumented(api)
        before = samples(server)
        # Every series of the spec's pool exists at zero before the first event (ratios and rate() see it).
        for name in ("mlds_leases_granted_total", "mlds_results_verified_total", "mlds_uploaded_bytes_total"):
            assert pool_value(before, name) == 0.0, name
        for reason in ATTEMPT_FAILURE_REASONS:
            assert pool_value(before, "mlds_attempts_failed_total", reason=reason) == 0.0
        for reason in RejectReason:
            assert pool_value(before, "mlds_results_rejected_total", reason=reason) == 0.0
        assert value(before, "mlds_campaign_last_verified_timestamp_seconds", namespace=NAMESPACE, campaign=NAME) == (
            WALL_EPOCH + 1000.0
        )

        grant = await api.grant("w-1", max_units=2)
        heartbeat = HeartbeatRequest(
            worker="w-1", pool=POOL, units=[UnitAttempt(unit=u.spec.unit, attempt=0) for u in grant.units]
        )
        assert (await api.post(api.heartbeat_path(grant.lease_id), heartbeat))[0] == 200
        api.clock.advance(5)
        first, second = grant.units
        files = result_files(first.spec)
        assert (await api.deliver(first))[0] == 200
        # A duplicate (the reply was lost, the worker asks again): dropped, not counted twice.
        assert (await api.post(api.complete_path(first.spec.unit), api.completion(first, files)))[0] == 200
        bad = {**{n: FileDigest(sha256=d.sha256, size=d.size) for n, d in api.completion(second, files).files.items()}}
        await api.upload(second, result_files(second.spec))
        status, _ = await api.post(
            api.complete_path(second.spec.unit), api.completion(second, result_files(second.spec), declared=bad)
        )
        assert status == 422  # declared another unit's digests
        fail = FailRequest(worker="w-1", pool=POOL, unit=second.spec.unit, attempt=0, kind=FailKind.fail)
        assert (await api.post(api.fail_path(second.spec.unit), fail))[0] == 200

        retry = await api.grant("w-2", max_units=2)  # unit 1 again (attempt 1) and unit 2 (attempt 0)
        assert [(u.spec.unit, u.spec.attempt) for u in retry.units] == [(1, 1), (2, 0)]
        api.clock.advance(61)
        await api.service.tick()  # w-2 never heartbeats: its lease expires with both units

        s = samples(server)
    assert pool_value(s, "mlds_leases_granted_total") == 2
    assert pool_value(s, "mlds_leases_extended_total") == 1
    assert pool_value(s, "mlds_leases_expired_total") == 1
    assert pool_value(s, "mlds_units_reissued_total") == 1
    assert pool_value(s, "mlds_results_verified_total") == 1
    assert pool_value(s, "mlds_results_duplicate_total") == 1
    assert pool_value(s, "mlds_results_rejected_total", reason="sha_mismatch") == 1
    assert pool_value(s, "mlds_results_rejected_total", reason="missing") == 0
    assert pool_value(s, "mlds_attempts_failed_total", reason="error") == 1
    assert pool_value(s, "mlds_attempts_failed_total", reason="expired") == 2
    assert pool_value(s, "mlds_attempts_failed_total", reason="unconverged") == 0
    published = [api.store.get_bytes(k) or b"" for k in api.store.list(f"{first.spec.key}/")]
    assert pool_value(s, "mlds_uploaded_bytes_total") == sum(len(d) for d in published)  # meta.json is the server's
    # Per-network figures as the worker reported them (12.5 s, 1 epoch in the harness's completion).
    assert pool_value(s, "mlds_network_training_seconds_count") == 1
    assert pool_value(s, "mlds_network_training_seconds_sum") == 12.5
    assert pool_value(s, "mlds_network_training_seconds_bucket", le="10.0") == 0
    assert pool_value(s, "mlds_network_training_seconds_bucket", le="30.0") == 1
    assert pool_value(s, "mlds_network_epochs_bucket", le="1.0") == 1
    key = {"namespace": NAMESPACE, "campaign": NAME}
    assert {st: value(s, "mlds_campaign_units", **key, state=st) for st in ("pending", "leased", "succeeded")} == {
        "pending": 7,
        "leased": 0,
        "succeeded": 1,
    }
    assert value(s, "mlds_campaign_phase", **key, phase="Running") == 1
    assert value(s, "mlds_campaign_phase", **key, phase="Pending") == 0
    assert value(s, "mlds_campaign_last_verified_timestamp_seconds", **key) == WALL_EPOCH + 1005.0
    assert value(s, "mlds_campaign_workers", **POOL_KEY) == 2
    assert value(s, "mlds_campaign_pool_units", **POOL_KEY, state="succeeded") == 1


async def test_an_unconverged_result_is_a_failed_attempt_and_a_paused_expiry_is_not(tmp_path: Path) -> None:
    async with open_api(tmp_path, networks=4, lease_seconds=60) as api:
        server = await instrumented(api)
        (leased,) = (await api.grant("w-1")).units
        files = result_files(leased.spec, converged=False)
        await api.upload(leased, files)
        done = api.completion(leased, files, converged=False)
        assert (await api.post(api.complete_path(leased.spec.unit), done))[0] == 200
        await api.grant("w-1", max_units=2)
        api.service.book.paused = True  # suspended: the workers were stopped, the units are not to blame
        api.clock.advance(61)
        await api.service.tick()
        s = samples(server)
    assert pool_value(s, "mlds_attempts_failed_total", reason="unconverged") == 1
    assert pool_value(s, "mlds_leases_expired_total") == 1
    assert pool_value(s, "mlds_attempts_failed_total", reason="expired") == 0
    assert pool_value(s, "mlds_results_verified_total") == 0
    assert pool_value(s, "mlds_network_training_seconds_count") == 0
    assert value(s, "mlds_campaign_phase", namespace=NAMESPACE, campaign=NAME, phase="Suspended") == 1


async def test_every_series_of_a_campaign_vanishes_when_it_is_no_longer_served(tmp_path: Path) -> None:
    async with open_api(tmp_path, networks=4) as api:
        server = await instrumented(api)
        await api.deliver((await api.grant("w-1")).units[0])
        with_campaign = samples(server)
        api.campaigns.remove(NAMESPACE, NAME)
        without = samples(server)
    assert any(dict(labels).get("campaign") == NAME for _, labels in with_campaign)
    assert [name for name, labels in without if "campaign" in dict(labels)] == []
    assert (
        value(
            without,
            "mlds_build_info",
            version=_only_label(without, "mlds_build_info", "version"),
            python=_only_label(without, "mlds_build_info", "python"),
            component="operator",
        )
        == 1
    )


def _only_label(scraped: Mapping[tuple[str, Labels], float], name: str, label: str) -> str:
    (found,) = {dict(labels)[label] for n, labels in scraped if n == name}
    return found


async def test_metrics_are_served_beside_the_lease_api_with_its_latency_by_route(tmp_path: Path) -> None:
    async with open_api(tmp_path, networks=4) as api:
        server = await instrumented(api)
        app = create_app(api.campaigns, local_store=api.store, observer=server.observe_request)
        server.add_route(app)
        client: TestClient[object, object] = TestClient(TestServer(app, host="127.0.0.1"))
        await client.start_server()
        try:
            headers = {"Authorization": f"Bearer {api.token}"}
            body = {"worker": "w-9", "pool": POOL, "accelerator": "cpu", "deviceName": "cpu", "maxUnits": 1}
            async with client.post(f"{api.base}/leases", json=body, headers=headers) as resp:
                assert resp.status == 200
            async with client.post(f"{api.base}/leases", json=body) as resp:
                assert resp.status == 401
            async with client.get("/metrics") as resp:
                assert resp.status == 200
                assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
                text = await resp.text()
        finally:
            await client.close()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    latency = families["mlds_api_request_duration_seconds"]
    counts = {(s.labels["endpoint"], s.labels["code"]): s.value for s in latency.samples if s.name.endswith("_count")}
    assert counts[("/v1/campaigns/{namespace}/{name}/leases", "200")] == 1
    assert counts[("/v1/campaigns/{namespace}/{name}/leases", "401")] == 1
    assert families["mlds_leases_granted"].type == "counter"


_ID_LIKE = re.compile(r"^[A-Za-z0-9_-]{20,}$|^\d+$")


async def test_names_follow_the_prometheus_conventions_and_no_label_carries_an_id(tmp_path: Path) -> None:
    async with open_api(tmp_path, networks=4) as api:
        server = await instrumented(api)
        grant = await api.grant("worker-with-a-long-pod-name-0")
        await api.deliver(grant.units[0], worker="worker-with-a-long-pod-name-0")
        await api.grant("worker-with-a-long-pod-name-0")
        families = list(text_string_to_metric_families(server.exposition().decode()))
    ours = {f.name: f for f in families if f.name.startswith("mlds_")}
    assert set(ours) == set(METRIC_NAMES)
    for name, family in ours.items():
        labels = {k for s in family.samples for k in s.labels} - {"le"}
        for label in labels:
            assert label in family.documentation, f"{name}: help text does not name label {label!r}"
        if family.type == "counter":
            assert all(s.name in (f"{name}_total",) for s in family.samples), name
        assert not name.endswith("_total")
        assert not re.search(r"_(ms|milliseconds|kb|mb|minutes|hours)\b", name), name
        for s in family.samples:
            assert not s.name.endswith("_created"), s.name
            for label, text in s.labels.items():
                assert label not in ("unit", "lease", "lease_id", "worker"), (name, label)
                if label not in ("le", "code", "version", "python"):
                    assert not _ID_LIKE.match(text), (name, label, text)
    assert ours["mlds_network_training_seconds"].type == "histogram"
    assert ours["mlds_campaign_units"].type == "gauge"


def test_a_pool_workers_name_that_is_not_in_the_spec_is_labelled_unknown() -> None:
    metrics = CampaignMetrics("ns", "c", {"gpu": "nvidia"}, wall=lambda: 0.0)
    metrics.lease_granted("stray", units=1, reissued=0)
    metrics.lease_granted("gpu", units=1, reissued=0)
    seen = {
        (s.labels["pool"], s.labels["accelerator"])
        for family in metrics.collect()
        if family.name == "mlds_leases_granted"
        for s in family.samples
        if s.name.endswith("_total")
    }
    assert seen == {("stray", "unknown"), ("gpu", "nvidia")}


@pytest.mark.parametrize("reason", list(RejectReason))
def test_help_text_lists_every_rejection_reason(reason: str) -> None:
    metrics = CampaignMetrics("ns", "c", {}, wall=lambda: 0.0)
    (family,) = (f for f in metrics.collect() if f.name == "mlds_results_rejected")
    assert reason in family.documentation


async def test_mlds_run_serves_the_same_metrics_on_their_own_port_not_the_lease_port(tmp_path: Path) -> None:
    path = write_campaign(tmp_path / "campaign.yaml", name="watched")
    opts = RunOptions(workers=1, store_dir=tmp_path / "store", metrics_port=0)
    server = await _open_server(load_campaign(path), path, opts)
    try:
        base = server.url.split("/v1/")[0]
        metrics_port = json.loads((server.state / "run.json").read_text())["metricsPort"]
        async with ClientSession() as http:
            async with http.get(f"{base}/metrics") as resp:
                assert resp.status == 404  # workers reach the lease port: it lists no campaigns (issue 13)
            async with http.get(f"http://127.0.0.1:{metrics_port}/metrics") as resp:
                assert resp.status == 200
                text = await resp.text()
    finally:
        await server.close()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    (build,) = families["mlds_build_info"].samples
    assert build.labels["component"] == "run"
    pending = {
        s.labels["state"]: s.value
        for s in families["mlds_campaign_units"].samples
        if s.labels["namespace"] == LOCAL_NAMESPACE and s.labels["campaign"] == "watched"
    }
    assert pending["pending"] == server.service.book.total
    granted = families["mlds_leases_granted"].samples
    assert {(s.labels["pool"], s.labels["accelerator"]) for s in granted} == {("local", "cpu")}


async def test_a_drained_campaign_is_running_until_finalized_as_its_status_says(tmp_path: Path) -> None:
    # Every unit succeeded, the manifest not yet written: the metric used to say Succeeded while the
    # CR's status said Running. Both now come from mlds_contract.campaign.campaign_phase.
    async with open_api(tmp_path, networks=2) as api:
        server = await instrumented(api)
        for leased in (await api.grant("w-1", max_units=2)).units:
            assert (await api.deliver(leased))[0] == 200
        assert api.service.book.finished
        assert not api.service.finalized
        writing = samples(server)
        await api.service.tick()  # finalizes
        assert api.service.finalized
        done = samples(server)
    key = {"namespace": NAMESPACE, "campaign": NAME}
    assert value(writing, "mlds_campaign_phase", **key, phase="Running") == 1
    assert value(writing, "mlds_campaign_phase", **key, phase="Succeeded") == 0
    assert value(done, "mlds_campaign_phase", **key, phase="Succeeded") == 1
    assert value(done, "mlds_campaign_phase", **key, phase="Running") == 0
