"""Expected cost of a campaign's targets before any of its units finished (issue 14).

The campaign service hands these to its lease book (:meth:`LeaseBook.set_costs`) so that pending units
of slow targets are granted first and the campaign does not end waiting on them; from the first
finished units on, the book learns each target's cost from the campaign itself. Units: ds1 epochs of
work (epochs to converge x the dataset's cost of an epoch relative to ds1), so targets of mixed
datasets compare.

Sources: docs/workloads.md §4's reference points for ds1 (SingleDirect ~70 epochs, SingleInvert ~76,
SimpleXOR ~119, Parity ~175, EightBit ~1,300) and the reference study (docs/reference-study: ds2
epochs of SingleDirectModified ~100, SingleInvertModified ~340, SimpleXORModified ~190,
ParityModified ~1,400 in a probe, EightBitModified unfinished after 625; a ds2 epoch costs about four
ds1 epochs). Other datasets have one cost for every target (index order).
"""

from __future__ import annotations

from mlds_contract.campaign import CampaignSpec, Dataset
from mlds_contract.plan import Target, campaign_targets

__all__ = ["EPOCH_COST", "REFERENCE_EPOCHS", "reference_costs"]

#: Epochs to converge per machine (ds1 names and ds2 names), the middle of the reference points.
REFERENCE_EPOCHS: dict[str, float] = {
    "SingleDirectMachine": 70,
    "SingleInvertMachine": 76,
    "SimpleXORMachine": 119,
    "ParityMachine": 175,
    "EightBitMachine": 1300,
    "SingleDirectModified": 100,
    "SingleInvertModified": 340,
    "SimpleXORModified": 190,
    "ParityModified": 1400,
    "EightBitModified": 4000,  # not established (stopped unfinished at 625 epochs): at least EightBit's
}
#: Cost of one epoch relative to ds1 (ds2 trains on four times the sequences).
EPOCH_COST: dict[Dataset, float] = {Dataset.ds2: 4.0}


def _cost(target: Target) -> float:
    epochs = REFERENCE_EPOCHS.get(target.machine or "", 1.0)
    return epochs * EPOCH_COST.get(target.dataset, 1.0)


def reference_costs(spec: CampaignSpec, targets: list[Target] | None = None) -> list[float]:
    """One expected cost per target, in the campaign's target order (a unit of each target costs this)."""
    return [_cost(t) for t in (targets if targets is not None else campaign_targets(spec))]
