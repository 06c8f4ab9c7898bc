"""Prometheus alert rules for mlds campaigns, as code; rendered to ``charts/mlds/rules/mlds.rules.yaml``.

Who calls it: :mod:`mlds_operator.artifacts.generate` writes the checked-in plain rules file (``groups: ...``,
what ``promtool check rules`` and a plain Prometheus ``rule_files`` entry read); the Helm chart wraps
the same file in a PrometheusRule for the Prometheus Operator. Tests render copies with small windows
(:func:`rules` takes every threshold) so an alert can fire within seconds.

The alerts (all labelled ``severity``; the campaign ones carry ``namespace``, ``campaign`` and,
per pool, ``pool``):

- **MldsCampaignStalled**: no verified result for ``stall_seconds`` while units are pending or leased,
  and the campaign is not suspended. Reads ``mlds_campaign_last_verified_timestamp_seconds``, which
  starts at the time the operator opened the campaign, so a campaign that never produced a result
  stalls too (an operator restart restarts the clock).
- **MldsLeaseExpiryRateHigh**: in a pool, more than ``expiry_ratio`` of the leases granted expire
  (workers dying, or leases too short for ``unitsPerLease`` networks).
- **MldsPoolFailureRateHigh**: a pool's share of failed attempts is above ``failure_ratio`` and
  ``failure_factor`` times that of the campaign's other pools (a bad node type, a broken image).
  Needs at least two pools with attempts: with one pool there is no "others" to compare with.
- **MldsOperatorDown**: Prometheus has not scraped the operator successfully for ``down_for``.
"""

from __future__ import annotations

from typing import Any

import yaml

__all__ = ["ALERTS", "OPERATOR_JOB", "render_rules_yaml", "rules"]

#: The scrape job of the operator. A ServiceMonitor names the job after the Service: the chart's is
#: "<fullname>-operator", where the fullname contains "mlds" unless fullnameOverride says otherwise.
OPERATOR_JOB = ".*mlds.*operator.*"
ALERTS = ("MldsCampaignStalled", "MldsLeaseExpiryRateHigh", "MldsPoolFailureRateHigh", "MldsOperatorDown")

_POOL = "namespace, campaign, pool"
_CAMPAIGN = "namespace, campaign"


