"""The TrainingCampaign resource (mlds.dev/v1alpha1): spec and status.

This is the user-facing contract of DESIGN.md §3, defined once. The operator parses CR bodies into
these models, `mlds run` parses the same YAML file into them, and `mlds crd` generates the CRD's
OpenAPI schema from them. Fields are snake_case in Python and camelCase on the wire (aliases); every
field carries a description, which becomes the CRD's (and `kubectl explain`'s) documentation.

Structural checks (types, enums, bounds) live on the fields, so the CRD schema enforces them at
`kubectl apply` time. Checks that need knowledge of the workloads (does this machine exist for this
dataset?) live in :func:`mlds_contract.plan.check_campaign` and surface as a condition.
"""

from __future__ import annotations

import enum
import re
from typing import Any, Final, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

__all__ = [
    "API_GROUP",
    "API_VERSION",
    "CATEGORIES",
    "CRD_NAME",
    "DNS1123_LABEL",
    "DNS1123_SUBDOMAIN",
    "DS1_MACHINES",
    "DS2_MACHINES",
    "KIND",
    "LIST_KIND",
    "PLURAL",
    "SHORT_NAMES",
    "SINGULAR",
    "Accelerator",
    "CampaignSpec",
    "CampaignStatus",
    "Condition",
    "Dataset",
    "Images",
    "LeaseSettings",
    "Phase",
    "Pool",
    "PoolStatus",
    "Shape",
    "Storage",
    "Toleration",
    "Training",
    "TrainingCampaign",
    "UnitCounts",
    "Variant",
    "Workload",
    "campaign_phase",
]

#: A DNS-1123 label (namespaces, most Kubernetes names): what ``kubectl`` accepts, and never a path trick.
DNS1123_LABEL: Final = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
#: A DNS-1123 subdomain (a custom resource's name): dot-separated labels, at most 253 characters.
DNS1123_SUBDOMAIN: Final = re.compile(r"(?=.{1,253}\Z)[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")

# The resource's identity: what the CRD declares, the controller watches and patches, and kubectl types.
#: API group of every mlds resource (also the prefix of its labels, annotations and finalizer).
API_GROUP: Final = "mlds.dev"
#: The one served (and stored) version.
API_VERSION: Final = "v1alpha1"
KIND: Final = "TrainingCampaign"
#: Kind of a list of campaigns (what ``GET .../trainingcampaigns`` returns).
LIST_KIND: Final = f"{KIND}List"
#: URL path segment of the resource: ``/apis/mlds.dev/v1alpha1/namespaces/NS/trainingcampaigns``.
PLURAL: Final = "trainingcampaigns"
SINGULAR: Final = "trainingcampaign"
#: ``kubectl get tc``.
SHORT_NAMES: Final = ("tc",)
#: ``kubectl get mlds`` lists every mlds resource.
CATEGORIES: Final = ("mlds",)
#: The CRD's own name, ``<plural>.<group>``.
CRD_NAME: Final = f"{PLURAL}.{API_GROUP}"

#: The five ds1 machines (docs/workloads.md §2), in the spec's order.
DS1_MACHINES: tuple[str, ...] = (
    "SingleDirectMachine",
    "SingleInvertMachine",
    "SimpleXORMachine",
    "EightBitMachine",
    "ParityMachine",
)
#: The ds2 machines: the same five with the trigger (docs/workloads.md §5), e.g. ``ParityModified``.
DS2_MACHINES: tuple[str, ...] = tuple(m.removesuffix("Machine") + "Modified" for m in DS1_MACHINES)


class Model(BaseModel):
    """Base for every contract model: camelCase on the wire, snake_case in Python, no stray keys."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_enum_values=False,
        validate_default=True,
    )

    def wire(self) -> dict[str, Any]:
        """The JSON-ready camelCase dict, without unset optional fields."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class Dataset(enum.StrEnum):
    """Which MLDS dataset a campaign builds (docs/workloads.md §1)."""

    ds1 = "ds1"
    ds2 = "ds2"
    ds3 = "ds3"
    ds4 = "ds4"
    ds5 = "ds5"


class Variant(enum.StrEnum):
    """ds4 data variants: clean digits, or BadNets-style poisoning with a trigger (docs/workloads.md §7)."""

    clean = "clean"
    pixel = "pixel"
    checker = "checker"


class Images(enum.StrEnum):
    """ds4 image source: the 8x8 digits scikit-learn ships, or 28x28 MNIST IDX files."""

    digits8 = "digits8"
    mnist = "mnist"


