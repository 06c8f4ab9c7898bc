"""Observability end to end: a real Prometheus scrapes a real ``mlds operator`` during a small campaign.

The operator is an ``mlds operator`` process against the kmock emulator, its workers real ``mlds worker``
processes started by the test playing the kubelet (the :class:`Kubelet` of tests/operator_processes.py),
storing to moto's S3. Prometheus (Debian's package) scrapes the operator's ``/metrics`` every second and
evaluates a copy of the alert rules rendered with a short stall threshold.

The story: two pools train ds1 networks; one worker is SIGKILLed (its lease expires and its units are
re-issued) and an intruder with the campaign's token completes a unit it never uploaded (rejected:
missing). Then every worker stops with units left: MldsCampaignStalled must fire. Every panel query of
the checked-in dashboard (charts/mlds/dashboards/mlds.json) is then evaluated over the run, each must
return data, and the answers are drawn into a PNG (docs/dashboard.png with MLDS_WRITE_DASHBOARD_PNG=1).
Deleting the campaign removes its series from ``/metrics``.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import shutil
import signal
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession
from mlds_operator.artifacts.alerts import render_rules_yaml
from mlds_operator.artifacts.generate import default_root
from mlds_operator.controller import pods

from tests.dashboard_png import draw_dashboard
from tests.operator_fixtures import (
    CAMPAIGNS,
    SECRETS,
    Cluster,
    campaign_manifest,
    credentials_secret,
    free_port,
)
from tests.operator_processes import NAMESPACE as NS
from tests.operator_processes import Kubelet, operator_process
from tests.prometheus_fixtures import PrometheusServer, prometheus_server, requires_prometheus
from tests.s3_fixtures import S3Server
from tests.waiting import wait_until_async

pytestmark = [pytest.mark.e2e, pytest.mark.slow, requires_prometheus]
pytest_plugins = ["tests.s3_fixtures", "tests.operator_fixtures"]

NAME = "ds1-watched"
ROOT = default_root()
DASHBOARD = ROOT / "charts" / "mlds" / "dashboards" / "mlds.json"
PNG = ROOT / "docs" / "dashboard.png"
JOB = "mlds-operator"
#: Grafana's $__rate_interval for a 1 s scrape and 1 s step is 4 s; a wider window draws smoother panels.
RATE_INTERVAL = "10s"
STALL_SECONDS = 12
TOTAL = 20  # networks in the campaign


def panel_queries(board: dict[str, Any]) -> list[tuple[dict[str, Any], list[dict[str, str]]]]:
    """Each non-row panel with its targets' expressions (variables substituted as Grafana would)."""
    out = []
    for panel in board["panels"]:
        if panel["type"] == "row":
            continue
        targets = []
        for target in panel["targets"]:
            expr = (
                target["expr"]
                .replace("$namespace", NS)
                .replace("$campaign", NAME)
                .replace("$__rate_interval", RATE_INTERVAL)
            )
            assert "$" not in expr, f"{panel['title']}: unsubstituted variable in {expr}"
            targets.append({"expr": expr, "legend": target.get("legendFormat", "")})
        out.append((panel, targets))
    return out


def finite_values(result: list[dict[str, Any]]) -> list[float]:
    return [float(v) for s in result for _, v in s["values"] if not math.isnan(float(v))]


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text: str = resp.read().decode()
        return text


async def stalled_alert(prom: PrometheusServer) -> dict[str, Any] | None:
    for alert in await asyncio.to_thread(prom.alerts):
        labels = alert["labels"]
        if (labels.get("alertname"), labels.get("campaign"), alert["state"]) == ("MldsCampaignStalled", NAME, "firing"):
            return alert
    return None


