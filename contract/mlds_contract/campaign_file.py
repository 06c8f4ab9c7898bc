"""Reading a TrainingCampaign file (YAML), as strictly as the Kubernetes API server reads the resource.

Called by ``mlds run`` (:mod:`mlds_operator.run.runner`) and by the researchers' package
(:func:`mlds_data.dataset.open_source`, which accepts a campaign file as a dataset source). Here, in the
contract, so that a reader of campaign files needs neither the lease server nor ``mlds run``.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from pydantic import ValidationError

from .campaign import TrainingCampaign
from .errors import UserError
from .plan import check_campaign

__all__ = ["load_campaign"]


def load_campaign(path: Path) -> TrainingCampaign:
    """Parse and check a TrainingCampaign file, as strictly as the API server would. Raises UserError."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror}") from exc
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        # PyYAML's message spans several lines (with a caret drawing); the CLI promises one line.
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(f"{path} is not valid YAML: {problem}{where}") from exc
    campaigns = [d for d in docs if isinstance(d, dict) and d.get("kind") == "TrainingCampaign"]
    if len(campaigns) != 1:
        raise UserError(f"{path} must hold exactly one TrainingCampaign document (found {len(campaigns)})")
    doc = campaigns[0]
    doc.pop("status", None)
    try:
        # Strict, like the API server: "100" is not a number, "true" is not a boolean.
        campaign = TrainingCampaign.model_validate_json(json.dumps(doc), strict=True)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "TrainingCampaign"
        more = f" (and {exc.error_count() - 1} more problems)" if exc.error_count() > 1 else ""
        raise UserError(f"{path}: {where}: {first.get('msg')}{more}") from exc
    check_campaign(campaign.spec)
    return campaign