class Accelerator(enum.StrEnum):
    """What a worker pool trains on. ROCm builds of torch report through the `cuda` device type."""

    cpu = "cpu"
    nvidia = "nvidia"
    rocm = "rocm"


class Phase(enum.StrEnum):
    """Where a campaign is in its life."""

    Pending = "Pending"
    #: Every worker Job waits for Kueue to admit it (spec.queueName / pools[].queueName).
    Queued = "Queued"
    Running = "Running"
    Suspended = "Suspended"
    Succeeded = "Succeeded"
    Failed = "Failed"


class Shape(Model):
    """A ds5 network shape: GRU depth and width, then linear depth (docs/workloads.md §8)."""

    gru_layers: int = Field(4, ge=1, le=8, description="Number of stacked GRU layers.")
    hidden: int = Field(12, ge=1, le=512, description="GRU hidden width (and linear layer width).")
    linear_layers: int = Field(
        4, ge=1, le=8, description="Number of hidden Linear+tanh layers before the output layer."
    )

    @property
    def slug(self) -> str:
        """A short stable name, used in ds5 target names: ``h12-g4-l4``."""
        return f"h{self.hidden}-g{self.gru_layers}-l{self.linear_layers}"


class Workload(Model):
    """What to train: the dataset and which of its targets."""

    dataset: Dataset = Field(description="Which MLDS dataset: ds1, ds2, ds3, ds4 or ds5.")
    machines: list[str] | None = Field(
        None,
        description=(
            "ds1, ds2, ds5: machine names (e.g. ParityMachine; ds2 also accepts ParityModified). "
            "Default: all five of the dataset. ds5 accepts ds1 and ds2 machine names."
        ),
    )
    automata: int = Field(100, ge=1, le=1_000_000, description="ds3: number of random transducers.")
    variants: list[Variant] | None = Field(
        None, description="ds4: data variants (clean, pixel, checker). Default: all three."
    )
    images: Images = Field(
        Images.digits8,
        description="ds4: digits8 (bundled 8x8 digits) or mnist (IDX files under the storage prefix).",
    )
    shapes: list[Shape] | None = Field(
        None,
        description=(
            "ds5: network shapes. Default: the spec's grid (hidden 8/12/16/24 x GRU depth 2/4 x linear depth 2/4)."
        ),
    )


class Training(Model):
    """Hyper-parameters. A field left out takes the dataset's default (docs/workloads.md §4, §7)."""

    max_epochs: int | None = Field(
        None,
        ge=1,
        le=1_000_000,
        description=(
            "Epoch cap per network. Default: 2048 (ds1 except EightBitMachine), 4096 (EightBitMachine, "
            "ds2, ds3), 50 (ds4)."
        ),
    )
    target_loss: float = Field(
        1.0e-4, gt=0, description="A GRU network is converged when its evaluation MSE is below this."
    )
    learning_rate: float | None = Field(
        None, gt=0, description="Default: 1e-3 (Adam, GRU datasets), 0.01 (SGD momentum 0.9, ds4)."
    )
    batch_size: int | None = Field(
        None, ge=1, le=65536, description="Sequences (images) per step. Default: 32 (GRU), 64 (ds4)."
    )


class Storage(Model):
    """Where results go: an S3 bucket (MinIO or any S3). Omitted in `mlds run`: a local folder."""

    endpoint: str = Field(min_length=1, description="host:port of the S3 endpoint, without scheme.")
    bucket: str = Field(min_length=3, max_length=63, description="Bucket name; created if missing.")
    prefix: str = Field(
        "",
        max_length=512,
        # Relative key parts only: no '.', '..', empty parts, backslashes or control characters.
        pattern=r"^(/?[^/\x00-\x1f\x7f\\]+)*/?$",
        description="Key prefix of this campaign's objects (default: none); no '.' or '..' parts.",
    )

    @model_validator(mode="after")
    def _prefix_parts(self) -> Self:
        if any(part in (".", "..") for part in self.prefix.strip("/").split("/")):
            raise ValueError(f"storage.prefix {self.prefix!r:.80} has a '.' or '..' part")
        return self

    secure: bool = Field(True, description="Use HTTPS to reach the endpoint.")
    region: str | None = Field(None, description="Bucket region, if the server needs one.")
    credentials_secret: str | None = Field(
        None,
        description=(
            "Name of a Secret in the campaign's namespace with keys accessKey and secretKey. "
            "`mlds run` reads AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY instead."
        ),
    )


