"""From a campaign spec to workunits: targets, unit indices, seeds and resolved hyper-parameters.

A campaign is ``len(targets) * networksPerTarget`` units. Unit ``u`` trains replica
``u % networksPerTarget`` of target ``u // networksPerTarget`` (target-major, so the K units of one
lease usually share a target and its data). Every seed derives from (campaign seed, unit, attempt) by
hashing, so a campaign is reproducible and any unit can be recomputed alone (`mlds train --unit`).

Pure and dependency-light: the lease server, the worker and the CLI all call it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from pydantic import Field

from .campaign import (
    DS1_MACHINES,
    DS2_MACHINES,
    CampaignSpec,
    Dataset,
    Images,
    Model,
    Shape,
    Variant,
)
from .errors import InvalidCampaign

__all__ = [
    "DEFAULT_SHAPE",
    "DS5_GRID",
    "InvalidCampaign",
    "Target",
    "TrainParams",
    "UnitSpec",
    "campaign_targets",
    "check_campaign",
    "derive_seed",
    "resolve_training",
    "unit_count",
    "unit_spec",
]

#: The ds1 network: 4 GRU layers, width 12, 4 linear layers (4,364 parameters).
DEFAULT_SHAPE = Shape(gru_layers=4, hidden=12, linear_layers=4)
#: ds5's default grid (docs/workloads.md §8).
DS5_GRID: tuple[Shape, ...] = tuple(
    Shape(gru_layers=g, hidden=h, linear_layers=lin) for h in (8, 12, 16, 24) for g in (2, 4) for lin in (2, 4)
)


@dataclass(frozen=True)
class Target:
    """One thing networks are trained to mimic (docs/workloads.md §1)."""

    name: str  # unique within the campaign; also the first path component of its results
    dataset: Dataset
    machine: str | None = None  # ds1, ds2, ds5
    automaton: int | None = None  # ds3
    variant: Variant | None = None  # ds4
    shape: Shape | None = None  # GRU datasets: the network shape


def _machine_names(spec: CampaignSpec) -> list[str]:
    wl = spec.workload
    if wl.dataset is Dataset.ds1:
        allowed, default = DS1_MACHINES, DS1_MACHINES
    elif wl.dataset is Dataset.ds2:
        allowed, default = DS2_MACHINES, DS2_MACHINES
    else:  # ds5: either family
        allowed, default = DS1_MACHINES + DS2_MACHINES, DS1_MACHINES
    names = list(wl.machines) if wl.machines else list(default)
    out: list[str] = []
    for name in names:
        # ds2 also accepts the ds1 spelling ("ParityMachine" means "ParityModified").
        if wl.dataset is Dataset.ds2 and name in DS1_MACHINES:
            name = name.removesuffix("Machine") + "Modified"  # noqa: PLW2901 - normalising in place
        if name not in allowed:
            raise InvalidCampaign(
                f"unknown machine {name!r} for {wl.dataset.value}; expected one of {', '.join(allowed)}"
            )
        if name in out:
            raise InvalidCampaign(f"machine {name!r} is listed twice")
        out.append(name)
    return out


def campaign_targets(spec: CampaignSpec) -> list[Target]:
    """The campaign's targets, in a fixed order. Raises :class:`InvalidCampaign`."""
    wl = spec.workload
    ds = wl.dataset
    if ds in (Dataset.ds1, Dataset.ds2):
        return [Target(m, ds, machine=m, shape=DEFAULT_SHAPE) for m in _machine_names(spec)]
    if ds is Dataset.ds3:
        return [Target(f"automaton-{k:05d}", ds, automaton=k, shape=DEFAULT_SHAPE) for k in range(wl.automata)]
    if ds is Dataset.ds4:
        variants = list(wl.variants) if wl.variants else list(Variant)
        if len(set(variants)) != len(variants):
            raise InvalidCampaign("a ds4 variant is listed twice")
        prefix = "" if wl.images is Images.digits8 else "mnist-"
        return [Target(f"{prefix}{v.value}", ds, variant=v) for v in variants]
    shapes = list(wl.shapes) if wl.shapes else list(DS5_GRID)
    if len({s.slug for s in shapes}) != len(shapes):
        raise InvalidCampaign("a ds5 shape is listed twice")
    return [Target(f"{m}-{s.slug}", ds, machine=m, shape=s) for m in _machine_names(spec) for s in shapes]


def unit_count(spec: CampaignSpec) -> int:
    return len(campaign_targets(spec)) * spec.networks_per_target