async def intrude(port: int, token: str) -> int:
    """Lease one unit with the campaign's token, claim it is done without uploading anything, then release it."""
    base = pods.lease_url(f"http://127.0.0.1:{port}", NS, NAME)
    headers = {"Authorization": f"Bearer {token}"}
    worker = {"worker": "intruder-0", "pool": "small"}
    async with ClientSession(headers=headers) as http:
        lease = {**worker, "accelerator": "cpu", "deviceName": "cpu", "maxUnits": 1}
        async with http.post(f"{base}/leases", json=lease) as resp:
            grant = await resp.json()
        assert "leaseId" in grant, grant
        unit = grant["units"][0]["spec"]
        sha = "0" * 64
        complete = {
            **worker,
            "unit": unit["unit"],
            "attempt": unit["attempt"],
            "converged": True,
            "files": {name: {"sha256": sha, "size": 1} for name in grant["units"][0]["uploads"]},
            "trainingSeconds": 1.0,
            "epochs": 1,
        }
        async with http.post(f"{base}/units/{unit['unit']}/complete", json=complete) as resp:
            status = resp.status
        async with http.post(f"{base}/leases/{grant['leaseId']}/release", json={"worker": "intruder-0"}) as resp:
            assert resp.status == 200, await resp.text()
    return status


