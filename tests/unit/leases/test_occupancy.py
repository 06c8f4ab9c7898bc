"""Stack occupancy bookkeeping (mlds_operator.leases.occupancy): means per pool, and a bound on worker ids."""

from __future__ import annotations

from mlds_contract.lease import StackReport
from mlds_operator.leases.occupancy import MAX_WORKERS, StackOccupancy

from tests.clock import FakeClock


def report(member: float, slot: float, *, live: int = 1, slots: int = 2) -> StackReport:
    return StackReport(slots=slots, live=live, member_seconds=member, slot_seconds=slot)


def test_the_mean_is_the_workers_time_weighted_totals_and_now_counts_recent_workers_only() -> None:
    clock = FakeClock()
    occ = StackOccupancy(clock=clock, active_seconds=300.0)
    occ.report("a", "cpu", report(30.0, 40.0, live=2, slots=4), pending=5)
    clock.advance(400.0)
    occ.report("b", "cpu", report(10.0, 40.0, live=1, slots=4), pending=0)

    (cpu,) = occ.pools().values()

    assert (cpu.workers, cpu.live, cpu.slots) == (1, 1, 4)  # "a" was last heard 400 s ago
    assert cpu.mean == 40.0 / 80.0
    assert cpu.mean_while_pending == 30.0 / 40.0  # "b" reported only once nothing was pending


def test_invented_worker_ids_are_forgotten_after_an_hour_and_the_means_keep_what_they_reported() -> None:
    clock = FakeClock()
    occ = StackOccupancy(clock=clock)
    for n in range(MAX_WORKERS):
        occ.report(f"old-{n}", "cpu", report(1.0, 2.0), pending=1)
    clock.advance(3601.0)
    for n in range(10):
        occ.report(f"new-{n}", "cpu", report(3.0, 4.0), pending=1)

    (cpu,) = occ.pools().values()

    assert len(occ._workers) == 10  # the old ones were folded into the pool's totals
    assert cpu.workers == 10
    assert cpu.mean == (MAX_WORKERS * 1.0 + 10 * 3.0) / (MAX_WORKERS * 2.0 + 10 * 4.0)
    assert cpu.mean_while_pending == cpu.mean


def test_the_pending_mean_counts_the_time_between_reports_that_began_with_units_pending() -> None:
    occ = StackOccupancy(clock=FakeClock())
    occ.report("a", "cpu", report(10.0, 20.0), pending=3)  # fed from the start
    occ.report("a", "cpu", report(50.0, 60.0), pending=0)  # +40 of 40: pending when the interval began
    occ.report("a", "cpu", report(55.0, 100.0), pending=2)  # a lonely tail, then a late retry turns pending
    occ.report("a", "cpu", report(95.0, 140.0), pending=0)  # +40 of 40 again

    (cpu,) = occ.pools().values()

    assert cpu.mean == 95.0 / 140.0
    # 90 of 100 slot-seconds: the 40 lonely slot-seconds before the retry stay out of it.
    assert cpu.mean_while_pending == 90.0 / 100.0
