"""The alert rules (mlds_operator.artifacts.alerts), checked and unit-tested by Prometheus' own ``promtool``.

``promtool check rules`` validates the checked-in file; ``promtool test rules`` replays synthetic
series through the real rule engine and compares the alerts that fire, with their labels and rendered
annotations, against what each story expects. Skipped when promtool is not installed (``make test``
installs Debian's prometheus package, which ships it).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from mlds_operator.artifacts.alerts import ALERTS, render_rules_yaml, rules
from mlds_operator.artifacts.generate import default_root

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (apt-get install prometheus)")
CHECKED_IN = default_root() / "charts" / "mlds" / "rules" / "mlds.rules.yaml"
C = {"namespace": "research", "campaign": "parity"}


def promtool(*args: str) -> str:
    assert PROMTOOL is not None
    done = subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def series(name: str, values: str, **labels: str) -> dict[str, str]:
    inner = ",".join(f'{k}="{v}"' for k, v in labels.items())
    return {"series": f"{name}{{{inner}}}", "values": values}


def run_story(tmp_path: Path, input_series: list[dict[str, str]], checks: list[dict[str, Any]]) -> None:
    (tmp_path / "rules.yaml").write_text(render_rules_yaml())
    test = {
        "rule_files": ["rules.yaml"],
        "evaluation_interval": "1m",
        "tests": [{"interval": "1m", "input_series": input_series, "alert_rule_test": checks}],
    }
    (tmp_path / "test.yaml").write_text(yaml.safe_dump(test, sort_keys=False))
    promtool("test", "rules", str(tmp_path / "test.yaml"))


def stalled(**labels: str) -> dict[str, Any]:
    return {
        "exp_labels": {"severity": "warning", **labels},
        "exp_annotations": {
            "summary": f"Campaign {labels['namespace']}/{labels['campaign']} has stalled",
            "description": "No verified result for more than 30 minutes while units are pending or leased. "
            "Are its workers running (kubectl get jobs -l mlds.dev/campaign), or all failing?",
        },
    }


def test_the_checked_in_rules_file_is_the_rendered_one() -> None:
    assert CHECKED_IN.read_text(encoding="utf-8") == render_rules_yaml(), "stale: run `make generate`"
    names = [r.get("alert") for g in rules()["groups"] for r in g["rules"] if "alert" in r]
    assert names == list(ALERTS)


@needs_promtool
def test_promtool_checks_the_rules_file() -> None:
    out = promtool("check", "rules", str(CHECKED_IN))
    assert "SUCCESS: 6 rules found" in out, out


@needs_promtool
def test_a_campaign_without_results_for_30_minutes_stalls_unless_it_is_suspended_or_done(tmp_path: Path) -> None:
    other = {"namespace": "research", "campaign": "paused"}
    done = {"namespace": "research", "campaign": "done"}
    run_story(
        tmp_path,
        [
            # The last result at t=0; 40 units still pending for an hour.
            series("mlds_campaign_last_verified_timestamp_seconds", "0x60", **C),
            series("mlds_campaign_units", "40x60", **C, state="pending"),
            series("mlds_campaign_units", "0x60", **C, state="leased"),
            series("mlds_campaign_phase", "0x60", **C, phase="Suspended"),
            # Suspended with pending units: nobody is expected to train.
            series("mlds_campaign_last_verified_timestamp_seconds", "0x60", **other),
            series("mlds_campaign_units", "40x60", **other, state="pending"),
            series("mlds_campaign_phase", "1x60", **other, phase="Suspended"),
            # Every unit done: nothing left to stall.
            series("mlds_campaign_last_verified_timestamp_seconds", "0x60", **done),
            series("mlds_campaign_units", "0x60", **done, state="pending"),
            series("mlds_campaign_units", "0x60", **done, state="leased"),
            series("mlds_campaign_phase", "0x60", **done, phase="Suspended"),
        ],
        [
            {"eval_time": "33m", "alertname": "MldsCampaignStalled", "exp_alerts": []},  # stalled, `for` not over
            {"eval_time": "40m", "alertname": "MldsCampaignStalled", "exp_alerts": [stalled(**C)]},
        ],
    )


@needs_promtool
def test_a_pool_whose_leases_keep_expiring_alerts_and_a_healthy_pool_does_not(tmp_path: Path) -> None:
    bad = {**C, "pool": "spot", "accelerator": "nvidia"}
    good = {**C, "pool": "cpu", "accelerator": "cpu"}
    run_story(
        tmp_path,
        [
            series("mlds_leases_granted_total", "0+10x60", **bad),
            series("mlds_leases_expired_total", "0+5x60", **bad),
            series("mlds_leases_granted_total", "0+10x60", **good),
            series("mlds_leases_expired_total", "0+0x60", **good),
        ],
        [
            {"eval_time": "10m", "alertname": "MldsLeaseExpiryRateHigh", "exp_alerts": []},  # `for` not over
            {
                "eval_time": "45m",
                "alertname": "MldsLeaseExpiryRateHigh",
                "exp_alerts": [
                    {
                        "exp_labels": {"severity": "warning", **C, "pool": "spot"},
                        "exp_annotations": {
                            "summary": "Leases of pool spot in research/parity expire",
                            "description": "50% of the leases granted expire before their worker reports: workers are "
                            "dying (OOM, eviction) or spec.leases.durationSeconds is too short for unitsPerLease.",
                        },
                    }
                ],
            },
        ],
    )


@needs_promtool
def test_a_pool_failing_far_more_than_the_others_alerts_and_a_lone_failing_pool_does_not(tmp_path: Path) -> None:
    lone = {"namespace": "research", "campaign": "single"}
    inputs = [
        # research/parity: pool "rocm" fails 6 of 10 attempts, pool "cpu" 1 of 10.
        series("mlds_attempts_failed_total", "0+6x60", **C, pool="rocm", accelerator="rocm", reason="error"),
        series("mlds_results_verified_total", "0+4x60", **C, pool="rocm", accelerator="rocm"),
        series("mlds_attempts_failed_total", "0+1x60", **C, pool="cpu", accelerator="cpu", reason="error"),
        series("mlds_results_verified_total", "0+9x60", **C, pool="cpu", accelerator="cpu"),
        # research/single: one pool failing just as much, but nothing to compare it with.
        series("mlds_attempts_failed_total", "0+6x60", **lone, pool="cpu", accelerator="cpu", reason="error"),
        series("mlds_results_verified_total", "0+4x60", **lone, pool="cpu", accelerator="cpu"),
    ]
    firing = {
        "exp_labels": {"severity": "warning", **C, "pool": "rocm"},
        "exp_annotations": {
            "summary": "Pool rocm of research/parity fails far more than the others",
            "description": "60% of its attempts fail, over 3 times the share of the campaign's other pools: "
            "look at that pool's nodes, image and accelerator.",
        },
    }
    run_story(
        tmp_path,
        inputs,
        [
            {"eval_time": "10m", "alertname": "MldsPoolFailureRateHigh", "exp_alerts": []},
            {"eval_time": "50m", "alertname": "MldsPoolFailureRateHigh", "exp_alerts": [firing]},
        ],
    )


@needs_promtool
def test_an_operator_that_is_not_scraped_for_5_minutes_is_down(tmp_path: Path) -> None:
    down = {
        "exp_labels": {"severity": "critical"},
        "exp_annotations": {
            "summary": "The mlds operator is down or not scraped",
            "description": "Prometheus has no successful scrape of the operator: no campaign makes progress "
            "(workers cannot lease or report) and no status is written.",
        },
    }
    run_story(
        tmp_path,
        [series("up", "1x10 0x20", job="mlds-operator", instance="10.0.0.7:8080")],
        [
            {"eval_time": "9m", "alertname": "MldsOperatorDown", "exp_alerts": []},
            {"eval_time": "13m", "alertname": "MldsOperatorDown", "exp_alerts": []},  # down 3 min: `for` not over
            {"eval_time": "20m", "alertname": "MldsOperatorDown", "exp_alerts": [down]},
        ],
    )
