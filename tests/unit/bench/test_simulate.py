"""`mlds bench simulate` (issue 14): the schedule arithmetic its predictions rest on, checked by hand."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from mlds_contract.campaign import Dataset
from mlds_operator.bench.simulate import (
    REFERENCE_EPOCHS,
    StepCurve,
    bench_simulate_command,
    draw_epochs,
    simulate,
)
from mlds_operator.leases.costs import EPOCH_COST

CPU = StepCurve("cpu")
FLAT = StepCurve("gpu", gpu_epoch_seconds=1.0, gpu_knee=1024)  # every epoch costs 1 s up to K = 1024


def test_one_at_a_time_costs_every_epoch_alone() -> None:
    out = simulate([10, 20, 30], workers=1, width=1, curve=CPU, way="one")
    assert out.makespan == pytest.approx(60 * CPU(1))
    assert sorted(out.done_times) == pytest.approx([10 * CPU(1), 30 * CPU(1), 60 * CPU(1)])


def test_a_fixed_stack_lasts_as_long_as_its_slowest_member_and_idles_the_others() -> None:
    out = simulate([10, 40], workers=1, width=2, curve=FLAT, way="fixed")
    assert out.makespan == pytest.approx(40.0)  # flat curve: 40 epochs of 1 s, whoever is alive
    assert out.busy / out.capacity == pytest.approx(50 / 80)  # 10 + 40 member-epochs in 2 x 40 slot-epochs


def test_a_continuous_stack_refills_a_freed_slot_at_the_next_epoch() -> None:
    # Slots: [10 then 30], [40]: both busy for 40 epochs, then nothing is left.
    out = simulate([10, 40, 30], workers=1, width=2, curve=FLAT, way="continuous")
    assert out.makespan == pytest.approx(40.0)
    assert out.busy / out.capacity == pytest.approx(1.0)
    fixed = simulate([10, 40, 30], workers=1, width=2, curve=FLAT, way="fixed")
    assert fixed.makespan == pytest.approx(40.0 + 30.0)  # the second lease waits for the first to drain


def test_equal_epochs_leave_fixed_and_continuous_stacks_alike() -> None:
    epochs = [50] * 8
    fixed = simulate(epochs, workers=1, width=4, curve=CPU, way="fixed")
    continuous = simulate(epochs, workers=1, width=4, curve=CPU, way="continuous")
    assert continuous.makespan == pytest.approx(fixed.makespan)


def test_several_workers_share_the_queue() -> None:
    one = simulate([100] * 4, workers=1, width=2, curve=FLAT, way="continuous")
    two = simulate([100] * 4, workers=2, width=2, curve=FLAT, way="continuous")
    assert two.makespan == pytest.approx(one.makespan / 2)


def test_the_tail_is_the_time_from_90_to_100_percent_done() -> None:
    out = simulate([1] * 9 + [100], workers=1, width=1, curve=FLAT, way="one")
    assert out.tail == pytest.approx(100.0)  # the ninth network is done at 9 s, the tenth at 109 s


def test_the_cpu_curve_goes_through_bench_trains_measurements_and_grows_with_k() -> None:
    assert CPU(1) == pytest.approx(1 / 3.67)
    assert CPU(64) == pytest.approx(64 / 21.43)
    steps = [CPU(k) for k in (1, 2, 3, 4, 8, 16, 24, 32, 64, 128, 256, 512)]
    assert steps == sorted(steps)
    assert CPU(0) == 0.0


def test_drawn_epochs_keep_to_the_reference_range_and_come_costliest_machine_first() -> None:
    machines = ["SingleDirectMachine", "ParityMachine", "SingleInvertModified"]
    drawn = draw_epochs(machines, 300, seed=3, spread=0.6)
    assert [m for m, _ in drawn[:100]] == ["SingleInvertModified"] * 100  # 337 ds2 epochs x 4 > Parity's 345
    assert [m for m, _ in drawn[100:200]] == ["ParityMachine"] * 100
    for machine, epochs in drawn:
        _, lo, hi = REFERENCE_EPOCHS[machine]
        cost = EPOCH_COST[Dataset.ds2] if machine.endswith("Modified") else 1
        assert lo * cost <= epochs <= hi * cost
    assert draw_epochs(machines, 30, seed=3) == draw_epochs(machines, 30, seed=3)  # a seed replays


def test_a_wider_spread_drains_fixed_stacks_more() -> None:
    machines = ["SingleDirectModified", "SingleInvertModified", "SimpleXORModified"]

    def fixed_over_continuous(spread: float) -> float:
        total = 0.0
        for seed in range(5):
            epochs = [e for _, e in draw_epochs(machines, 240, seed=seed, spread=spread)]
            fixed = simulate(epochs, workers=1, width=8, curve=CPU, way="fixed").makespan
            total += fixed / simulate(epochs, workers=1, width=8, curve=CPU, way="continuous").makespan
        return total / 5

    assert fixed_over_continuous(0.6) > fixed_over_continuous(0.1) > 1.0


def test_the_command_prints_the_three_ways_and_refuses_unknown_machines() -> None:
    result = CliRunner().invoke(
        bench_simulate_command, ["--networks", "24", "--stack", "4", "--machines", "SingleDirectModified"]
    )
    assert result.exit_code == 0, result.output
    rows = [line.split()[0] for line in result.output.splitlines()[3:]]
    assert rows == ["one", "fixed", "continuous"]
    assert "spread 0.35" in result.output

    bad = CliRunner().invoke(bench_simulate_command, ["--machines", "NoSuchMachine"])
    assert bad.exit_code == 2
    assert "NoSuchMachine" in bad.output