class Toleration(Model):
    """A pod toleration, as in core/v1."""

    key: str | None = Field(None, description="Taint key to tolerate; empty matches all keys.")
    operator: str | None = Field(None, description="Exists or Equal (default Equal).")
    value: str | None = Field(None, description="Taint value to match with operator Equal.")
    effect: str | None = Field(None, description="NoSchedule, PreferNoSchedule or NoExecute.")
    toleration_seconds: int | None = Field(None, description="How long a NoExecute taint is tolerated.")


#: A Kueue LocalQueue name as a label value (DNS-1123 label).
_QUEUE_NAME = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"


class Pool(Model):
    """A group of identical worker pods, run as one Job."""

    name: str = Field(
        min_length=1,
        max_length=40,
        pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
        description="Pool name (DNS label); part of the Job's name.",
    )
    accelerator: Accelerator = Field(Accelerator.cpu, description="cpu, nvidia or rocm.")
    replicas: int = Field(1, ge=0, le=10_000, description="Worker pods in this pool (Job parallelism).")
    units_per_lease: int = Field(
        16,
        ge=1,
        le=4096,
        description=(
            "Stack width S: networks a worker trains at once as one stacked model, its slots refilled from "
            "top-up leases as members finish (1: one network at a time). The name is kept for compatibility. "
            "CPU: 32-64 is best (`mlds bench train`); GPU: set it high (e.g. 4096), the worker caps S to what "
            "fits in the device's memory."
        ),
    )
    image: str | None = Field(None, description="Worker image; default: the operator's image for the accelerator.")
    resources: dict[str, Any] | None = Field(
        None,
        description="Container resources (requests/limits) as in core/v1; GPUs are added for nvidia/rocm.",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )
    node_selector: dict[str, str] | None = Field(None, description="Node labels the worker pods require.")
    tolerations: list[Toleration] | None = Field(None, description="Tolerations of the worker pods.")
    queue_name: str | None = Field(
        None,
        min_length=1,
        max_length=63,
        pattern=_QUEUE_NAME,
        description="Kueue LocalQueue of this pool's Job; wins over the campaign's queueName (see there).",
    )


class LeaseSettings(Model):
    """How workunits are leased to workers."""

    duration_seconds: int = Field(
        600,
        ge=10,
        le=86_400,
        description="Lease length; a worker's heartbeat extends it. An expired lease is re-issued.",
    )
    max_attempts: int = Field(
        3, ge=1, le=100, description="Attempts per unit (failures, expiries, non-convergence) before it fails."
    )


class CampaignSpec(Model):
    """What a TrainingCampaign asks for."""

    workload: Workload = Field(description="The dataset and its targets.")
    networks_per_target: int = Field(ge=1, le=1_000_000, description="Converged networks wanted per target.")
    seed: int = Field(1, ge=0, le=2**62, description="Campaign seed; every unit's seeds derive from it.")
    training: Training = Field(default_factory=Training, description="Hyper-parameters.")
    storage: Storage | None = Field(None, description="Object store for results; omitted: a local folder.")
    pools: list[Pool] = Field(
        default_factory=lambda: [Pool(name="cpu")],
        min_length=1,
        description="Worker pools. `mlds run` ignores replicas and uses --workers.",
    )
    leases: LeaseSettings = Field(default_factory=LeaseSettings, description="Lease settings.")
    suspend: bool = Field(False, description="Stop granting leases and scale workers to zero.")
    queue_name: str | None = Field(
        None,
        min_length=1,
        max_length=63,
        pattern=_QUEUE_NAME,
        description=(
            "Kueue LocalQueue (in the campaign's namespace) of every pool's worker Job, unless a pool names its "
            "own. The Job gets the kueue.x-k8s.io/queue-name label and is created suspended; Kueue admits it "
            "(unsuspends it) when the queue has quota, and the operator never touches its suspend. The campaign "
            "is Queued until a Job is admitted, then Running. With suspend: true a queued pool's Job is deleted "
            "(freeing its quota) and made again, queued, on resume. Ignored by `mlds run`."
        ),
    )


class Condition(Model):
    """A metav1.Condition."""

    type: str = Field(description="Condition type, CamelCase (Ready, Progressing, Complete, Failed, ...).")
    status: str = Field(description="True, False or Unknown.")
    reason: str = Field(description="CamelCase reason for the last transition.")
    message: str = Field("", description="Human-readable details.")
    last_transition_time: str = Field(description="RFC 3339 time the status last changed.")
    observed_generation: int | None = Field(None, description="The .metadata.generation it was set for.")


