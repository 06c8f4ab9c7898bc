"""The operator's pure reconcile function: from a campaign and what was observed to actions and a status.

Each test tells one story of a campaign's life (created, scaled, suspended, finished, broken) with small
builders; nothing here talks to Kubernetes, a bucket or a clock.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from mlds_contract.campaign import CampaignStatus, Phase, UnitCounts
from mlds_operator.controller import pods
from mlds_operator.controller.conditions import Reason
from mlds_operator.controller.reconcile import (
    Campaign,
    ConfigureBook,
    CreateJob,
    CreateSecret,
    DeleteJob,
    Observed,
    ObservedJob,
    Outcome,
    PatchJob,
    PoolProgress,
    Problem,
    Progress,
    parse_campaign,
    plan_hash,
    reconcile,
    status_patch,
)

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
SETTINGS = pods.WorkerSettings(lease_base_url="http://mlds-operator.mlds-system.svc:8080")
UID = "uid-1"


# ------------------------------------------------------------------------------------- builders


def body(
    *,
    pools: list[dict[str, Any]] | None = None,
    status: dict[str, Any] | None = None,
    generation: int = 1,
    uid: str = UID,
    **spec: Any,
) -> dict[str, Any]:
    s: dict[str, Any] = {
        "workload": {"dataset": "ds1", "machines": ["ParityMachine", "SimpleXORMachine"]},
        "networksPerTarget": 10,
        "storage": {"endpoint": "minio:9000", "bucket": "mlds", "prefix": "p", "credentialsSecret": "creds"},
        "pools": pools
        or [
            {"name": "cpu", "accelerator": "cpu", "replicas": 4},
            {"name": "gpu", "accelerator": "nvidia", "replicas": 1},
        ],
    }
    s.update(spec)
    b: dict[str, Any] = {
        "metadata": {"name": "parity", "namespace": "research", "uid": uid, "generation": generation},
        "spec": s,
    }
    if status is not None:
        b["status"] = status
    return b


def campaign(**kwargs: Any) -> Campaign:
    c, problem = parse_campaign(body(**kwargs))
    assert problem is None, problem
    return c


def progress(
    *,
    succeeded: int = 0,
    leased: int = 0,
    failed: int = 0,
    total: int = 20,
    finished: bool = False,
    finalized: bool = False,
    paused: bool = False,
    failed_units: str = "",
    rate: float | None = None,
    eta: datetime | None = None,
    pools: tuple[PoolProgress, ...] = (),
) -> Progress:
    pending = total - succeeded - leased - failed
    return Progress(
        counts=UnitCounts(total=total, pending=pending, leased=leased, succeeded=succeeded, failed=failed),
        pools=pools,
        failed_units=failed_units,
        networks_per_hour=rate,
        eta=eta,
        finished=finished,
        finalized=finalized,
        manifest="s3://mlds/p/manifest.parquet",
        lease_url="http://mlds-operator.mlds-system.svc:8080/v1/campaigns/research/parity",
        book_paused=paused,
        book_max_attempts=3,
        book_lease_seconds=600.0,
    )


def job(c: Campaign, pool: str, **overrides: Any) -> ObservedJob:
    """An existing Job exactly as the operator would have made it for ``c``, then ``overrides``."""
    assert c.spec is not None
    (p,) = [p for p in c.spec.pools if p.name == pool]
    made = ObservedJob.from_manifest(pods.worker_job(c.ref, c.spec, p, SETTINGS))
    fields = {**made.__dict__, **overrides}
    return ObservedJob(**fields)


def observed(c: Campaign, **kwargs: Any) -> Observed:
    assert c.spec is not None
    defaults: dict[str, Any] = {
        "now": NOW,
        "token": "tok",
        "secret_exists": True,
        "pinned_plan": plan_hash(c.spec),
        "jobs": [job(c, p.name) for p in c.spec.pools],
        "progress": progress(),
    }
    defaults.update(kwargs)
    return Observed(**defaults)


def run(c: Campaign, **kwargs: Any) -> Outcome:
    return reconcile(c, observed(c, **kwargs), SETTINGS)


def cond(outcome: Outcome, type_: str) -> tuple[str, str, str]:
    for condition in outcome.status.conditions or ():
        if condition.type == type_:
            return condition.status, condition.reason, condition.message
    raise AssertionError(f"no {type_} condition")


# ------------------------------------------------------------------------------------ creation


def test_a_new_campaign_gets_its_token_secret_pinned_to_its_plan_first() -> None:
    c = campaign()
    out = run(c, secret_exists=False, pinned_plan=None, jobs=[], progress=None, problem=None)
    (secret,) = [a for a in out.actions if isinstance(a, CreateSecret)]
    assert pods.token_from_secret(secret.manifest) == "tok"
    assert secret.manifest["metadata"]["annotations"][pods.ANNOTATION_PLAN] == plan_hash(c.spec)  # type: ignore[arg-type]
    assert not any(isinstance(a, CreateJob) for a in out.actions), "no worker before the lease API serves"
    assert out.status.phase is Phase.Pending


def test_once_the_lease_service_is_open_each_pool_gets_a_job_and_the_book_follows_the_spec() -> None:
    c = campaign(leases={"durationSeconds": 60, "maxAttempts": 5})
    out = run(c, jobs=[])
    created = {a.manifest["metadata"]["name"]: a.manifest for a in out.actions if isinstance(a, CreateJob)}
    assert set(created) == {"parity-cpu", "parity-gpu"}
    assert created["parity-cpu"]["spec"]["parallelism"] == 4
    assert ConfigureBook(paused=False, max_attempts=5, lease_seconds=60.0) in out.actions
    assert out.status.phase is Phase.Pending
    assert cond(out, "Ready")[:2] == ("True", Reason.Serving)
    assert cond(out, "Progressing")[:2] == ("True", Reason.WaitingForWorkers)
    assert out.status.progress == "0/20"
    assert out.status.observed_generation == 1


def test_a_campaign_in_line_with_its_jobs_needs_nothing() -> None:
    assert run(campaign()).actions == []


# ------------------------------------------------------------------------------- spec edits


def test_a_replicas_edit_patches_only_that_pools_parallelism() -> None:
    before = campaign()
    after = campaign(
        pools=[
            {"name": "cpu", "accelerator": "cpu", "replicas": 9},
            {"name": "gpu", "accelerator": "nvidia", "replicas": 1},
        ],
        generation=2,
    )
    out = reconcile(after, observed(before, pinned_plan=plan_hash(after.spec)), SETTINGS)  # type: ignore[arg-type]
    assert out.actions == [PatchJob("parity-cpu", {"spec": {"parallelism": 9}})]
    assert out.status.observed_generation == 2


def test_suspend_suspends_every_job_and_pauses_the_book() -> None:
    c = campaign(suspend=True)
    out = run(c, jobs=[job(c, "cpu", suspend=False), job(c, "gpu", suspend=False)], progress=progress(succeeded=3))
    assert PatchJob("parity-cpu", {"spec": {"suspend": True}}) in out.actions
    assert PatchJob("parity-gpu", {"spec": {"suspend": True}}) in out.actions
    assert ConfigureBook(paused=True, max_attempts=3, lease_seconds=600.0) in out.actions
    assert out.status.phase is Phase.Suspended
    assert cond(out, "Suspended")[:2] == ("True", Reason.SuspendedBySpec)
    assert cond(out, "Progressing")[:2] == ("False", Reason.SuspendedBySpec)
    assert cond(out, "Ready")[:2] == ("False", Reason.SuspendedBySpec)


def test_resuming_unsuspends_the_jobs_and_the_book() -> None:
    c = campaign(suspend=False)
    out = run(c, jobs=[job(c, "cpu", suspend=True), job(c, "gpu", suspend=True)], progress=progress(paused=True))
    assert PatchJob("parity-cpu", {"spec": {"suspend": False}}) in out.actions
    assert ConfigureBook(paused=False, max_attempts=3, lease_seconds=600.0) in out.actions
    assert cond(out, "Suspended")[:2] == ("False", Reason.NotSuspended)


def test_a_changed_pod_template_replaces_the_job() -> None:
    c = campaign()
    out = run(c, jobs=[job(c, "cpu", template_hash="old"), job(c, "gpu")])
    assert [type(a) for a in out.actions] == [DeleteJob]
    assert out.actions[0].name == "parity-cpu"  # type: ignore[union-attr]
    # The next pass finds it gone and creates the new one.
    again = run(c, jobs=[job(c, "gpu")])
    assert [a.manifest["metadata"]["name"] for a in again.actions if isinstance(a, CreateJob)] == ["parity-cpu"]


def test_a_job_being_deleted_is_waited_for() -> None:
    c = campaign()
    assert run(c, jobs=[job(c, "cpu", deleting=True, template_hash="old"), job(c, "gpu")]).actions == []


def test_a_pool_that_left_the_spec_loses_its_job() -> None:
    c = campaign(pools=[{"name": "cpu", "accelerator": "cpu", "replicas": 4}])
    old = campaign()
    out = run(c, jobs=[job(c, "cpu"), job(old, "gpu")])
    assert out.actions == [DeleteJob("parity-gpu", "its pool left the spec")]


def test_a_job_that_completed_while_units_remain_is_replaced() -> None:
    c = campaign()
    out = run(c, jobs=[job(c, "cpu", complete=True, succeeded=1), job(c, "gpu")], progress=progress(succeeded=5))
    assert [a.name for a in out.actions if isinstance(a, DeleteJob)] == ["parity-cpu"]


def test_a_failed_job_is_reported_not_replaced() -> None:
    c = campaign()
    failure = "BackoffLimitExceeded: Job has reached the specified backoff limit"
    out = run(c, jobs=[job(c, "cpu", failure=failure), job(c, "gpu")], progress=progress(succeeded=5, leased=1))
    assert out.actions == []
    status, reason, message = cond(out, "Ready")
    assert (status, reason) == ("False", Reason.WorkerJobFailed)
    assert "parity-cpu" in message
    assert "BackoffLimitExceeded" in message
    assert out.status.phase is Phase.Running


def test_a_job_name_taken_by_something_else_is_reported_and_retried() -> None:
    c = campaign()
    out = run(c, jobs=[job(c, "gpu")], taken_job_names=frozenset({"parity-cpu"}))
    assert [a.manifest["metadata"]["name"] for a in out.actions if isinstance(a, CreateJob)] == ["parity-cpu"]
    status, reason, message = cond(out, "Ready")
    assert (status, reason) == ("False", Reason.JobNameTaken)
    assert "parity-cpu exists but is not this campaign's" in message


def test_a_job_left_by_an_earlier_campaign_of_the_same_name_is_deleted_before_ours_is_made() -> None:
    c = campaign()
    out = run(c, jobs=[job(c, "cpu", campaign_uid="older-uid"), job(c, "gpu")])
    assert out.actions == [DeleteJob("parity-cpu", "it belongs to an earlier campaign of this name")]


# ------------------------------------------------------------------------------------ the end


def test_a_finished_campaign_succeeds_with_its_manifest_and_creates_nothing_more() -> None:
    c = campaign()
    out = run(c, jobs=[], progress=progress(succeeded=20, total=20, finished=True, finalized=True, rate=100.0))
    assert out.actions == []
    s = out.status
    assert s.phase is Phase.Succeeded
    assert s.progress == "20/20"
    assert s.manifest == "s3://mlds/p/manifest.parquet"
    assert s.networks_per_hour is None
    assert s.eta is None
    assert cond(out, "Complete")[:2] == ("True", Reason.AllUnitsSucceeded)
    assert cond(out, "Ready")[:2] == ("False", Reason.Finished)
    assert cond(out, "Failed")[:2] == ("False", Reason.NoFailures)


def test_a_campaign_that_ends_with_failed_units_fails_and_lists_them() -> None:
    c = campaign()
    end = progress(succeeded=17, failed=3, total=20, finished=True, finalized=True, failed_units="4,11-12")
    out = run(c, progress=end)
    assert out.status.phase is Phase.Failed
    assert out.status.failed_units == "4,11-12"
    status, reason, message = cond(out, "Failed")
    assert (status, reason) == ("True", Reason.TooManyFailures)
    assert "3 of 20 units failed 3 attempts each (units 4,11-12)" in message
    assert cond(out, "Complete")[:2] == ("False", Reason.TooManyFailures)


def test_all_units_done_but_manifest_not_yet_written_is_still_running() -> None:
    out = run(campaign(), progress=progress(succeeded=20, finished=True, finalized=False))
    assert out.status.phase is Phase.Running
    assert cond(out, "Progressing")[:2] == ("True", Reason.Finalizing)
    assert out.status.manifest is None


def test_after_a_restart_a_finished_campaign_keeps_its_status_and_is_not_reopened() -> None:
    finished = run(campaign(), progress=progress(succeeded=20, finished=True, finalized=True))
    final = finished.status.wire()  # as the operator wrote it before the restart
    c = campaign(status=final)
    out = run(c, jobs=[], progress=None)
    assert out.actions == [], "no Job comes back, no Secret is made"
    assert out.changes == []
    assert status_patch(final, out.status) is None


# ------------------------------------------------------------------------------ invalid specs


@pytest.mark.parametrize(
    ("spec", "reason", "fragment"),
    [
        pytest.param(
            {"workload": {"dataset": "ds1", "machines": ["NoSuchMachine"]}},
            Reason.InvalidCampaign,
            "unknown machine 'NoSuchMachine' for ds1",
            id="unknown-ds1-machine",
        ),
        pytest.param(
            {"workload": {"dataset": "ds1", "machines": ["ParityModified"]}},
            Reason.InvalidCampaign,
            "unknown machine 'ParityModified' for ds1",
            id="ds2-machine-in-a-ds1-campaign",
        ),
        pytest.param(
            {"workload": {"dataset": "ds1", "machines": ["ParityMachine", "ParityMachine"]}},
            Reason.InvalidCampaign,
            "listed twice",
            id="machine-listed-twice",
        ),
        pytest.param(
            {"workload": {"dataset": "ds1", "variants": ["pixel"]}},
            Reason.InvalidCampaign,
            "variants applies to ds4 only",
            id="ds4-variants-on-ds1",
        ),
        pytest.param(
            {"workload": {"dataset": "ds2", "shapes": [{"hidden": 8}]}},
            Reason.InvalidCampaign,
            "shapes applies to ds5 only",
            id="ds5-shapes-on-ds2",
        ),
        pytest.param(
            {"workload": {"dataset": "ds3", "machines": ["ParityMachine"]}},
            Reason.InvalidCampaign,
            "machines does not apply to ds3",
            id="machines-on-ds3",
        ),
        pytest.param(
            {"pools": [{"name": "cpu"}, {"name": "cpu", "accelerator": "nvidia"}]},
            Reason.InvalidCampaign,
            "pool names must be unique",
            id="two-pools-one-name",
        ),
        pytest.param({"storage": None}, Reason.StorageRequired, "spec.storage is required", id="no-storage"),
    ],
)
def test_an_invalid_spec_fails_the_campaign_with_a_readable_condition(
    spec: dict[str, Any], reason: Reason, fragment: str
) -> None:
    b = body(**spec)
    if b["spec"].get("storage") is None:
        b["spec"].pop("storage")
    c, problem = parse_campaign(b)
    assert problem is None
    out = reconcile(c, Observed(now=NOW, token="t"), SETTINGS)
    assert out.actions == []
    assert out.status.phase is Phase.Failed
    status, got_reason, message = cond(out, "InvalidSpec")
    assert (status, got_reason) == ("True", reason)
    assert fragment in message
    assert cond(out, "Failed")[:2] == ("True", Reason.InvalidSpec)
    assert any(ch.type == "InvalidSpec" for ch in out.changes), "an Event says so"


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        pytest.param({"networksPerTarget": -1}, "networksPerTarget", id="negative-networks"),
        pytest.param({"workload": {"dataset": "ds9"}}, "workload.dataset", id="unknown-dataset"),
        pytest.param(
            {"pools": [{"name": "cpu", "accelerator": "tpu"}]}, "pools.0.accelerator", id="unknown-accelerator"
        ),
    ],
)
def test_a_body_that_slipped_past_the_schema_is_a_malformed_spec(spec: dict[str, Any], fragment: str) -> None:
    c, problem = parse_campaign(body(**spec))
    assert problem is not None
    assert problem.reason is Reason.MalformedSpec
    out = reconcile(c, Observed(now=NOW, token="t"), SETTINGS)
    assert out.status.phase is Phase.Failed
    assert fragment in cond(out, "InvalidSpec")[2]


def test_a_missing_credentials_secret_waits_in_pending_and_says_so() -> None:
    c = campaign()
    problem = Problem(Reason.CredentialsSecretMissing, "Secret 'creds' (spec.storage.credentialsSecret) does not exist")
    out = run(c, secret_exists=False, pinned_plan=None, jobs=[], progress=None, problem=problem)
    assert out.status.phase is Phase.Pending
    assert cond(out, "InvalidSpec")[:2] == ("True", Reason.CredentialsSecretMissing)
    assert cond(out, "Ready")[:2] == ("False", Reason.CredentialsSecretMissing)
    assert cond(out, "Failed")[:2] == ("False", Reason.NoFailures)
    assert [type(a) for a in out.actions] == [CreateSecret]
    assert out.status.units.total == 20


def test_an_unreachable_bucket_is_an_outage_not_a_spec_problem() -> None:
    c = campaign()
    problem = Problem(Reason.StorageUnavailable, "connection refused", spec=False)
    out = run(c, jobs=[], progress=None, problem=problem)
    assert cond(out, "InvalidSpec")[:2] == ("False", Reason.SpecValid)
    assert cond(out, "Ready")[:2] == ("False", Reason.StorageUnavailable)


def test_editing_the_plan_of_a_running_campaign_is_reported_and_not_acted_on() -> None:
    running = campaign()
    edited = campaign(
        seed=99,
        pools=[
            {"name": "cpu", "accelerator": "cpu", "replicas": 1},
            {"name": "gpu", "accelerator": "nvidia", "replicas": 1},
        ],
    )
    obs = observed(running, progress=progress(succeeded=4, leased=2))
    out = reconcile(edited, obs, SETTINGS)
    assert out.actions == [], "not even the replicas edit that came with it"
    assert out.status.phase is Phase.Running
    status, reason, message = cond(out, "InvalidSpec")
    assert (status, reason) == ("True", Reason.ImmutableFieldChanged)
    assert "cannot change once a campaign has started" in message
    assert cond(out, "Ready")[:2] == ("True", Reason.Serving)


# ---------------------------------------------------------------------- status and conditions


def test_status_carries_counts_rate_eta_and_per_pool_figures() -> None:
    eta = NOW + timedelta(hours=1, seconds=0.4)
    figures = (PoolProgress("cpu", succeeded=5, failed=1, workers=4), PoolProgress("recovered", succeeded=2))
    out = run(campaign(), progress=progress(succeeded=7, leased=4, failed=0, rate=412.345, eta=eta, pools=figures))
    s = out.status
    assert s.phase is Phase.Running
    assert s.units == UnitCounts(total=20, pending=9, leased=4, succeeded=7, failed=0)
    assert s.progress == "7/20"
    assert s.networks_per_hour == 412.3
    assert s.eta == "2026-01-01T13:00:00Z"
    assert [p.wire() for p in s.pools or ()] == [
        {"name": "cpu", "accelerator": "cpu", "workers": 4, "succeeded": 5, "failed": 1},
        {"name": "gpu", "accelerator": "nvidia", "workers": 0, "succeeded": 0, "failed": 0},
    ]
    assert cond(out, "Progressing")[:2] == ("True", Reason.Training)


def test_transition_times_move_only_when_a_condition_flips_and_events_follow_flips() -> None:
    c = campaign()
    first = run(c, progress=progress())
    assert {ch.type for ch in first.changes} == {"Ready", "Progressing"}, "False-by-default conditions are no news"

    later = NOW + timedelta(minutes=5)
    second = run(c, now=later, previous_conditions=first.status.conditions, progress=progress(succeeded=1, leased=2))
    times = {x.type: x.last_transition_time for x in second.status.conditions or ()}
    assert times["Ready"] == "2026-01-01T12:00:00Z", "still True: the time stays"
    assert [(ch.type, ch.reason, ch.flipped) for ch in second.changes] == [("Progressing", Reason.Training, False)], (
        "a new reason is an Event, though the status did not flip"
    )

    suspended = campaign(suspend=True)
    third = reconcile(
        suspended,
        observed(suspended, now=later + timedelta(minutes=1), previous_conditions=second.status.conditions),
        SETTINGS,
    )
    times = {x.type: x.last_transition_time for x in third.status.conditions or ()}
    assert times["Suspended"] == "2026-01-01T12:06:00Z"
    assert times["Ready"] == "2026-01-01T12:06:00Z"
    assert {(ch.type, ch.status) for ch in third.changes if ch.flipped} == {
        ("Suspended", "True"),
        ("Ready", "False"),
        ("Progressing", "False"),
    }


def test_the_status_patch_is_none_when_nothing_changed_and_nulls_what_went_away() -> None:
    c = campaign()
    running = run(c, progress=progress(succeeded=7, rate=10.0, eta=NOW)).status
    wire = running.wire()
    assert status_patch(wire, running) is None
    done = CampaignStatus.model_validate({**wire, "eta": None, "networksPerHour": None, "phase": "Succeeded"})
    patch = status_patch(wire, done)
    assert patch is not None
    assert patch["eta"] is None
    assert patch["networksPerHour"] is None
    assert patch["phase"] == "Succeeded"


# ------------------------------------------------------------------------------------------ Kueue


def queued_campaign(**kwargs: Any) -> Campaign:
    return campaign(queueName="gpu-queue", **kwargs)


def test_a_queued_campaign_creates_suspended_jobs_with_the_queue_label() -> None:
    c = queued_campaign()
    out = run(c, jobs=[])
    created = [a.manifest for a in out.actions if isinstance(a, CreateJob)]
    assert [j["metadata"]["labels"][pods.KUEUE_QUEUE_LABEL] for j in created] == ["gpu-queue", "gpu-queue"]
    assert all(j["spec"]["suspend"] is True for j in created)
    assert out.status.phase is Phase.Queued


def test_while_kueue_holds_the_jobs_the_campaign_is_queued_and_their_suspend_is_left_alone() -> None:
    c = queued_campaign()
    out = run(c)  # both Jobs exist as made: suspended, waiting for admission
    assert [a for a in out.actions if isinstance(a, PatchJob)] == []
    assert out.status.phase is Phase.Queued
    status, reason, message = cond(out, "Progressing")
    assert (status, reason) == ("False", Reason.Queued)
    assert "parity-gpu (LocalQueue gpu-queue)" in message
    assert cond(out, "Ready")[0] == "True"


def test_once_kueue_admits_a_job_the_campaign_runs_and_the_operator_still_leaves_suspend_alone() -> None:
    c = queued_campaign()
    out = run(c, jobs=[job(c, "cpu", suspend=False), job(c, "gpu")])
    assert out.status.phase is Phase.Running
    assert [a for a in out.actions if isinstance(a, PatchJob)] == []
    assert cond(out, "Progressing")[:2] == ("True", Reason.WaitingForWorkers)


def test_kueue_preempting_every_job_makes_the_campaign_queued_again() -> None:
    c = queued_campaign()
    out = run(c, jobs=[job(c, "cpu", suspend=True), job(c, "gpu", suspend=True)], progress=progress(succeeded=5))
    assert out.status.phase is Phase.Queued
    assert out.actions == []


def test_replicas_edits_still_reach_a_queued_job() -> None:
    c = queued_campaign(pools=[{"name": "gpu", "accelerator": "nvidia", "replicas": 3}])
    out = run(c, jobs=[job(c, "gpu", parallelism=1, suspend=False)])
    assert out.actions == [PatchJob("parity-gpu", {"spec": {"parallelism": 3}})]


def test_suspending_a_queued_campaign_deletes_its_jobs_and_resuming_queues_them_again() -> None:
    """A suspend Kueue would undo; deleting the Job frees its quota instead."""
    c = queued_campaign(suspend=True)
    out = run(c, jobs=[job(c, "cpu", suspend=False), job(c, "gpu", suspend=True)])
    assert sorted(a.name for a in out.actions if isinstance(a, DeleteJob)) == ["parity-cpu", "parity-gpu"]
    assert out.status.phase is Phase.Suspended
    gone = run(c, jobs=[])
    assert [a for a in gone.actions if isinstance(a, CreateJob)] == []
    resumed = run(queued_campaign(suspend=False), jobs=[], progress=progress(paused=True))
    assert sorted(a.manifest["spec"]["suspend"] for a in resumed.actions if isinstance(a, CreateJob)) == [True, True]


def test_a_pool_outside_kueue_keeps_the_campaign_out_of_the_queued_phase() -> None:
    c = campaign(
        pools=[
            {"name": "cpu", "accelerator": "cpu", "replicas": 2},
            {"name": "gpu", "accelerator": "nvidia", "replicas": 1, "queueName": "gpu-queue"},
        ]
    )
    out = run(c)
    assert out.status.phase is Phase.Pending
    assert [a for a in out.actions if isinstance(a, PatchJob)] == []


def test_a_new_queue_name_replaces_the_job() -> None:
    old = queued_campaign()
    c = campaign(queueName="other-queue")
    out = run(c, jobs=[job(old, "cpu", suspend=False), job(old, "gpu", suspend=False)])
    assert {a.name for a in out.actions if isinstance(a, DeleteJob)} == {"parity-cpu", "parity-gpu"}


# ------------------------------------------------------------------------------- reach (issue 13)


def test_a_pool_image_outside_the_allow_list_gets_a_condition_and_no_job() -> None:
    allowing = pods.WorkerSettings(
        lease_base_url=SETTINGS.lease_base_url, allowed_image_prefixes=("registry.example.com/mlds/",)
    )
    c = campaign(
        pools=[
            {"name": "cpu", "accelerator": "cpu", "replicas": 1, "image": "registry.example.com/mlds/worker:1"},
            {"name": "evil", "accelerator": "cpu", "replicas": 1, "image": "docker.io/attacker/miner:latest"},
        ]
    )

    out = reconcile(c, observed(c, jobs=[]), allowing)

    assert not any(isinstance(a, CreateJob) for a in out.actions)
    status, reason, message = cond(out, "InvalidSpec")
    assert (status, reason) == ("True", Reason.ImageNotAllowed)
    assert "docker.io/attacker/miner:latest" in message
    allowed_only = campaign(pools=[{"name": "cpu", "accelerator": "cpu", "image": "registry.example.com/mlds/w:1"}])
    made = reconcile(allowed_only, observed(allowed_only, jobs=[]), allowing)
    assert [a.manifest["metadata"]["name"] for a in made.actions if isinstance(a, CreateJob)] == ["parity-cpu"]


def test_only_a_secret_the_operator_made_for_this_campaign_is_its_own() -> None:
    c = campaign()
    made = pods.token_secret(c.ref, "tok", plan_hash="h")
    assert pods.owns_secret(c.ref, made)
    foreign = {"metadata": {"name": made["metadata"]["name"], "labels": made["metadata"]["labels"]}}
    assert not pods.owns_secret(c.ref, foreign)  # labels alone (anyone can copy them) are not enough
    earlier = pods.token_secret(
        pods.CampaignRef(c.ref.name, c.ref.namespace, "uid-of-a-deleted-one"), "t", plan_hash="h"
    )
    assert not pods.owns_secret(c.ref, earlier)
    unlabelled = {"metadata": {"ownerReferences": made["metadata"]["ownerReferences"]}}
    assert not pods.owns_secret(c.ref, unlabelled)