def check_campaign(spec: CampaignSpec) -> None:
    """Semantic checks the CRD schema cannot express. Raises :class:`InvalidCampaign`."""
    campaign_targets(spec)
    names = [p.name for p in spec.pools]
    if len(set(names)) != len(names):
        raise InvalidCampaign("pool names must be unique")
    if spec.workload.dataset is not Dataset.ds4 and spec.workload.variants:
        raise InvalidCampaign("workload.variants applies to ds4 only")
    if spec.workload.dataset is not Dataset.ds5 and spec.workload.shapes:
        raise InvalidCampaign("workload.shapes applies to ds5 only")
    if spec.workload.dataset in (Dataset.ds3, Dataset.ds4) and spec.workload.machines:
        raise InvalidCampaign(f"workload.machines does not apply to {spec.workload.dataset.value}")


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any parts, stable across processes, platforms and Python versions."""
    text = "/".join(str(p) for p in ("mlds", *parts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1


class TrainParams(Model):
    """Hyper-parameters with every default resolved for one target."""

    max_epochs: int = Field(description="Epoch cap.")
    target_loss: float = Field(description="Convergence threshold on evaluation MSE (GRU datasets).")
    learning_rate: float = Field(description="Optimizer learning rate.")
    batch_size: int = Field(description="Sequences (images) per step.")


def _is_hard(target: Target) -> bool:
    machine = target.machine or ""
    return (
        target.dataset in (Dataset.ds2, Dataset.ds3) or machine == "EightBitMachine" or (machine.endswith("Modified"))
    )


def resolve_training(spec: CampaignSpec, target: Target) -> TrainParams:
    t = spec.training
    if target.dataset is Dataset.ds4:
        return TrainParams(
            max_epochs=t.max_epochs or 50,
            target_loss=t.target_loss,
            learning_rate=t.learning_rate or 0.01,
            batch_size=t.batch_size or 64,
        )
    return TrainParams(
        max_epochs=t.max_epochs or (4096 if _is_hard(target) else 2048),
        target_loss=t.target_loss,
        learning_rate=t.learning_rate or 1.0e-3,
        batch_size=t.batch_size or 32,
    )


class UnitSpec(Model):
    """Everything a worker needs to train one unit: what the trainer takes, and what a lease carries."""

    campaign: str = Field(description="Campaign name.")
    dataset: Dataset = Field(description="ds1..ds5.")
    target: str = Field(description="Target name (also the results folder).")
    machine: str | None = Field(None, description="ds1/ds2/ds5 machine.")
    automaton: int | None = Field(None, description="ds3 automaton index.")
    variant: Variant | None = Field(None, description="ds4 variant.")
    images: Images = Field(Images.digits8, description="ds4 image source.")
    shape: Shape | None = Field(None, description="GRU network shape (ds1, ds2, ds3, ds5).")
    unit: int = Field(ge=0, description="Unit index within the campaign.")
    replica: int = Field(ge=0, description="Replica index within the target.")
    attempt: int = Field(ge=0, description="Attempt number, from 0; a new attempt gets new seeds.")
    campaign_seed: int = Field(description="The campaign's seed.")
    init_seed: int = Field(description="Seeds the initial weights.")
    sgd_seed: int = Field(description="Seeds the per-epoch shuffling.")
    data_seed: int = Field(description="Seeds the target's training and evaluation data.")
    training: TrainParams = Field(description="Resolved hyper-parameters.")

    @property
    def key(self) -> str:
        """Result folder under the campaign prefix: ``<target>/<replica as 5 digits>``."""
        return f"{self.target}/{self.replica:05d}"


def data_seed(campaign_seed: int, target: Target) -> int:
    """The seed of a target's data.

    ds1/ds2/ds5 data depends on the machine only, never on the campaign seed, so networks of the same
    machine see the same data across campaigns (ds1 and ds2 campaigns can be compared and combined).
    ds3 automata are generated from (campaign seed, k), and so is their data.
    """
    if target.dataset is Dataset.ds3:
        return derive_seed("data", "ds3", campaign_seed, target.automaton)
    if target.dataset is Dataset.ds4:
        return derive_seed("data", "ds4", target.name)
    return derive_seed("data", target.machine)


def unit_spec(
    spec: CampaignSpec,
    unit: int,
    attempt: int = 0,
    *,
    campaign: str = "campaign",
    targets: list[Target] | None = None,
) -> UnitSpec:
    """The unit description of unit ``unit``, attempt ``attempt``. Pass ``targets`` to avoid recomputing them."""
    targets = targets if targets is not None else campaign_targets(spec)
    total = len(targets) * spec.networks_per_target
    if not 0 <= unit < total:
        raise IndexError(f"unit {unit} is outside the campaign (0..{total - 1})")
    target = targets[unit // spec.networks_per_target]
    return UnitSpec(
        campaign=campaign,
        dataset=target.dataset,
        target=target.name,
        machine=target.machine,
        automaton=target.automaton,
        variant=target.variant,
        images=spec.workload.images,
        shape=target.shape,
        unit=unit,
        replica=unit % spec.networks_per_target,
        attempt=attempt,
        campaign_seed=spec.seed,
        init_seed=derive_seed("init", spec.seed, unit, attempt),
        sgd_seed=derive_seed("sgd", spec.seed, unit, attempt),
        data_seed=data_seed(spec.seed, target),
        training=resolve_training(spec, target),
    )
