"""The Grafana dashboard (mlds_operator.artifacts.dashboard): checked in as rendered, and every query asks for
series the lease server exports, filtered by the dashboard's variables.

That each query returns data from a real Prometheus is shown by tests/e2e/test_observability.py.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from mlds_operator.artifacts.dashboard import ROWS, UID, render_dashboard_json
from mlds_operator.artifacts.generate import default_root
from mlds_operator.leases.metrics import METRIC_NAMES

CHECKED_IN = default_root() / "charts" / "mlds" / "dashboards" / "mlds.json"
BOARD = json.loads(render_dashboard_json())
PANELS = [p for p in BOARD["panels"] if p["type"] != "row"]
#: What a query may append to an exported name: counters' _total, histograms' series.
_SUFFIXES = ("", "_total", "_bucket", "_sum", "_count")


def test_the_checked_in_dashboard_is_the_rendered_one() -> None:
    assert CHECKED_IN.read_text(encoding="utf-8") == render_dashboard_json(), "stale: run `make generate`"
    assert BOARD["uid"] == UID
    assert [v["name"] for v in BOARD["templating"]["list"]] == ["datasource", "namespace", "campaign"]


def test_panel_titles_are_unique_and_every_row_has_panels() -> None:
    titles = [p["title"] for p in PANELS]
    assert len(titles) == len(set(titles))
    assert all(panels for _, panels in ROWS)


@pytest.mark.parametrize("panel", PANELS, ids=[p["title"] for p in PANELS])
def test_each_query_asks_for_exported_series_of_the_selected_campaigns(panel: dict[str, Any]) -> None:
    targets = panel["targets"]
    assert targets
    exported = {name + suffix for name in METRIC_NAMES for suffix in _SUFFIXES}
    for target in targets:
        expr = target["expr"]
        names = set(re.findall(r"\bmlds_[a-z_]+\b", expr))
        assert names, f"{panel['title']}: no mlds_ series in {expr}"
        assert names <= exported, f"{panel['title']}: unknown series {sorted(names - exported)}"
        assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        campaign_series = {n for n in names if not n.startswith(("mlds_api_", "mlds_build_"))}
        for selector in re.findall(r"\{([^}]*)\}", expr) if campaign_series else ():
            assert 'namespace=~"$namespace"' in selector, expr
            assert 'campaign=~"$campaign"' in selector, expr
