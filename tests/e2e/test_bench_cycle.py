"""`mlds bench cycle` end to end on a small campaign: a real server process, real worker processes, a table.

The figures themselves are the benchmark's business (they depend on the machine); this checks that the
harness measures what it says: results really verified and published in the window, by bundles (what the
worker sends) or file by file (workers that predate bundles), the server's CPU and store calls counted,
and the table printed.
"""

from __future__ import annotations

import pytest
from mlds_operator.bench.cycle import format_result, run_cycle

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.mark.parametrize("uploads", ["bundle", "files"])
def test_bench_cycle_verifies_results_over_http_and_reports_the_server_cost(uploads: str) -> None:
    result = run_cycle(units=20_000, k=4, bursts=(1, 4), connections=2, seconds=1.0, warmup=0.5, uploads=uploads)

    assert [row.burst for row in result.rows] == [1, 4]
    for row in result.rows:
        assert row.verified > 0
        assert row.server_cpu > 0
        assert row.errors == {}, row.errors  # every completion in the window was accepted
        assert 0 < row.p50_ms <= row.p99_ms
        assert row.calls.get("publish", 0) > 0
        read = "check_parts" if uploads == "bundle" else "check"
        assert row.calls.get(read, 0) > 0
    table = format_result(result)
    assert ("one bundle per unit" if uploads == "bundle" else "file by file") in table
    assert "results/CPU-s" in table
