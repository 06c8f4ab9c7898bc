"""The one phase rule, shared by the CR's status (reconcile) and the mlds_campaign_phase metric."""

from __future__ import annotations

import pytest
from mlds_contract.campaign import Phase, UnitCounts, campaign_phase


def counts(pending: int = 0, leased: int = 0, succeeded: int = 0, failed: int = 0) -> UnitCounts:
    total = pending + leased + succeeded + failed
    return UnitCounts(total=total, pending=pending, leased=leased, succeeded=succeeded, failed=failed)


@pytest.mark.parametrize(
    ("units", "paused", "finalized", "phase"),
    [
        pytest.param(counts(pending=4), False, False, Phase.Pending, id="nothing-leased-yet"),
        pytest.param(counts(pending=3, leased=1), False, False, Phase.Running, id="training"),
        pytest.param(counts(pending=3, failed=1), False, False, Phase.Running, id="a-failure-is-progress"),
        pytest.param(counts(pending=3, leased=1), True, False, Phase.Suspended, id="suspended"),
        pytest.param(counts(succeeded=4), False, False, Phase.Running, id="drained-manifest-being-written"),
        pytest.param(counts(succeeded=4), True, False, Phase.Running, id="drained-while-suspended-still-finishes"),
        pytest.param(counts(succeeded=4), False, True, Phase.Succeeded, id="finalized"),
        pytest.param(counts(succeeded=3, failed=1), False, True, Phase.Failed, id="finalized-with-failures"),
    ],
)
def test_the_phase_of_a_campaign(units: UnitCounts, paused: bool, finalized: bool, phase: Phase) -> None:
    assert campaign_phase(units, paused=paused, finalized=finalized) is phase
