"""`mlds bench leases` end to end on a small campaign: a real server process, real client processes, a table.

The figures themselves are the benchmark's business (they depend on the machine); this checks that the
harness measures what it says: leases really granted over HTTP in the window, the server's memory
reported, and the table printed with each K's ratios.
"""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from mlds_operator.bench.command import bench_command
from mlds_operator.bench.leases import format_result, run_bench

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_bench_leases_grants_over_http_and_reports_memory() -> None:
    result = run_bench(
        units=20_000, ks=(1, 4), clients=1, connections=4, seconds=0.5, warmup=0.2, baseline_seconds=0.05
    )
    assert [row.k for row in result.rows] == [1, 4]
    for row in result.rows:
        assert row.http > 0
        assert row.book > 0
        assert row.service > 0
        assert row.other == {}  # every answer in the window was a grant
        assert 0 < row.p50_ms <= row.p99_ms
    assert result.report.units == 20_000
    assert 0 < result.report.rss_start <= result.report.rss_open <= result.rss_peak
    granted = sum(round(row.http * result.seconds) for row in result.rows)
    assert result.live_leases >= granted  # the grants counted are leases the server holds

    table = format_result(result)
    assert "server RSS:" in table
    assert "HTTP/book" in table
    assert table.count("\n  1 ") == 1
    assert table.count("\n  4 ") == 1


def test_bench_lists_its_benchmarks_without_importing_them() -> None:
    out = CliRunner().invoke(bench_command, ["--help"])
    assert out.exit_code == 0, out.output
    assert "leases" in out.output
    bad = CliRunner().invoke(bench_command, ["leases", "--k", "0"])
    assert bad.exit_code == 2
    assert "between 1 and 4096" in bad.output
