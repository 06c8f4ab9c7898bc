"""Issue 13's chaos must-show, small: kill -9 of ``mlds run`` and of the operator at random moments.

The driver is tests/chaos.py (``python bench/chaos.py run|operator --kills 10`` runs it at full size):
a small ds1 campaign, a harasser holding the campaign's token sending forged results and forbidden
requests beside it, the server SIGKILLed at moments drawn from a fixed seed and started again. Every
check of the must-show must hold: the campaign Succeeded, one manifest row per unit, every model's
sha256 that of its row and meta.json, no object written once rewritten, no hostile request taken, no
restart failing. Select with ``-m chaos``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.chaos import Report, chaos_operator, chaos_run

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.chaos]

KILLS = 2
UNITS = 10


def held(report: Report) -> None:
    print(report.render())  # the kill table, in the test's output
    assert report.failures() == [], report.render()
    assert len(report.kills) == KILLS
    assert report.hostile_rounds > 0
    assert report.leftovers == []


async def test_mlds_run_killed_at_random_moments_under_attack_ends_with_each_unit_once(tmp_path: Path) -> None:
    held(await chaos_run(tmp_path, kills=KILLS, units=UNITS, seed=13))


async def test_the_operator_killed_at_random_moments_under_attack_ends_with_each_unit_once(tmp_path: Path) -> None:
    held(await chaos_operator(tmp_path, kills=KILLS, units=UNITS, seed=13))
