"""The Grafana dashboard of mlds campaigns, as typed code (grafana-foundation-sdk, STYLE.md #11).

Who calls it: :mod:`mlds_operator.artifacts.generate` renders it to ``charts/mlds/dashboards/mlds.json``, which
is checked in and shipped by the Helm chart as a ConfigMap for the Grafana sidecar. The end-to-end test
(tests/e2e/test_observability.py) evaluates every panel's query of that JSON against a real Prometheus
scraping an operator, and draws them into ``docs/dashboard.png``.

The panels are listed once, as data (:data:`ROWS`), and built into the SDK's types by :func:`build`.
Every campaign query filters on the ``namespace`` and ``campaign`` variables (multi-value, "All" by
default); the lease API panels are per operator. Only series of mlds_operator.leases.metrics are used.
The SDK is a development dependency: the operator never imports this module.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from grafana_foundation_sdk.builders import common as common_b
from grafana_foundation_sdk.builders import dashboard as dash_b
from grafana_foundation_sdk.builders import heatmap as heatmap_b
from grafana_foundation_sdk.builders import prometheus as prom_b
from grafana_foundation_sdk.builders import stat as stat_b
from grafana_foundation_sdk.builders import timeseries as ts_b
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common, dashboard
from grafana_foundation_sdk.models import prometheus as prom_m

__all__ = ["ROWS", "UID", "PanelSpec", "Target", "build", "render_dashboard_json"]

UID = "mlds-campaigns"
#: Campaign selector: both variables are multi-value regexes ("All" is ".*").
S = 'namespace=~"$namespace", campaign=~"$campaign"'
RATE = "$__rate_interval"  # Grafana picks it from the scrape interval: at least four scrapes


@dataclass(frozen=True)
class Target:
    expr: str
    legend: str = ""


@dataclass(frozen=True)
class PanelSpec:
    """One panel: what it shows (``kind``: timeseries | stat | heatmap), in which unit, from which queries."""

    title: str
    description: str
    kind: str
    unit: str
    targets: tuple[Target, ...]
    width: int = 8
    stacked: bool = False


ROWS: tuple[tuple[str, tuple[PanelSpec, ...]], ...] = (
    (
        "Campaigns",
        (
            PanelSpec(
                "Progress",
                "Share of each campaign's units that succeeded (verified results in the bucket).",
                "stat",
                "percentunit",
                (
                    Target(
                        f'sum by (namespace, campaign) (mlds_campaign_units{{{S}, state="succeeded"}})\n'
                        f"/ sum by (namespace, campaign) (mlds_campaign_units{{{S}}})",
                        "{{campaign}}",
                    ),
                ),
                width=6,
            ),
            PanelSpec(
                "Time to finish",
                "Seconds until the campaign's ETA at the recent rate (the rate window of the lease service).",
                "stat",
                "s",
                (
                    Target(
                        f"max by (namespace, campaign) (mlds_campaign_eta_timestamp_seconds{{{S}}}) - time()",
                        "{{campaign}}",
                    ),
                ),
                width=6,
            ),
            PanelSpec(
                "Units by state",
                "Pending, leased, succeeded and failed units (stacked: the campaign's size).",
                "timeseries",
                "short",
                (Target(f"sum by (state) (mlds_campaign_units{{{S}}})", "{{state}}"),),
                width=12,
                stacked=True,
            ),
            PanelSpec(
                "Since the last verified result",
                "Seconds since each campaign's last verified result; MldsCampaignStalled fires past its threshold.",
                "timeseries",
                "s",
                (
                    Target(
                        f"time() - max by (namespace, campaign) (mlds_campaign_last_verified_timestamp_seconds{{{S}}})",
                        "{{campaign}}",
                    ),
                ),
                width=12,
            ),
            PanelSpec(
                "Phase",
                "The campaign's phase (1 = current).",
                "timeseries",
                "short",
                (Target(f"max by (phase) (mlds_campaign_phase{{{S}}}) > 0", "{{phase}}"),),
                width=12,
            ),
        ),
    ),
    (
        "Throughput",
        (
            PanelSpec(
                "Stack occupancy by pool",
                "Live networks / slots of the pool's continuous stacks (issue 14): below 1 while units are "
                "pending means slots wait for refills; the tail of a campaign empties them by design.",
                "timeseries",
                "percentunit",
                (
                    Target(
                        f"sum by (pool, accelerator) (mlds_campaign_stack_live{{{S}}})\n"
                        f"/ sum by (pool, accelerator) (mlds_campaign_stack_slots{{{S}}})",
                        "{{pool}} ({{accelerator}})",
                    ),
                    Target(
                        f"avg by (pool, accelerator) (mlds_campaign_stack_occupancy_mean{{{S}}})",
                        "{{pool}} mean",
                    ),
                ),
                width=12,
            ),
            PanelSpec(
                "Networks per hour by pool and accelerator",
                "Verified networks per hour, from the verified-results counter.",
                "timeseries",
                "short",
                (
                    Target(
                        f"3600 * sum by (pool, accelerator) (rate(mlds_results_verified_total{{{S}}}[{RATE}]))",
                        "{{pool}} ({{accelerator}})",
                    ),
                ),
                stacked=True,
            ),
            PanelSpec(
                "Workers connected",
                "Workers that talked to the lease API in the last 5 minutes, per pool.",
                "timeseries",
                "short",
                (Target(f"sum by (pool, accelerator) (mlds_campaign_workers{{{S}}})", "{{pool}} ({{accelerator}})"),),
            ),
            PanelSpec(
                "Result uploads",
                "Bytes per second of verified result files published to the bucket.",
                "timeseries",
                "Bps",
                (Target(f"sum by (pool) (rate(mlds_uploaded_bytes_total{{{S}}}[{RATE}]))", "{{pool}}"),),
            ),
        ),
    ),
    (
        "Lease health",
        (
            PanelSpec(
                "Lease expiries and re-issues",
                "Leases that ran out (workers died or were too slow) and units granted again after a lost attempt.",
                "timeseries",
                "ops",
                (
                    Target(f"sum by (pool) (rate(mlds_leases_expired_total{{{S}}}[{RATE}]))", "expired {{pool}}"),
                    Target(f"sum by (pool) (rate(mlds_units_reissued_total{{{S}}}[{RATE}]))", "re-issued {{pool}}"),
                ),
                width=12,
            ),
            PanelSpec(
                "Leases granted and extended",
                "Lease grants and heartbeats per second.",
                "timeseries",
                "ops",
                (
                    Target(f"sum by (pool) (rate(mlds_leases_granted_total{{{S}}}[{RATE}]))", "granted {{pool}}"),
                    Target(f"sum by (pool) (rate(mlds_leases_extended_total{{{S}}}[{RATE}]))", "extended {{pool}}"),
                ),
                width=12,
            ),
        ),
    ),
    (
        "Failures",
        (
            PanelSpec(
                "Failed attempts by reason",
                "Attempts that ended without a result: error (the worker said so), unconverged (epoch cap), expired.",
                "timeseries",
                "ops",
                (Target(f"sum by (reason) (rate(mlds_attempts_failed_total{{{S}}}[{RATE}]))", "{{reason}}"),),
            ),
            PanelSpec(
                "Rejected results by reason",
                "Completions refused by verification in storage (missing file, size or sha256 mismatch, bad meta).",
                "timeseries",
                "ops",
                (Target(f"sum by (reason) (rate(mlds_results_rejected_total{{{S}}}[{RATE}]))", "{{reason}}"),),
            ),
            PanelSpec(
                "Failure share by pool",
                "Failed attempts / all attempts that ended, per pool; MldsPoolFailureRateHigh compares the pools.",
                "timeseries",
                "percentunit",
                (
                    Target(
                        f"sum by (pool) (rate(mlds_attempts_failed_total{{{S}}}[{RATE}]))\n"
                        f"/ (sum by (pool) (rate(mlds_attempts_failed_total{{{S}}}[{RATE}]))"
                        f" + sum by (pool) (rate(mlds_results_verified_total{{{S}}}[{RATE}])))",
                        "{{pool}}",
                    ),
                ),
            ),
        ),
    ),
    (
        "Training",
        (
            PanelSpec(
                "Training time per network",
                "Distribution of the seconds a worker trained each verified network (as reported by the worker).",
                "heatmap",
                "s",
                (
                    Target(
                        f"sum by (le) (increase(mlds_network_training_seconds_bucket{{{S}}}[{RATE}]))",
                        "{{le}}",
                    ),
                ),
            ),
            PanelSpec(
                "Training time quantiles",
                "Median and 90th percentile of the training seconds per network, per pool.",
                "timeseries",
                "s",
                (
                    Target(
                        "histogram_quantile(0.5, sum by (le, pool) "
                        f"(rate(mlds_network_training_seconds_bucket{{{S}}}[{RATE}])))",
                        "p50 {{pool}}",
                    ),
                    Target(
                        "histogram_quantile(0.9, sum by (le, pool) "
                        f"(rate(mlds_network_training_seconds_bucket{{{S}}}[{RATE}])))",
                        "p90 {{pool}}",
                    ),
                ),
            ),
            PanelSpec(
                "Epochs per network",
                "Mean epochs per verified network, per pool.",
                "timeseries",
                "short",
                (
                    Target(
                        f"sum by (pool) (rate(mlds_network_epochs_sum{{{S}}}[{RATE}]))\n"
                        f"/ sum by (pool) (rate(mlds_network_epochs_count{{{S}}}[{RATE}]))",
                        "{{pool}}",
                    ),
                ),
            ),
        ),
    ),
    (
        "Lease API",
        (
            PanelSpec(
                "Lease API latency (p99)",
                "99th percentile of request seconds per route.",
                "timeseries",
                "s",
                (
                    Target(
                        "histogram_quantile(0.99, sum by (le, endpoint) "
                        f"(rate(mlds_api_request_duration_seconds_bucket[{RATE}])))",
                        "{{endpoint}}",
                    ),
                ),
            ),
            PanelSpec(
                "Lease API requests by code",
                "Requests per second by route and HTTP status.",
                "timeseries",
                "reqps",
                (
                    Target(
                        f"sum by (endpoint, code) (rate(mlds_api_request_duration_seconds_count[{RATE}]))",
                        "{{code}} {{endpoint}}",
                    ),
                ),
            ),
            PanelSpec(
                "Operator version",
                "mlds_build_info of the scraped lease servers (1 each); the legend is the version.",
                "stat",
                "short",
                (Target("max by (version) (mlds_build_info)", "{{version}}"),),
            ),
        ),
    ),
)


def _datasource() -> dashboard.DataSourceRef:
    return dashboard.DataSourceRef(type_val="prometheus", uid="${datasource}")


def _query(target: Target, ref: str, *, heatmap: bool) -> prom_b.Dataquery:
    q = prom_b.Dataquery().expr(target.expr).legend_format(target.legend).ref_id(ref).range()
    if heatmap:
        q = q.format(prom_m.PromQueryFormat.HEATMAP)
    return q.datasource(_datasource())


def _panel(spec: PanelSpec) -> dash_b.Panel | ts_b.Panel | stat_b.Panel | heatmap_b.Panel:
    panel: ts_b.Panel | stat_b.Panel | heatmap_b.Panel
    if spec.kind == "timeseries":
        panel = ts_b.Panel().line_width(1).fill_opacity(20 if spec.stacked else 5).min(0)
        if spec.stacked:
            panel = panel.stacking(common_b.StackingConfig().mode(common.StackingMode.NORMAL))
        panel = panel.legend(
            common_b.VizLegendOptions()
            .show_legend(True)
            .display_mode(common.LegendDisplayMode.LIST)
            .placement(common.LegendPlacement.BOTTOM)
        )
    elif spec.kind == "stat":
        panel = (
            stat_b.Panel()
            .graph_mode(common.BigValueGraphMode.AREA)
            .color_mode(common.BigValueColorMode.VALUE)
            .reduce_options(common_b.ReduceDataOptions().calcs(["lastNotNull"]))
        )
    elif spec.kind == "heatmap":
        panel = heatmap_b.Panel().calculate(False)
    else:
        raise ValueError(f"unknown panel kind {spec.kind!r}")
    panel = panel.title(spec.title).description(spec.description).unit(spec.unit).datasource(_datasource())
    panel = panel.span(spec.width).height(8)
    for i, target in enumerate(spec.targets):
        panel = panel.with_target(_query(target, chr(ord("A") + i), heatmap=spec.kind == "heatmap"))
    return panel


def _variable(name: str, label: str, query: str) -> dash_b.QueryVariable:
    return (
        dash_b.QueryVariable(name)
        .label(label)
        .datasource(_datasource())
        .query(query)
        .refresh(dashboard.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(dashboard.VariableSort.ALPHABETICAL_ASC)
        .multi(True)
        .include_all(True)
        .all_value(".*")
        .current(dashboard.VariableOption(selected=True, text="All", value="$__all"))
    )


def build() -> dashboard.Dashboard:
    """The dashboard as the SDK's model."""
    board = (
        dash_b.Dashboard("mlds campaigns")
        .uid(UID)
        .description("TrainingCampaign progress, throughput per pool and accelerator, lease health, failures.")
        .tags(["mlds"])
        .editable()
        .refresh("30s")
        .time("now-6h", "now")
        .timezone("browser")
        .tooltip(dashboard.DashboardCursorSync.CROSSHAIR)
        .with_variable(dash_b.DatasourceVariable("datasource").label("Data source").type("prometheus"))
        .with_variable(_variable("namespace", "Namespace", "label_values(mlds_campaign_units, namespace)"))
        .with_variable(
            _variable("campaign", "Campaign", 'label_values(mlds_campaign_units{namespace=~"$namespace"}, campaign)')
        )
    )
    for title, panels in ROWS:
        board = board.with_row(dash_b.Row(title))
        for spec in panels:
            board = board.with_panel(_panel(spec))
    return board.build()


def render_dashboard_json() -> str:
    """The dashboard's JSON as checked in under charts/mlds/dashboards/ (see mlds_operator.artifacts.generate)."""
    return json.dumps(build(), cls=JSONEncoder, indent=2, sort_keys=True) + "\n"