async def test_prometheus_scrapes_a_campaign_every_panel_has_data_and_a_stalled_campaign_alerts(
    cluster: Cluster, s3_server: S3Server, s3_bucket: str, tmp_path: Path
) -> None:
    await cluster.create(SECRETS, credentials_secret(NS, "s3-credentials", s3_server.access_key, s3_server.secret_key))
    port = free_port()
    metrics_port = free_port()  # /metrics has a port of its own; the lease port does not serve it
    operator = operator_process(cluster, tmp_path, port, metrics_port)
    kubelet = Kubelet(cluster, tmp_path)
    manifest = campaign_manifest(
        NAME,
        NS,
        storage=s3_server.storage(s3_bucket, NAME),
        pools=[
            {"name": "small", "accelerator": "cpu", "replicas": 1, "unitsPerLease": 1},
            {"name": "large", "accelerator": "cpu", "replicas": 1, "unitsPerLease": 2},
        ],
        networks_per_target=TOTAL // 2,  # the workers stop with some left
        # Stricter than the fixtures' relaxed loss: a network takes seconds, not a fraction of one, so on
        # an idle machine the campaign cannot finish before the killed worker's lease has expired.
        training={"targetLoss": 0.01},
        lease_seconds=10,  # the shortest allowed: the killed worker's lease expires within the test
    )
    test_rules = render_rules_yaml(
        stall_seconds=STALL_SECONDS, stall_for="2s", expiry_window="30s", failure_window="30s", interval="1s"
    )
    board = json.loads(DASHBOARD.read_text())
    with prometheus_server(
        tmp_path / "prometheus", job=JOB, targets=[f"127.0.0.1:{metrics_port}"], rules=test_rules
    ) as prom:
        start = time.time()
        operator.start()
        kubelet.start()
        try:
            await wait_until_async(prom.targets_up, what="Prometheus to scrape the operator")
            await cluster.create(CAMPAIGNS, manifest)

            def succeeded() -> int:
                return int(cluster.status(NS, NAME).get("units", {}).get("succeeded", 0))

            def progress() -> object:  # the units' counts and what the worker pods have done and written
                return cluster.status(NS, NAME).get("units"), kubelet.progress()

            await wait_until_async(lambda: succeeded() >= 2, what="the first networks", progress=progress)
            victim = next(p for p in kubelet.alive() if "-small-" in p.name or p.name.endswith("small"))
            victim.proc.send_signal(signal.SIGKILL)  # its lease expires; its unit is re-issued
            secret = cluster.get(SECRETS, NS, pods.secret_name(NAME))
            token = pods.token_from_secret(secret)
            assert token
            assert await intrude(port, token) == 422

            seen = succeeded()
            await wait_until_async(
                lambda: succeeded() >= seen + 2, what="more networks after the kill", progress=progress
            )

            # The killed worker's lease expires (10 s) and a live worker takes its unit again: wait for
            # that before stopping the workers, or fast networks can finish the story without a re-issue.
            async def reissued() -> bool:
                expr = f'sum(mlds_units_reissued_total{{campaign="{NAME}"}})'
                answer = await asyncio.to_thread(prom.query, expr)
                return bool(answer) and float(answer[0]["value"][1]) > 0

            await wait_until_async(
                reissued, what="the killed worker's unit to be re-issued", progress=progress, interval=1.0
            )

            # Results are arriving: the stall alert is not firing (give Prometheus a scrape and an evaluation
            # to see the latest result, in case a slow network made a gap just before).
            async def not_stalled() -> bool:
                return await stalled_alert(prom) is None

            await wait_until_async(not_stalled, what="no stall alert while results arrive", progress=progress)
            await kubelet.close()  # every worker stops (SIGTERM: they release their leases) with units left
            assert succeeded() < TOTAL
            alert = await wait_until_async(lambda: stalled_alert(prom), what="MldsCampaignStalled to fire")
            (last,) = await asyncio.to_thread(
                prom.query, f'mlds_campaign_last_verified_timestamp_seconds{{campaign="{NAME}"}}'
            )
            assert time.time() - float(last["value"][1]) >= STALL_SECONDS
            assert alert["labels"]["namespace"] == NS
            assert alert["labels"]["severity"] == "warning"

            end = time.time()
            results: dict[str, Any] = {}
            empty = []
            for panel, targets in panel_queries(board):
                answers = []
                for target in targets:
                    result = await asyncio.to_thread(prom.query_range, target["expr"], start, end, 1.0)
                    answers.append({**target, "result": result})
                results[panel["title"]] = answers
                if not any(finite_values(a["result"]) for a in answers):
                    empty.append(panel["title"])
            assert empty == [], f"panels without data: {empty}"

            def peak(title: str, legend: str | None = None) -> float:
                values = [
                    v
                    for a in results[title]
                    for s in a["result"]
                    if legend is None or legend in json.dumps(s["metric"]) or a["legend"].startswith(legend)
                    for v in finite_values([s])
                ]
                return max(values, default=0.0)

            assert peak("Networks per hour by pool and accelerator") > 0
            assert peak("Workers connected") >= 2
            assert peak("Lease expiries and re-issues", "expired") > 0
            assert peak("Lease expiries and re-issues", "re-issued") > 0
            assert peak("Rejected results by reason", "missing") > 0
            assert peak("Failed attempts by reason", "expired") > 0
            assert peak("Since the last verified result") >= STALL_SECONDS
            assert 0 < peak("Progress") < 1
            assert peak("Result uploads") > 0

            saved = {
                "dashboard": board,
                "results": {
                    **results,
                    "_start": start,
                    "_caption": f"{NS}/{NAME}: {TOTAL} ds1 networks, 2 pools; a worker killed, a forged result, "
                    f"then every worker stopped (real query results of tests/e2e/test_observability.py)",
                },
            }
            (tmp_path / "dashboard-results.json").write_text(json.dumps(saved))
            draw_dashboard(board, saved["results"], tmp_path / "dashboard.png")
            assert (tmp_path / "dashboard.png").stat().st_size > 50_000
            if os.environ.get("MLDS_WRITE_DASHBOARD_PNG") == "1":
                shutil.copyfile(tmp_path / "dashboard.png", PNG)

            # A deleted campaign's series vanish from the operator's /metrics.
            assert re.search(rf'campaign="{NAME}"', await asyncio.to_thread(scrape, metrics_port))
            await cluster.delete(CAMPAIGNS, NS, NAME)
            await wait_until_async(lambda: cluster.campaign(NS, NAME) is None, what="the campaign to go")
            text = await asyncio.to_thread(scrape, metrics_port)
            assert f'campaign="{NAME}"' not in text
            assert "mlds_build_info{" in text
        except BaseException:
            print("---- operator log ----\n" + operator.log()[-20000:])
            print("---- prometheus log ----\n" + prom.log()[-5000:])
            raise
        finally:
            await kubelet.close()
            operator.stop()
