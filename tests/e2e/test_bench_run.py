"""`mlds bench run` (issue 7 (d)): the end-to-end benchmark runs a real `mlds run` and reports its overhead."""

from __future__ import annotations

import re
import signal
from pathlib import Path

import pytest
from click.testing import CliRunner
from mlds_contract.campaign import Dataset
from mlds_contract.errors import UserError
from mlds_contract.plan import campaign_targets
from mlds_operator.bench.campaign import bench_campaign_command
from mlds_operator.bench.campaign_run import bench_campaign, bench_run_command

from tests.run_fixtures import activity, reap, start_mlds, worker_env, worker_events
from tests.waiting import wait_until


def test_the_fixed_campaign_spreads_the_networks_evenly_over_its_machines() -> None:
    campaign = bench_campaign(100, ["SingleDirectMachine", "SingleInvertMachine"], units_per_lease=1)
    assert campaign.spec.networks_per_target == 50
    assert campaign.spec.training.target_loss == pytest.approx(1e-4)  # the spec's criterion unless asked
    assert [p.units_per_lease for p in campaign.spec.pools] == [1]
    assert campaign.spec.seed == 1  # every way, and every run of the benchmark, trains the same networks
    assert bench_campaign(100, ["SingleDirectMachine"], units_per_lease=4, seed=5).spec.seed == 5


def test_a_ds2_campaign_trains_the_modified_machines_under_either_spelling() -> None:
    campaign = bench_campaign(4, ["SingleInvertMachine", "SimpleXORModified"], units_per_lease=4, dataset=Dataset.ds2)
    assert campaign.spec.workload.dataset is Dataset.ds2
    assert [t.name for t in campaign_targets(campaign.spec)] == ["SingleInvertModified", "SimpleXORModified"]
    with pytest.raises(UserError, match="ds1"):
        bench_campaign(2, ["SimpleXORModified"], units_per_lease=1)  # a Modified machine is not a ds1 machine


@pytest.mark.parametrize(
    ("networks", "machines"),
    [(3, ["SingleDirectMachine", "SingleInvertMachine"]), (2, ["NoSuchMachine"]), (2, [])],
    ids=["uneven split", "unknown machine", "no machine"],
)
def test_a_campaign_that_cannot_be_built_is_one_clear_error(networks: int, machines: list[str]) -> None:
    with pytest.raises(UserError):
        bench_campaign(networks, machines, units_per_lease=1)


@pytest.mark.e2e
@pytest.mark.slow
def test_a_small_run_reports_training_against_wall_time(tmp_path: object) -> None:
    args = ["--networks", "2", "--workers", "1", "--target-loss", "0.05"]
    result = CliRunner().invoke(bench_run_command, args)
    assert result.exit_code == 0, result.output
    assert "networks verified      2/2 (0 failed)" in result.output
    training = float(re.search(r"training \(sum\)\s+([\d,.]+) s", result.output)[1].replace(",", ""))  # type: ignore[index]
    wall = float(re.search(r"wall\s+([\d,.]+) s with 1 workers", result.output)[1].replace(",", ""))  # type: ignore[index]
    assert 0 < training <= wall  # one worker cannot train for longer than the run lasted
    overhead = float(re.search(r"overhead\s+([\d.]+)%", result.output)[1])  # type: ignore[index]
    assert overhead == pytest.approx(100 * (1 - training / wall), abs=1.5)  # from the figures rounded to 0.1 s


@pytest.mark.e2e
@pytest.mark.slow
def test_an_interrupted_benchmark_says_there_is_nothing_to_resume(tmp_path: Path) -> None:
    # TMPDIR under tmp_path: the benchmark's temporary store (and its workers' token files) are found here.
    args = ["bench", "campaign", "--networks", "4", "--stack", "2", "--ways", "continuous", "--target-loss", "1e-9"]
    bench = start_mlds(args, cwd=tmp_path, tag="bench", env=worker_env(TMPDIR=str(tmp_path)))
    try:

        def leased() -> bool:
            logs = tmp_path.glob("mlds-bench-campaign-*/store/_mlds/logs/worker-*.log")
            return any(e.message == "leased" for e in worker_events(list(logs)))

        wait_until(leased, what="a worker to lease", progress=lambda: activity(tmp_path), alive=bench.ended)
        bench.send(signal.SIGINT)
        code = bench.wait(what="the benchmark to stop after Ctrl-C", progress=lambda: activity(tmp_path))
    finally:
        leftovers = reap(str(tmp_path))
    assert code == 1, bench.describe()
    assert "interrupted: the run's temporary store is removed; there is nothing to resume" in bench.stderr
    assert "mlds-bench-campaign-" not in bench.stderr  # no path to a folder that is gone
    assert list(tmp_path.glob("mlds-bench-campaign-*")) == []
    assert leftovers == []


@pytest.mark.e2e
@pytest.mark.slow
def test_bench_campaign_compares_the_ways_and_names_the_network_that_bounds_the_tail() -> None:
    machines = "SingleDirectMachine,SingleInvertMachine"
    args = ["--networks", "4", "--machines", machines, "--stack", "2", "--ways", "one,continuous"]
    result = CliRunner().invoke(bench_campaign_command, [*args, "--target-loss", "0.05"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    one = next(line for line in lines if line.startswith("one at a time"))
    continuous = next(line for line in lines if line.startswith("continuous S=2"))
    # The last eight columns: wall, nets/h/core, x one, cpu-s/net, train-s/net, occupancy, (pending), tail.
    assert one.split()[-6] == "1.00"  # the baseline's ratio to itself
    assert float(continuous.split()[-6]) > 0  # its ratio to one at a time, measured
    assert continuous.split()[-3].endswith("%")  # mean occupancy: continuous stacks report it
    spread = next(line for line in lines if line.startswith("epochs to converge (min/median/max): "))
    assert "SingleDirectMachine " in spread
    assert "SingleInvertMachine " in spread
    longest = re.search(r"longest network: unit (\d) \((\w+)\), (\d+) epochs, ([\d.]+) s alone", result.output)
    assert longest is not None, result.output
    assert longest[2] in machines.split(",")
    assert int(longest[3]) >= 1
    assert float(longest[4]) > 0
    ceiling = re.search(
        r"best mean occupancy of any schedule with 2 slots: ([\d.]+)% \(([\d,]+) epochs in all", result.output
    )
    assert ceiling is not None, result.output
    total = int(ceiling[2].replace(",", ""))
    assert total >= 4  # four networks of at least one epoch each
    assert float(ceiling[1]) == pytest.approx(100 * total / (2 * max(int(longest[3]), total / 2)), abs=0.05)