def rules(
    *,
    stall_seconds: int = 1800,
    stall_for: str = "5m",
    expiry_ratio: float = 0.25,
    expiry_window: str = "15m",
    expiry_for: str = "15m",
    failure_ratio: float = 0.2,
    failure_factor: float = 3.0,
    failure_window: str = "30m",
    failure_for: str = "15m",
    down_for: str = "5m",
    job: str = OPERATOR_JOB,
    interval: str | None = None,
) -> dict[str, Any]:
    """The rules file as data. The defaults suit campaigns of hours; ``interval`` overrides the evaluation interval.

    ``stall_seconds``: 30 minutes is several times the training time of the slowest unit of a lease
    (ds3 on a CPU), so a healthy campaign never looks stalled.
    """
    failures = f"mlds:pool_attempt_failures:rate{failure_window}"
    attempts = f"mlds:pool_attempts:rate{failure_window}"
    recording = [
        {
            "record": failures,
            "expr": f"sum by ({_POOL}) (rate(mlds_attempts_failed_total[{failure_window}]))",
        },
        {
            "record": attempts,
            "expr": f"{failures}\n+ sum by ({_POOL}) (rate(mlds_results_verified_total[{failure_window}]))",
        },
    ]
    alerts = [
        {
            "alert": "MldsCampaignStalled",
            "expr": (
                f"(time() - mlds_campaign_last_verified_timestamp_seconds > {stall_seconds})\n"
                f'and on ({_CAMPAIGN}) (sum by ({_CAMPAIGN}) (mlds_campaign_units{{state=~"pending|leased"}}) > 0)\n'
                f'unless on ({_CAMPAIGN}) (mlds_campaign_phase{{phase="Suspended"}} == 1)'
            ),
            "for": stall_for,
            "labels": {"severity": "warning"},
            "annotations": {
                "summary": "Campaign {{ $labels.namespace }}/{{ $labels.campaign }} has stalled",
                "description": (
                    f"No verified result for more than {_duration(stall_seconds)} while units are pending or leased. "
                    "Are its workers running (kubectl get jobs -l mlds.dev/campaign), or all failing?"
                ),
            },
        },
        {
            "alert": "MldsLeaseExpiryRateHigh",
            "expr": (
                f"sum by ({_POOL}) (rate(mlds_leases_expired_total[{expiry_window}]))\n"
                f"/ sum by ({_POOL}) (rate(mlds_leases_granted_total[{expiry_window}]))\n"
                f"> {expiry_ratio}"
            ),
            "for": expiry_for,
            "labels": {"severity": "warning"},
            "annotations": {
                "summary": "Leases of pool {{ $labels.pool }} in {{ $labels.namespace }}/{{ $labels.campaign }} expire",
                "description": (
                    "{{ $value | humanizePercentage }} of the leases granted expire before their worker reports: "
                    "workers are dying (OOM, eviction) or spec.leases.durationSeconds is too short for unitsPerLease."
                ),
            },
        },
        {
            "alert": "MldsPoolFailureRateHigh",
            "expr": (
                f"({failures} / {attempts} > {failure_ratio})\n"
                f"and\n({failures} / {attempts})\n"
                f"  > {failure_factor} * (\n"
                f"    (sum by ({_CAMPAIGN}) ({failures}) - on ({_CAMPAIGN}) group_right {failures})\n"
                f"    / (sum by ({_CAMPAIGN}) ({attempts}) - on ({_CAMPAIGN}) group_right {attempts})\n"
                f"  )"
            ),
            "for": failure_for,
            "labels": {"severity": "warning"},
            "annotations": {
                "summary": "Pool {{ $labels.pool }} of {{ $labels.namespace }}/{{ $labels.campaign }} fails far more "
                "than the others",
                "description": (
                    f"{{{{ $value | humanizePercentage }}}} of its attempts fail, over {failure_factor:g} times the "
                    "share of the campaign's other pools: look at that pool's nodes, image and accelerator."
                ),
            },
        },
        {
            "alert": "MldsOperatorDown",
            "expr": f'absent(up{{job=~"{job}"}} == 1)',
            "for": down_for,
            "labels": {"severity": "critical"},
            "annotations": {
                "summary": "The mlds operator is down or not scraped",
                "description": (
                    "Prometheus has no successful scrape of the operator: no campaign makes progress "
                    "(workers cannot lease or report) and no status is written."
                ),
            },
        },
    ]
    groups: list[dict[str, Any]] = [
        {"name": "mlds.recording", "rules": recording},
        {"name": "mlds.alerts", "rules": alerts},
    ]
    if interval is not None:
        for group in groups:
            group["interval"] = interval
    return {"groups": groups}


def _duration(seconds: int) -> str:
    return f"{seconds // 60} minutes" if seconds % 60 == 0 and seconds >= 120 else f"{seconds} s"


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, text: str) -> yaml.Node:
    # Multi-line PromQL as block scalars: readable in the file and in diffs.
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style="|" if "\n" in text else None)


_Dumper.add_representer(str, _str)


def render_rules_yaml(**overrides: Any) -> str:
    """The rules file's text (the checked-in one with no arguments)."""
    header = (
        "# Generated by mlds_operator.artifacts.alerts (make generate); do not edit. Plain Prometheus rules file:\n"
        "# rule_files: [mlds.rules.yaml], or the chart's PrometheusRule. Check: promtool check rules FILE\n"
    )
    return header + yaml.dump(rules(**overrides), Dumper=_Dumper, sort_keys=False, width=120)