class UnitCounts(Model):
    """Workunits by state."""

    total: int = Field(0, description="All units of the campaign.")
    pending: int = Field(0, description="Waiting for a lease.")
    leased: int = Field(0, description="Held by a worker.")
    succeeded: int = Field(0, description="Converged and verified in storage.")
    failed: int = Field(0, description="Gave up after maxAttempts.")


def campaign_phase(
    units: UnitCounts, *, paused: bool, finalized: bool, queued: bool = False, admitted: bool = False
) -> Phase:
    """The one rule for a campaign's phase: the CR's ``.status.phase`` and the ``mlds_campaign_phase`` metric.

    ``paused``: the campaign is suspended. ``finalized``: the manifest, README and per-target data are
    written. A campaign whose every unit succeeded or failed stays ``Running`` until it is finalized: its
    dataset is not there to pull yet, and nothing else may say ``Succeeded`` earlier. ``queued`` and
    ``admitted`` are Kueue's view, known only to the controller (it sees the Jobs): every pool waits for
    admission (``Queued``), or Kueue admitted a pool whose pods are starting (``Running``). The lease
    server's metric cannot see Kueue, so it says ``Pending`` where the CR says ``Queued``.
    """
    if units.pending == 0 and units.leased == 0:  # every unit succeeded or failed
        if finalized:
            return Phase.Succeeded if units.failed == 0 else Phase.Failed
        return Phase.Running  # writing the manifest
    if paused:
        return Phase.Suspended
    if queued:
        return Phase.Queued
    if units.succeeded or units.leased or units.failed or admitted:
        return Phase.Running
    return Phase.Pending


class PoolStatus(Model):
    """Per-pool figures."""

    name: str = Field(description="Pool name.")
    accelerator: Accelerator = Field(description="cpu, nvidia or rocm.")
    workers: int = Field(0, description="Workers seen recently (leasing or heartbeating).")
    succeeded: int = Field(0, description="Units this pool completed.")
    failed: int = Field(0, description="Unit attempts this pool failed.")


class CampaignStatus(Model):
    """What the operator observed. Aggregates and conditions only: never per-unit lists."""

    phase: Phase = Field(
        Phase.Pending, description="Pending, Queued (waiting for Kueue), Running, Suspended, Succeeded or Failed."
    )
    observed_generation: int | None = Field(None, description="Generation of the spec last reconciled.")
    units: UnitCounts = Field(default_factory=UnitCounts, description="Units by state.")
    progress: str | None = Field(None, description="succeeded/total, e.g. 30/100.")
    networks_per_hour: float | None = Field(None, description="Recent rate of verified networks.")
    eta: str | None = Field(None, description="Estimated completion time (RFC 3339).")
    pools: list[PoolStatus] | None = Field(None, description="Per-pool figures.")
    failed_units: str | None = Field(None, description="Failed unit indices as ranges, e.g. 12,40-42.")
    manifest: str | None = Field(None, description="URL of manifest.parquet once written.")
    conditions: list[Condition] | None = Field(None, description="metav1-style conditions.")


class TrainingCampaign(Model):
    """A whole TrainingCampaign manifest, as `kubectl apply` and `mlds run` read it."""

    api_version: str = Field(f"{API_GROUP}/{API_VERSION}", description="mlds.dev/v1alpha1")
    kind: str = Field(KIND, description="TrainingCampaign")
    metadata: dict[str, Any] = Field(default_factory=dict, description="Standard object metadata.")
    spec: CampaignSpec = Field(description="What the campaign asks for.")
    status: CampaignStatus | None = Field(None, description="What the operator observed.")

    @model_validator(mode="after")
    def _kubernetes_names(self) -> Self:
        # As the API server checks them: a TrainingCampaign's name is a DNS-1123 subdomain and its namespace
        # a DNS-1123 label. `mlds run` uses the name as a folder name, so "..", "../x" or "/etc" must never pass.
        for key, pattern, what in (
            ("name", DNS1123_SUBDOMAIN, "a DNS-1123 subdomain (lower-case letters, digits, '-' and '.', <= 253)"),
            ("namespace", DNS1123_LABEL, "a DNS-1123 label (lower-case letters, digits and '-', <= 63)"),
        ):
            value = self.metadata.get(key)
            if value is None:
                continue
            if not isinstance(value, str) or not pattern.fullmatch(value):
                raise ValueError(f"metadata.{key} {value!r:.80} is not {what}")
        return self

    @property
    def name(self) -> str:
        return str(self.metadata.get("name") or "campaign")
