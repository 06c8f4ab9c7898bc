"""`mlds bench train` (issue 7): what it prints, and how it refuses a GPU that is not there."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from mlds_contract.errors import UserError
from mlds_operator.bench.train import DS1_REFERENCE_EPOCHS, _Timing, bench_train_command, ds1_units, round_ratios


def test_the_bench_units_are_ds1_networks_of_every_machine_that_train_a_fixed_number_of_epochs() -> None:
    units = ds1_units(7, epochs=3)
    assert [u.machine for u in units[:5]] == list(DS1_REFERENCE_EPOCHS)
    assert len({u.init_seed for u in units}) == 7
    assert all(u.training.max_epochs == 3 for u in units)
    assert all(u.training.target_loss < 1e-20 for u in units)  # nobody converges: every run is `epochs` long


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is there: --device cuda would run")
def test_asking_for_a_gpu_on_a_machine_without_one_says_so() -> None:
    result = CliRunner().invoke(bench_train_command, ["--device", "cuda", "--k", "2"])
    assert isinstance(result.exception, UserError)  # `mlds` prints it as one line and exits 2
    assert "sees no GPU" in str(result.exception)


@pytest.mark.parametrize("sizes", ["0,4", "four", ""], ids=["zero", "not-a-number", "empty"])
def test_stack_sizes_must_be_positive_integers(sizes: str) -> None:
    result = CliRunner().invoke(bench_train_command, ["--k", sizes])
    assert result.exit_code == 2
    assert "--k" in result.output


def test_each_round_is_compared_with_the_baseline_of_the_same_round() -> None:
    base = _Timing("(a)", networks=2, epochs=5)  # 10 network-epochs a round
    stack = _Timing("(b) K=4", networks=4, epochs=5)  # 20
    for (b_wall, b_cpu), (s_wall, s_cpu) in [((3.0, 2.0), (2.0, 1.0)), ((6.0, 4.0), (3.0, 1.0))]:
        base.add(b_wall, b_cpu)
        stack.add(s_wall, s_cpu)
    # Per core: round 1 20/1 over 10/2 = 4x; round 2 20/1 over 10/4 = 8x. The best rounds would say 20/1 over 10/2.
    assert round_ratios(base, stack, gpu=False) == [4.0, 8.0]
    # On a GPU, wall time: 20/2 over 10/3 = 3x, 20/3 over 10/6 = 4x.
    assert round_ratios(base, stack, gpu=True) == pytest.approx([3.0, 4.0])
    assert (base.cpu, stack.cpu) == (2.0, 1.0)  # the table still shows the best round


@pytest.mark.slow
def test_a_small_run_prints_the_baseline_and_each_stack_with_its_ratio() -> None:
    args = ["--epochs", "1", "--k", "1,2", "--baseline-networks", "1", "--rounds", "2"]
    result = CliRunner().invoke(bench_train_command, args)
    assert result.exit_code == 0, result.output
    assert f"torch {torch.__version__}; intra-op threads 1; device cpu" in result.output
    lines = result.output.splitlines()
    rows = {line.split("  ")[0]: line.split() for line in lines if line.startswith("(")}
    assert list(rows) == ["(a) one at a time, nn.GRU", "(b) batched K=1", "(b) batched K=2"]
    assert rows["(a) one at a time, nn.GRU"][-3] == "1.00"  # the baseline's ratio to itself
    for cells in rows.values():
        assert float(cells[-4]) > 0  # network-epochs per second per core
    summary = [line for line in lines if line.startswith("per-round x (a), ")]
    assert [line.split(", ")[1].split(":")[0] for line in summary] == ["(b) batched K=1", "(b) batched K=2"]
    assert all(line.endswith("over 2 rounds") for line in summary)
