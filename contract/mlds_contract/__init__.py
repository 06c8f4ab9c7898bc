"""The mlds contract: the TrainingCampaign resource, the unit plan and the lease wire types.

Shared by the operator, `mlds run` and the worker. Imports neither kopf nor torch, so every component
(and the CRD generator) can depend on it.
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
