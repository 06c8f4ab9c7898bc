"""The lease book's rules, told as stories: grants, heartbeats, expiry, retries, duplicates, speculation,
restarts and checkpoints. A fake clock drives time; nothing sleeps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from mlds_contract.errors import MldsError
from mlds_contract.lease import Outcome, UnitState
from mlds_operator.leases.book import (
    CheckpointError,
    LeaseBook,
    LeaseView,
    NotHolder,
    UnknownLease,
    UnknownUnit,
)
from mlds_operator.leases.ranges import parse_ranges

from tests.clock import FakeClock

LEASE = 100.0  # lease seconds in these stories


@dataclass
class World:
    """A book, its clock, and shorthands for what workers do."""

    book: LeaseBook
    clock: FakeClock

    def grant(self, worker: str = "w1", k: int = 1, *, pool: str = "cpu", speculative: bool = False) -> LeaseView:
        lease = self.book.grant(worker, pool, k, speculative=speculative)
        assert lease is not None, f"{worker} got no lease"
        return lease

    def complete(self, unit: int, worker: str = "w1", *, attempt: int = 0, converged: bool = True) -> Outcome:
        pool = "gpu" if worker.startswith("g") else "cpu"
        return self.book.complete(unit, worker=worker, pool=pool, attempt=attempt, converged=converged)

    def fail(self, unit: int, worker: str = "w1", *, attempt: int = 0, retry: bool = False) -> Outcome:
        pool = "gpu" if worker.startswith("g") else "cpu"
        return self.book.fail(unit, worker=worker, pool=pool, attempt=attempt, retry=retry)

    def heartbeat(self, lease: LeaseView, worker: str | None = None) -> tuple[int, ...]:
        units = dict(zip(lease.units, lease.attempts, strict=True))
        return self.book.heartbeat(lease.lease_id, worker or lease.worker, pool=lease.pool, units=units).cancel

    def state(self, unit: int) -> UnitState:
        return self.book.unit(unit).state

    def attempts(self, unit: int) -> int:
        return self.book.unit(unit).attempts

    def restart(self, **overrides: float) -> None:
        """The server restarts from a checkpoint of the book as it is now."""
        self.book = LeaseBook.from_bytes(self.book.to_bytes(), clock=self.clock, **overrides)  # type: ignore[arg-type]


def world(total: int = 10, *, max_attempts: int = 3, pools: tuple[str, ...] = ()) -> World:
    clock = FakeClock()
    return World(LeaseBook(total, max_attempts=max_attempts, lease_seconds=LEASE, clock=clock, pools=pools), clock)


# ------------------------------------------------------------------------------------------------ grants


@pytest.mark.parametrize(
    ("total", "k", "expected"),
    [
        pytest.param(10, 1, (0,), id="one-unit lease takes unit 0"),
        pytest.param(10, 4, (0, 1, 2, 3), id="K-unit lease takes the K lowest units"),
        pytest.param(3, 16, (0, 1, 2), id="K above what is left takes what is left"),
    ],
)
def test_a_grant_leases_the_lowest_pending_units(total: int, k: int, expected: tuple[int, ...]) -> None:
    w = world(total)
    lease = w.grant("w1", k)
    assert lease.units == expected
    assert lease.attempts == (0,) * len(expected)
    assert lease.deadline == w.clock.now + LEASE
    assert not lease.speculative
    assert all(w.state(u) is UnitState.leased for u in expected)
    assert w.book.stats().leased == len(expected)


def test_lease_ids_are_long_random_tokens() -> None:
    w = world(100)
    ids = {w.grant("w1", 1).lease_id for _ in range(50)}
    assert len(ids) == 50
    assert all(len(i) >= 20 for i in ids)


def test_grants_move_on_and_come_back_for_returned_units() -> None:
    w = world(10)
    first = w.grant("w1", 3)
    second = w.grant("w2", 3)
    assert second.units == (3, 4, 5)
    assert w.fail(1, "w1", retry=True) is Outcome.accepted  # released: the lowest pending unit again
    assert w.grant("w3", 2).units == (1, 6)
    assert w.book.lease(first.lease_id) == LeaseView(
        first.lease_id, "w1", "cpu", (0, 2), (0, 0), first.deadline, first.granted_at, False
    )


def test_nothing_to_grant_when_everything_is_leased_or_done() -> None:
    w = world(2)
    w.grant("w1", 2)
    assert w.book.grant("w2", "cpu", 1) is None
    w.complete(0)
    w.complete(1)
    assert w.book.grant("w2", "cpu", 1) is None
    assert w.book.finished


def test_an_empty_campaign_is_finished_from_the_start() -> None:
    w = world(0)
    assert w.book.finished
    assert w.book.grant("w1", "cpu", 4) is None


def test_max_units_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_units"):
        world().book.grant("w1", "cpu", 0)


# ----------------------------------------------------------------------------------- heartbeat and expiry


@pytest.mark.parametrize(
    "sweep",
    [
        pytest.param(lambda w: w.book.expire(), id="expired by the server's sweep"),
        pytest.param(lambda w: w.book.grant("w2", "cpu", 1), id="expired lazily by the next grant"),
    ],
)
def test_an_expired_lease_is_reissued_with_the_next_attempt(sweep: Callable[[World], object]) -> None:
    w = world(3)
    lease = w.grant("w1", 2)
    w.clock.advance(LEASE)  # the deadline itself is the end of the lease
    sweep(w)
    assert w.book.lease(lease.lease_id) is None
    assert [w.attempts(u) for u in range(3)] == [1, 1, 0]
    leases = [*w.book.leases(), w.grant("w3", 3)]
    assert {u: a for v in leases for u, a in zip(v.units, v.attempts, strict=True)} == {0: 1, 1: 1, 2: 0}


def test_expire_reports_what_expired() -> None:
    w = world(5)
    old = w.grant("w1", 2)
    w.clock.advance(50)
    young = w.grant("w2", 2)
    w.clock.advance(50)
    assert w.book.expire() == [old]
    assert w.book.lease(young.lease_id) == young
    assert [w.attempts(u) for u in range(5)] == [1, 1, 0, 0, 0]


def test_heartbeats_keep_a_lease_alive() -> None:
    w = world(3)
    lease = w.grant("w1", 1)
    for _ in range(5):
        w.clock.advance(LEASE - 1)
        assert w.book.expire() == []
        assert w.heartbeat(lease) == ()
    assert w.book.lease(lease.lease_id).deadline == w.clock.now + LEASE  # type: ignore[union-attr]
    w.clock.advance(LEASE)
    assert [v.lease_id for v in w.book.expire()] == [lease.lease_id]
    assert w.state(0) is UnitState.pending
    assert w.attempts(0) == 1


def test_expiry_stays_right_through_a_long_run_of_short_leases() -> None:
    w = world(5000)
    kept = w.grant("keeper", 1)
    doomed = w.grant("doomed", 1)
    for _ in range(3000):  # enough turnover to make the book tidy its deadline queue
        lease = w.grant("busy", 1)
        w.complete(lease.units[0], "busy")
        w.clock.advance(0.01)
    w.heartbeat(kept)
    w.clock.advance(LEASE - 20)
    assert [v.worker for v in w.book.expire()] == ["doomed"]
    assert w.book.lease(kept.lease_id) is not None
    assert w.state(doomed.units[0]) is UnitState.pending


def test_a_late_heartbeat_before_the_sweep_still_saves_the_lease() -> None:
    w = world(3)
    lease = w.grant("w1", 1)
    w.clock.advance(LEASE + 5)
    assert w.heartbeat(lease) == ()
    assert w.book.expire() == []
    assert w.attempts(0) == 0


def test_only_the_holder_may_heartbeat() -> None:
    w = world(3)
    lease = w.grant("w1", 1)
    with pytest.raises(NotHolder, match="held by another worker"):
        w.heartbeat(lease, worker="intruder")


def test_a_heartbeat_for_an_unknown_lease_without_units_is_unknown() -> None:
    w = world(3)
    with pytest.raises(UnknownLease):
        w.book.heartbeat("no-such-lease", "w1", pool="cpu")
    assert issubclass(UnknownLease, MldsError)


# ------------------------------------------------------------------------------------------ max attempts


def expire_once(w: World) -> None:
    lease = w.grant("w1", 1)
    assert lease.units == (0,)
    w.clock.advance(LEASE)
    w.book.expire()


def fail_once(w: World) -> None:
    lease = w.grant("w1", 1)
    assert w.fail(0, attempt=lease.attempts[0]) is Outcome.accepted


def not_converge_once(w: World) -> None:
    lease = w.grant("w1", 1)
    assert w.complete(0, attempt=lease.attempts[0], converged=False) is Outcome.accepted


@pytest.mark.parametrize(
    "steps",
    [
        pytest.param([expire_once] * 3, id="three expiries"),
        pytest.param([fail_once] * 3, id="three failures"),
        pytest.param([not_converge_once] * 3, id="three non-converged networks"),
        pytest.param([expire_once, fail_once, not_converge_once], id="expiry, failure and non-convergence all count"),
    ],
)
def test_a_unit_fails_after_max_attempts(steps: list[Callable[[World], None]]) -> None:
    w = world(1, max_attempts=3)
    for i, step in enumerate(steps):
        assert w.state(0) is UnitState.pending
        assert w.attempts(0) == i
        step(w)
    assert w.state(0) is UnitState.failed
    assert w.book.grant("w1", "cpu", 1) is None
    stats = w.book.stats()
    assert (stats.failed, stats.failed_units, stats.finished) == (1, "0", True)
    assert stats.pools[0].failed == 3


def test_a_non_converged_network_is_retried_with_new_seeds() -> None:
    w = world(2)
    w.grant("w1", 1)
    assert w.complete(0, converged=False) is Outcome.accepted
    assert (w.state(0), w.attempts(0)) == (UnitState.pending, 1)
    retry = w.grant("w2", 1)
    assert (retry.units, retry.attempts) == ((0,), (1,))
    assert w.book.stats().succeeded == 0


def test_a_stale_failure_report_is_not_counted_twice() -> None:
    w = world(1, max_attempts=5)
    w.grant("w1", 1)
    w.clock.advance(LEASE)
    w.book.expire()  # attempt 0 counted by the expiry
    assert w.fail(0, "w1", attempt=0) is Outcome.duplicate
    assert w.attempts(0) == 1


def test_a_failure_report_from_a_former_holder_does_not_disturb_the_new_holder() -> None:
    w = world(1, max_attempts=5)
    w.grant("w1", 1)
    w.clock.advance(LEASE)
    w.book.expire()
    w.grant("w2", 1)
    assert w.fail(0, "w1", attempt=1) is Outcome.duplicate
    assert (w.state(0), w.attempts(0)) == (UnitState.leased, 1)


def test_failure_reports_for_finished_units_are_duplicates() -> None:
    w = world(1)
    w.grant("w1", 1)
    w.complete(0)
    assert w.fail(0) is Outcome.duplicate
    assert w.fail(0, retry=True) is Outcome.duplicate
    assert w.complete(0, converged=False) is Outcome.duplicate


# ---------------------------------------------------------------------------------- completions and duplicates


def test_a_completion_is_counted_once() -> None:
    w = world(3, pools=("cpu", "gpu"))
    lease = w.grant("w1", 2)
    assert w.complete(0) is Outcome.accepted
    assert w.complete(0) is Outcome.duplicate
    assert w.complete(0, "w2") is Outcome.duplicate
    stats = w.book.stats()
    assert (stats.succeeded, stats.leased, stats.pending) == (1, 1, 1)
    assert w.book.lease(lease.lease_id).units == (1,)  # type: ignore[union-attr]


def test_completing_every_unit_of_a_lease_ends_it() -> None:
    w = world(3)
    lease = w.grant("w1", 2)
    w.complete(0)
    w.complete(1)
    assert w.book.lease(lease.lease_id) is None
    assert w.book.stats().leases == 0


def test_a_partly_completed_lease_returns_only_the_rest_on_expiry() -> None:
    w = world(6)
    lease = w.grant("w1", 4)
    w.complete(1)
    w.complete(3)
    w.clock.advance(LEASE)
    (expired,) = w.book.expire()
    assert expired.units == (0, 2)
    assert [w.state(u) for u in range(4)] == [UnitState.pending, UnitState.succeeded] * 2
    assert [w.attempts(u) for u in range(4)] == [1, 0, 1, 0]
    assert w.grant("w2", 4).units == (0, 2, 4, 5)
    assert expired.lease_id == lease.lease_id


@pytest.mark.parametrize(
    "before_the_late_completion",
    [
        pytest.param("nothing", id="lease expired, unit not yet re-issued"),
        pytest.param("reissued", id="lease expired, unit re-issued to another worker"),
        pytest.param("failed", id="lease expired on the last attempt, unit failed"),
    ],
)
def test_a_late_verified_completion_is_never_thrown_away(before_the_late_completion: str) -> None:
    w = world(1, max_attempts=1 if before_the_late_completion == "failed" else 3)
    w.grant("w1", 1)
    w.clock.advance(LEASE)
    w.book.expire()
    other = w.grant("w2", 1) if before_the_late_completion == "reissued" else None
    assert w.complete(0, "w1") is Outcome.accepted
    stats = w.book.stats()
    assert (stats.succeeded, stats.failed, stats.leased, stats.failed_units) == (1, 0, 0, "")
    if other is not None:
        assert w.book.lease(other.lease_id) is None  # its only unit was revoked: the lease ended
        with pytest.raises(NotHolder):
            w.heartbeat(other)  # so the other worker's next heartbeat tells it to stop
        assert w.complete(0, "w2", attempt=1) is Outcome.duplicate
        assert w.book.stats().succeeded == 1


def test_a_late_completion_revokes_the_unit_from_a_bigger_reissued_lease() -> None:
    w = world(3)
    w.grant("w1", 1)
    w.clock.advance(LEASE)
    w.book.expire()
    other = w.grant("w2", 3)
    assert (other.units, other.attempts) == ((0, 1, 2), (1, 0, 0))
    assert w.complete(0, "w1") is Outcome.accepted
    assert w.heartbeat(other) == (0,)
    assert w.book.lease(other.lease_id).units == (1, 2)  # type: ignore[union-attr]


def test_a_completion_under_a_lease_id_the_book_never_saw_is_accepted() -> None:
    """After a restart from a checkpoint taken before the grant, the lease is unknown; the result still counts."""
    w = world(2)
    w.restart()
    w.grant("w1", 1)
    w.restart()  # again: the lease granted since is in no checkpoint
    assert w.state(0) is UnitState.leased  # orphaned, waiting for its worker
    assert w.complete(0, "w1") is Outcome.accepted
    assert w.state(0) is UnitState.succeeded


def test_units_outside_the_campaign_are_unknown() -> None:
    w = world(3)
    for bad in (-1, 3):
        with pytest.raises(UnknownUnit, match=r"outside the campaign \(0..2\)"):
            w.complete(bad)
        with pytest.raises(UnknownUnit):
            w.fail(bad)
        with pytest.raises(UnknownUnit):
            w.book.unit(bad)


# ------------------------------------------------------------------------------------------------ release


def test_a_released_unit_goes_back_without_counting_an_attempt() -> None:
    w = world(3)
    w.grant("w1", 2)
    assert w.fail(0, retry=True) is Outcome.accepted
    assert (w.state(0), w.attempts(0)) == (UnitState.pending, 0)
    assert w.fail(0, retry=True) is Outcome.duplicate  # no longer held
    assert w.fail(1, "w2", retry=True) is Outcome.duplicate  # never held by w2
    assert w.state(1) is UnitState.leased


def test_a_worker_shutting_down_releases_its_whole_lease() -> None:
    w = world(5)
    lease = w.grant("w1", 4)
    w.complete(2)
    with pytest.raises(NotHolder):
        w.book.release_lease(lease.lease_id, "w2")
    assert w.book.release_lease(lease.lease_id, "w1") == [0, 1, 3]
    assert w.book.lease(lease.lease_id) is None
    assert [w.attempts(u) for u in range(5)] == [0] * 5
    with pytest.raises(UnknownLease):
        w.book.release_lease(lease.lease_id, "w1")


# ------------------------------------------------------------------------------------------- speculation


def test_speculative_leases_copy_the_units_with_the_soonest_deadline() -> None:
    w = world(4)
    w.grant("w1", 2)
    w.clock.advance(10)
    w.grant("w2", 2)
    assert w.book.grant("w3", "cpu", 1) is None  # not without asking
    spec = w.grant("w3", 3, speculative=True)
    assert spec.speculative
    assert spec.units == (0, 1, 2)  # w1's (older) first, then w2's
    assert spec.attempts == (0, 0, 0)  # same attempt: either copy yields the campaign's network
    stats = w.book.stats()
    assert (stats.leased, stats.pending) == (4, 0)  # a copy is not an extra unit


def test_a_unit_gets_at_most_one_speculative_copy_and_never_of_ones_own() -> None:
    w = world(2)
    w.grant("w1", 2)
    assert w.book.grant("w1", "cpu", 2, speculative=True) is None
    assert w.grant("w2", 1, speculative=True).units == (0,)
    assert w.grant("w3", 2, speculative=True).units == (1,)
    assert w.book.grant("w4", "cpu", 2, speculative=True) is None
    assert w.book.unit(0).leases == (w.book.leases()[0].lease_id, w.book.leases()[1].lease_id)


@pytest.mark.parametrize(
    ("winner", "loser"),
    [pytest.param("w1", "w2", id="the original holder wins"), pytest.param("w2", "w1", id="the speculative copy wins")],
)
def test_the_first_speculative_completion_wins(winner: str, loser: str) -> None:
    w = world(2)
    w.grant("w1", 2)
    w.grant("w2", 2, speculative=True)
    assert w.complete(0, winner) is Outcome.accepted
    loser_lease = next(v for v in w.book.leases() if v.worker == loser)
    assert loser_lease.units == (1,)  # unit 0 was revoked from the loser
    cancel = w.book.heartbeat(loser_lease.lease_id, loser, pool="cpu", units={0: 0, 1: 0}).cancel
    assert cancel == (0,)
    assert w.complete(0, loser) is Outcome.duplicate
    assert w.complete(1, loser) is Outcome.accepted
    assert w.book.leases() == []  # both leases ended: nothing left to hold
    assert w.book.stats().succeeded == 2


def test_the_losing_copy_is_told_once_at_its_next_request_of_any_kind() -> None:
    w = world(3)
    w.grant("w1", 2)
    w.grant("w3", 1)  # unit 2: nothing pending now
    assert w.grant("w2", 2, speculative=True).units == (0, 1)  # copies of w1's units (the soonest deadline)
    assert w.complete(0, "w2") is Outcome.accepted  # the copy wins unit 0
    assert w.complete(1, "w1") is Outcome.accepted  # the original wins unit 1
    assert w.book.take_cancellations("w1") == (0,)
    assert w.book.take_cancellations("w1") == ()  # told once
    assert w.book.take_cancellations("w2") == (1,)
    assert w.book.take_cancellations("w3") == ()  # nothing of its own was completed elsewhere


def test_a_lease_whose_units_all_went_elsewhere_ends_and_its_heartbeat_says_stop() -> None:
    w = world(1)
    w.grant("w1", 1)
    spec = w.grant("w2", 1, speculative=True)
    w.complete(0, "w1")
    assert w.book.lease(spec.lease_id) is None
    with pytest.raises(NotHolder):
        w.heartbeat(spec)


def test_a_heartbeat_without_units_lists_what_other_workers_completed() -> None:
    w = world(2)
    w.grant("w1", 2)
    spec = w.grant("w2", 2, speculative=True)
    w.complete(1, "w1")
    assert w.book.heartbeat(spec.lease_id, "w2", pool="cpu").cancel == (1,)


@pytest.mark.parametrize(
    "drop_out",
    [
        pytest.param(lambda w: (w.clock.advance(LEASE - 1), w.book.expire()), id="original holder expires"),
        pytest.param(lambda w: w.fail(0, "w1"), id="original holder fails"),
        pytest.param(lambda w: w.complete(0, "w1", converged=False), id="original holder does not converge"),
        pytest.param(lambda w: w.fail(0, "w1", retry=True), id="original holder releases"),
    ],
)
def test_when_one_copy_drops_out_the_other_carries_the_attempt(drop_out: Callable[[World], object]) -> None:
    w = world(1)
    w.grant("w1", 1)
    w.clock.advance(1)
    spec = w.grant("w2", 1, speculative=True)
    drop_out(w)
    assert (w.state(0), w.attempts(0)) == (UnitState.leased, 0)  # not counted while a copy lives
    assert w.book.unit(0).leases == (spec.lease_id,)
    assert w.grant("w3", 1, speculative=True).units == (0,)  # it may be copied again
    assert w.complete(0, "w2") is Outcome.accepted


def test_an_attempt_is_counted_when_its_last_copy_fails() -> None:
    w = world(1, max_attempts=3)
    w.grant("w1", 1)
    w.grant("w2", 1, speculative=True)
    w.fail(0, "w1")
    w.fail(0, "w2")
    assert (w.state(0), w.attempts(0)) == (UnitState.pending, 1)
    assert [p.failed for p in w.book.stats().pools] == [2]  # both pool-level failures are visible


# ---------------------------------------------------------------------------------- restarts and re-adoption


def test_a_restart_honours_live_leases_and_grants_their_units_to_nobody_else() -> None:
    w = world(6)
    lease = w.grant("w1", 2)
    w.restart()
    stats = w.book.stats()
    assert (stats.leased, stats.pending, stats.leases) == (2, 4, 0)
    assert w.grant("w2", 2).units == (2, 3)  # units 0 and 1 wait for their worker
    result = w.book.heartbeat(lease.lease_id, "w1", pool="cpu", units={0: 0, 1: 0})
    assert result.readopted
    assert result.cancel == ()
    assert w.book.lease(lease.lease_id) == LeaseView(
        lease.lease_id, "w1", "cpu", (0, 1), (0, 0), w.clock.now + LEASE, w.clock.now, False
    )
    assert w.complete(0) is Outcome.accepted


def test_orphaned_units_return_uncounted_when_their_worker_never_comes_back() -> None:
    w = world(3)
    w.grant("w1", 2)
    w.restart()
    w.clock.advance(LEASE - 1)
    w.book.expire()
    assert w.state(0) is UnitState.leased
    w.clock.advance(1)
    assert w.grant("w2", 3).units == (0, 1, 2)
    assert [w.attempts(u) for u in range(3)] == [0, 0, 0]


def test_a_lease_granted_after_the_last_checkpoint_is_not_readopted_but_its_result_still_counts() -> None:
    # The checkpoint does not know the lease: re-adopting it would take the worker's word for what it held.
    w = world(4)
    snapshot = w.book.to_bytes()
    lease = w.grant("w1", 2)
    w.book = LeaseBook.from_bytes(snapshot, clock=w.clock)
    assert w.state(0) is UnitState.pending
    with pytest.raises(NotHolder, match="none of its units is free"):
        w.heartbeat(lease)
    assert w.state(0) is UnitState.pending
    assert w.grant("w2", 1).units == (0,)
    assert w.complete(1, "w1") is Outcome.accepted  # its finished network still counts


def test_readoption_loses_to_whoever_was_granted_the_units_first() -> None:
    w = world(4)
    lease = w.grant("w1", 2)
    w.restart()
    w.book.fail(0, worker="w1", pool="cpu", attempt=0, retry=True)  # its worker let unit 0 go: pending at once
    w.grant("w2", 1)
    assert w.book.heartbeat(lease.lease_id, "w1", pool="cpu", units={0: 0, 1: 0}).cancel == (0,)


def test_readoption_keeps_what_the_checkpoint_says_the_lease_held_and_cancels_the_rest() -> None:
    w = world(8, max_attempts=3)
    lease = w.grant("w1", 4)  # units 0-3
    other = w.grant("w2", 1)  # unit 4
    w.restart()
    w.complete(0, "w9")  # done elsewhere
    result = w.book.heartbeat(lease.lease_id, "w1", pool="cpu", units={0: 0, 1: 0, 2: 0, 3: 2, 4: 0, 5: 0, 70: 0})
    assert result.readopted
    # done; an attempt never issued; another lease's unit; a pending unit it never held; not a unit at all
    assert result.cancel == (0, 3, 4, 5, 70)
    assert w.book.lease(lease.lease_id).units == (1, 2)  # type: ignore[union-attr]
    assert [w.attempts(u) for u in range(6)] == [0, 0, 0, 0, 0, 0]
    assert w.book.heartbeat(other.lease_id, "w2", pool="cpu", units={4: 0}).readopted


def test_an_invented_lease_id_readopts_nothing() -> None:
    w = world(30_000)
    w.grant("w1", 4)
    w.restart()
    with pytest.raises(NotHolder):
        w.book.heartbeat("invented-lease-id-0000", "w666", pool="cpu", units=dict.fromkeys(range(30000), 0))
    stats = w.book.stats()
    assert (stats.leases, stats.leased, stats.pending) == (0, 4, 29_996)


def test_an_expired_lease_is_not_readopted_and_its_counted_attempt_is_not_counted_again() -> None:
    w = world(2, max_attempts=3)
    lease = w.grant("w1", 1)
    w.clock.advance(LEASE)
    w.book.expire()  # attempt 0 counted: the counter is 1
    with pytest.raises(NotHolder):
        w.heartbeat(lease)
    assert w.fail(0, attempt=0) is Outcome.duplicate  # the same attempt 0 is not counted twice
    assert (w.state(0), w.attempts(0)) == (UnitState.pending, 1)
    assert w.grant("w2", 1).attempts == (1,)


def test_a_readopted_lease_expires_like_any_other() -> None:
    w = world(2)
    lease = w.grant("w1", 1)
    w.restart()
    w.heartbeat(lease)
    w.clock.advance(LEASE)
    assert [v.lease_id for v in w.book.expire()] == [lease.lease_id]
    assert w.attempts(0) == 1


# ------------------------------------------------------------------------------------------- checkpoints


def test_a_checkpoint_round_trip_keeps_every_unit_and_counter() -> None:
    w = world(1000, max_attempts=2, pools=("cpu", "gpu", "idle"))
    w.grant("w1", 10)
    for u in range(5):
        w.complete(u)
    w.grant("g1", 3, pool="gpu")
    w.complete(11, "g1")
    w.fail(5)
    w.fail(6, retry=True)
    w.grant("w2", 2)
    w.clock.advance(LEASE)
    w.book.expire()
    w.grant("w3", 4)
    before = w.book.stats(active_seconds=0)
    data = w.book.to_bytes()
    assert len(data) < 500  # a compact snapshot: compressed arrays
    after = LeaseBook.from_bytes(data, clock=w.clock, total=1000)
    # Live leases and the workers seen are not checkpointed; everything else is.
    expected = replace(before, leases=0, pools=tuple(replace(p, workers=0) for p in before.pools))
    assert after.stats(active_seconds=0) == expected
    assert [after.unit(u).attempts for u in range(1000)] == [w.book.unit(u).attempts for u in range(1000)]
    assert [after.unit(u).state for u in range(1000)] == [w.book.unit(u).state for u in range(1000)]
    assert (after.max_attempts, after.lease_seconds, after.total) == (2, LEASE, 1000)


def test_unpublished_units_are_written_as_if_they_succeeded_after_the_checkpoint() -> None:
    # The server's rows of units 0 (cpu) and 11 (gpu) are not in a manifest part yet: the checkpoint must
    # not count them, so that recovery (complete() for a unit not succeeded) counts each once.
    w = world(20, pools=("cpu", "gpu"))
    lease = w.grant("w1", 4)
    w.complete(0)
    w.complete(1)
    w.grant("g1", 8, pool="gpu")
    w.complete(11, "g1")
    w.clock.advance(1)
    w.book = LeaseBook.from_bytes(w.book.to_bytes(unpublished={0: "cpu", 11: "gpu"}), clock=w.clock)
    assert [w.state(u) for u in (0, 1, 11)] == [UnitState.leased, UnitState.succeeded, UnitState.leased]
    assert {p.name: p.succeeded for p in w.book.stats().pools} == {"cpu": 1, "gpu": 0}
    assert w.book.issued(11, 0)
    # No lease holds them: the lease that trained unit 0 re-establishes only its units still in training.
    result = w.book.heartbeat(lease.lease_id, "w1", pool="cpu", units={0: 0, 1: 0, 2: 0, 3: 0})
    assert (result.readopted, result.cancel) == (True, (0, 1))
    for unit, pool in ((0, "cpu"), (11, "gpu")):  # what recovery does with their published results
        assert w.book.complete(unit, worker="recovered", pool=pool, attempt=0, converged=True) is Outcome.accepted
    stats = w.book.stats()
    assert (stats.succeeded, {p.name: p.succeeded for p in stats.pools}) == (3, {"cpu": 2, "gpu": 1})


@pytest.mark.parametrize(
    ("unpublished", "message"),
    [
        pytest.param({1: "cpu"}, "only units that succeeded", id="a leased unit"),
        pytest.param({5: "cpu"}, "only units that succeeded", id="a pending unit"),
        pytest.param({99: "cpu"}, "only units that succeeded", id="not a unit"),
        pytest.param({0: "tpu"}, "pool 'tpu'", id="an unknown pool"),
    ],
)
def test_only_succeeded_units_of_known_pools_can_be_unpublished(unpublished: dict[int, str], message: str) -> None:
    w = world(10, pools=("cpu",))
    w.grant("w1", 2)
    w.complete(0)
    with pytest.raises(ValueError, match=message):
        w.book.checkpoint(unpublished=unpublished)


def test_settings_given_at_restore_override_the_checkpoint() -> None:
    w = world(3, max_attempts=5)
    w.grant("w1", 1)
    w.fail(0)
    w.grant("w1", 1)
    w.fail(0, attempt=1)  # attempts = 2 of 5
    w.restart(max_attempts=2, lease_seconds=30.0)
    assert w.state(0) is UnitState.failed  # a lowered limit fails the units that used it up
    assert w.book.lease_seconds == 30.0
    assert w.grant("w1", 1).deadline == w.clock.now + 30.0


def test_paused_survives_a_checkpoint() -> None:
    w = world(3)
    w.book.paused = True
    w.restart()
    assert w.book.paused
    assert w.book.grant("w1", "cpu", 1) is None


@pytest.mark.parametrize(
    ("mangle", "message"),
    [
        pytest.param(lambda b: b[:5], "too short", id="truncated header"),
        pytest.param(lambda b: b"NOTABOOK" + b[8:], "bad magic", id="foreign bytes"),
        pytest.param(lambda b: b[:8] + b"\x09\x00" + b[10:], "version 9", id="a newer version"),
        pytest.param(lambda b: b[:-4], "corrupt", id="truncated body"),
        pytest.param(lambda b: b[:-8] + bytes(8), "corrupt", id="damaged body"),
    ],
)
def test_a_bad_checkpoint_is_refused(mangle: Callable[[bytes], bytes], message: str) -> None:
    data = world(50).book.to_bytes()
    with pytest.raises(CheckpointError, match=message):
        LeaseBook.from_bytes(mangle(data))


def test_a_checkpoint_of_another_campaign_size_is_refused() -> None:
    with pytest.raises(CheckpointError, match="holds 50 units but the campaign has 60"):
        LeaseBook.from_bytes(world(50).book.to_bytes(), total=60)


# ------------------------------------------------------------------------------------------------- pause


def test_a_paused_book_grants_nothing_and_counts_no_expiry() -> None:
    w = world(3)
    lease = w.grant("w1", 1)
    w.book.paused = True
    assert w.book.grant("w2", "cpu", 1) is None
    assert w.book.grant("w2", "cpu", 1, speculative=True) is None
    assert w.heartbeat(lease) == ()  # leases in flight carry on
    w.clock.advance(LEASE)
    w.book.expire()
    assert (w.state(0), w.attempts(0)) == (UnitState.pending, 0)
    w.book.paused = False
    assert w.grant("w2", 1).units == (0,)
    assert w.book.stats().paused is False


# ------------------------------------------------------------------------------------------------- stats


def test_stats_count_units_per_state_and_pool() -> None:
    w = world(20, max_attempts=1, pools=("cpu", "gpu", "rocm"))
    w.grant("w1", 5)
    w.complete(0, "w1")
    w.fail(1, "w1")
    w.clock.advance(70)  # w1 is quiet from here on (but its lease is alive)
    w.grant("g1", 5, pool="gpu")
    for u in (5, 6, 7):
        w.complete(u, "g1")
    for u in (8, 9):
        w.fail(u, "g1")
    stats = w.book.stats(active_seconds=60)
    assert (stats.total, stats.pending, stats.leased, stats.succeeded, stats.failed) == (20, 10, 3, 4, 3)
    assert stats.pending + stats.leased + stats.succeeded + stats.failed == stats.total
    assert stats.failed_units == "1,8-9"
    assert parse_ranges(stats.failed_units) == w.book.failed_units().tolist()
    by_pool = {p.name: (p.succeeded, p.failed, p.workers) for p in stats.pools}
    assert by_pool == {"cpu": (1, 1, 0), "gpu": (3, 2, 1), "rocm": (0, 0, 0)}  # w1 was last seen 70 s ago
    counts = stats.unit_counts()
    assert (counts.total, counts.leased, counts.failed) == (20, 3, 3)
    assert not stats.finished


def test_failed_units_are_cut_short_in_stats_of_a_huge_campaign() -> None:
    w = world(10_000, max_attempts=1)
    lease = w.grant("w1", 10_000)
    for u in lease.units[::2]:
        w.fail(u)
    text = w.book.stats(failed_max_chars=100).failed_units
    assert len(text) <= 100
    assert text.startswith("0,2,4,")
    assert text.endswith("more)")


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="total"):
        LeaseBook(-1)
    with pytest.raises(ValueError, match="max_attempts"):
        LeaseBook(1, max_attempts=0)
    with pytest.raises(ValueError, match="lease_seconds"):
        LeaseBook(1, lease_seconds=0)


# --------------------------------------------------------------------------------- the rules, at random


WORKERS = ("w1", "w2", "w3", "g1")
N_UNITS = 12


class BookMachine(RuleBasedStateMachine):
    """Random protocol traffic; after every step the book must be self-consistent."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.book = LeaseBook(N_UNITS, max_attempts=3, lease_seconds=LEASE, clock=self.clock)
        self.accepted: set[int] = set()
        self.succeeded = 0
        self.attempts = [0] * N_UNITS
        self.forgotten: list[LeaseView] = []  # leases live at the last restart: their workers still heartbeat

    def _pool(self, worker: str) -> str:
        return "gpu" if worker.startswith("g") else "cpu"

    @rule(worker=st.sampled_from(WORKERS), k=st.integers(1, 5), speculative=st.booleans())
    def grant(self, worker: str, k: int, speculative: bool) -> None:
        lease = self.book.grant(worker, self._pool(worker), k, speculative=speculative)
        if lease is not None:
            assert 1 <= len(lease.units) <= k
            assert list(lease.units) == sorted(set(lease.units))
            assert all(a < self.book.max_attempts for a in lease.attempts)

    @rule(unit=st.integers(0, N_UNITS - 1), worker=st.sampled_from(WORKERS), converged=st.booleans())
    def complete(self, unit: int, worker: str, converged: bool) -> None:
        attempt = self.book.unit(unit).attempts
        outcome = self.book.complete(unit, worker=worker, pool=self._pool(worker), attempt=attempt, converged=converged)
        if converged and outcome is Outcome.accepted:
            assert unit not in self.accepted, f"unit {unit} completed twice"
            self.accepted.add(unit)
        if converged and outcome is Outcome.duplicate:
            assert unit in self.accepted

    @rule(unit=st.integers(0, N_UNITS - 1), worker=st.sampled_from(WORKERS), retry=st.booleans())
    def fail(self, unit: int, worker: str, retry: bool) -> None:
        attempt = self.book.unit(unit).attempts
        self.book.fail(unit, worker=worker, pool=self._pool(worker), attempt=attempt, retry=retry)

    @precondition(lambda self: self.book.leases())
    @rule(data=st.data())
    def heartbeat(self, data: st.DataObject) -> None:
        lease = data.draw(st.sampled_from(self.book.leases()))
        units = dict(zip(lease.units, lease.attempts, strict=True))
        result = self.book.heartbeat(lease.lease_id, lease.worker, pool=lease.pool, units=units)
        assert result.cancel == ()

    @rule(seconds=st.sampled_from([1.0, LEASE / 2, LEASE]))
    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @rule()
    def expire(self) -> None:
        for view in self.book.expire():
            assert view.deadline <= self.clock.now

    @rule()
    def restart(self) -> None:
        self.forgotten = self.book.leases()
        self.book = LeaseBook.from_bytes(self.book.to_bytes(), clock=self.clock)

    @precondition(lambda self: self.forgotten)
    @rule(data=st.data())
    def heartbeat_after_restart(self, data: st.DataObject) -> None:
        lease = data.draw(st.sampled_from(self.forgotten))
        self.forgotten.remove(lease)
        units = dict(zip(lease.units, lease.attempts, strict=True))
        try:
            result = self.book.heartbeat(lease.lease_id, lease.worker, pool=lease.pool, units=units)
        except NotHolder:
            return
        now = self.book.lease(lease.lease_id)
        assert now is not None
        assert set(now.units) | set(result.cancel) == set(lease.units)
        assert not set(now.units) & set(result.cancel)

    @rule(paused=st.booleans())
    def pause(self, paused: bool) -> None:
        self.book.paused = paused

    @invariant()
    def every_unit_is_in_exactly_one_state_and_the_counts_add_up(self) -> None:
        units = [self.book.unit(u) for u in range(N_UNITS)]
        stats = self.book.stats()
        by_state = {s: sum(1 for u in units if u.state is s) for s in UnitState}
        assert by_state == {
            UnitState.pending: stats.pending,
            UnitState.leased: stats.leased,
            UnitState.succeeded: stats.succeeded,
            UnitState.failed: stats.failed,
        }
        assert stats.pending + stats.leased + stats.succeeded + stats.failed == stats.total == N_UNITS
        assert stats.finished == (stats.pending == stats.leased == 0)
        assert parse_ranges(stats.failed_units) == [u.unit for u in units if u.state is UnitState.failed]

    @invariant()
    def leases_hold_exactly_the_leased_units(self) -> None:
        holders: dict[int, list[str]] = {}
        for lease in self.book.leases():
            assert lease.units, "a live lease holds at least one unit"
            for unit in lease.units:
                holders.setdefault(unit, []).append(lease.worker)
        for u in range(N_UNITS):
            view = self.book.unit(u)
            workers = holders.get(u, [])
            assert len(workers) == len(view.leases) <= 2
            assert len(set(workers)) == len(workers), "a worker holds a unit twice"
            if view.state is not UnitState.leased:
                assert workers == []
            # A leased unit with no lease is an orphan of a restart, waiting for its worker.

    @invariant()
    def succeeded_never_decreases_and_attempts_only_grow(self) -> None:
        stats = self.book.stats()
        assert stats.succeeded >= self.succeeded
        assert stats.succeeded == len(self.accepted)
        self.succeeded = stats.succeeded
        for u in range(N_UNITS):
            view = self.book.unit(u)
            assert view.attempts >= self.attempts[u]
            self.attempts[u] = view.attempts
            if view.state is UnitState.failed:
                assert view.attempts >= self.book.max_attempts
            if view.state is UnitState.pending:
                assert view.attempts < self.book.max_attempts


BookMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
test_book_rules_hold_under_random_traffic = BookMachine.TestCase
