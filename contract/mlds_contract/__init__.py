"""The mlds contract: every vocabulary the worker, the lease server, the controller and the CLI share.

- :mod:`~mlds_contract.campaign`: the TrainingCampaign resource (its identity: group, version, kind,
  plural, short names, categories), its spec and status, and the one phase rule (:func:`campaign_phase`).
- :mod:`~mlds_contract.plan`: the unit plan (targets, seeds, resolved hyper-parameters).
- :mod:`~mlds_contract.lease`: the lease API's wire types, rejection reasons included.
- :mod:`~mlds_contract.routes`: the lease API's route table (server, OpenAPI document, worker client).
- :mod:`~mlds_contract.results`: the result file names and the size bound on a result file.
- :mod:`~mlds_contract.errors`: the exception tree and the exit codes (:class:`~mlds_contract.errors.ExitCode`).
- :mod:`~mlds_contract.files`: the one campaign-file loader and checker (`mlds run`, `mlds train`,
  `mlds dataset`, `mlds validate`): file, line, field path and did-you-mean in every error.

Imports neither kopf nor torch, so every component (and the CRD generator) can depend on it.
"""

from .campaign import (
    API_GROUP,
    API_VERSION,
    DS1_MACHINES,
    DS2_MACHINES,
    KIND,
    Accelerator,
    CampaignSpec,
    CampaignStatus,
    Dataset,
    Images,
    Phase,
    Pool,
    Shape,
    TrainingCampaign,
    Variant,
    campaign_phase,
)
from .plan import InvalidCampaign, Target, TrainParams, UnitSpec, campaign_targets, check_campaign, unit_spec

__all__ = [
    "API_GROUP",
    "API_VERSION",
    "DS1_MACHINES",
    "DS2_MACHINES",
    "KIND",
    "Accelerator",
    "CampaignSpec",
    "CampaignStatus",
    "Dataset",
    "Images",
    "InvalidCampaign",
    "Phase",
    "Pool",
    "Shape",
    "Target",
    "TrainParams",
    "TrainingCampaign",
    "UnitSpec",
    "Variant",
    "campaign_phase",
    "campaign_targets",
    "check_campaign",
    "unit_spec",
]
