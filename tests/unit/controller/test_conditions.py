"""Campaign conditions: transition times, which changes are news, and the Events they become."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from mlds_operator.controller.conditions import CondType, Desired, Reason, event_manifest, event_type, merge

T0 = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)


def test_a_condition_keeps_its_transition_time_until_it_flips() -> None:
    first, _ = merge(None, [Desired(CondType.Ready, True, Reason.Serving)], now=T0, generation=1)
    same, changes = merge(
        first, [Desired(CondType.Ready, True, Reason.Serving, "x")], now=T0 + timedelta(hours=1), generation=2
    )
    assert same[0].last_transition_time == "2026-03-01T08:00:00Z"
    assert same[0].message == "x"
    assert same[0].observed_generation == 2
    assert changes == []
    flipped, changes = merge(
        same, [Desired(CondType.Ready, False, Reason.Finished)], now=T0 + timedelta(hours=2), generation=2
    )
    assert flipped[0].last_transition_time == "2026-03-01T10:00:00Z"
    assert [(c.type, c.status, c.previous_status) for c in changes] == [("Ready", "False", "True")]


def test_new_conditions_are_news_when_true_or_bad_and_quiet_when_false_by_default() -> None:
    desired = [
        Desired(CondType.Ready, True, Reason.Serving),
        Desired(CondType.Complete, False, Reason.UnitsRemaining),
        Desired(CondType.InvalidSpec, True, Reason.InvalidCampaign, "unknown machine"),
        Desired(CondType.Failed, False, Reason.NoFailures),
    ]
    _, changes = merge([], desired, now=T0, generation=1)
    assert [c.type for c in changes] == ["Ready", "InvalidSpec"]


def test_conditions_that_are_no_longer_desired_are_dropped() -> None:
    old, _ = merge(None, [Desired(CondType.Ready, True, Reason.Serving)], now=T0, generation=1)
    new, _ = merge(old, [Desired(CondType.Complete, True, Reason.AllUnitsSucceeded)], now=T0, generation=1)
    assert [c.type for c in new] == ["Complete"]


def test_an_event_names_the_campaign_says_what_changed_and_warns_about_bad_news() -> None:
    old, _ = merge(None, [Desired(CondType.Ready, True, Reason.Serving)], now=T0, generation=1)
    _, (change,) = merge(
        old, [Desired(CondType.Ready, False, Reason.WorkerJobFailed, "Job p-cpu failed")], now=T0, generation=1
    )
    event = event_manifest(change, name="p", namespace="ns", uid="u", now=T0, instance="op-0", sequence=7)
    assert event["involvedObject"] == {
        "apiVersion": "mlds.dev/v1alpha1",
        "kind": "TrainingCampaign",
        "name": "p",
        "namespace": "ns",
        "uid": "u",
    }
    assert (event["type"], event["reason"]) == ("Warning", "WorkerJobFailed")
    assert event["message"] == "Ready changed to False: Job p-cpu failed"
    assert event["source"] == {"component": "mlds-operator"}
    assert event["metadata"]["name"].startswith("p.")
    other = event_manifest(change, name="p", namespace="ns", uid="u", now=T0, instance="op-0", sequence=8)
    assert other["metadata"]["name"] != event["metadata"]["name"]
    _, (good,) = merge(None, [Desired(CondType.Complete, True, Reason.AllUnitsSucceeded)], now=T0, generation=1)
    assert event_type(good) == "Normal"
