"""Prometheus metrics of the lease server: the operator, and ``mlds run --metrics`` (STYLE.md #10).

Who calls it: :func:`mlds_operator.controller.command.run_operator` and
:func:`mlds_operator.run.runner.run_campaign` build one :class:`ServerMetrics` over their
:class:`~mlds_operator.leases.registry.Campaigns` and serve ``GET /metrics`` from the lease API's own aiohttp
app (so a scrape runs on the event loop that owns the lease books, which are not thread-safe). The
controller and ``mlds run`` give every campaign service they open a :class:`CampaignMetrics`
(:func:`instrument`), which the service tells what happens (it implements
:class:`~mlds_operator.leases.service.ServiceObserver`).

Two kinds of series, and why:

- **Campaign gauges** (``mlds_campaign_*``: units by state, phase, workers, ETA, last verified result)
  are computed at scrape time from each served campaign's lease book. A campaign that is deleted is no
  longer in ``Campaigns``, so its series vanish with it; nothing needs cleaning up.
- **Event counters and histograms** (leases granted, results verified, training seconds, ...) live in
  the campaign's own :class:`CampaignMetrics`, unregistered, and the same collector exports them while
  the campaign is served. They vanish with the campaign too, and restart from zero when an operator
  restart reopens it (Prometheus' ``rate()`` handles counter resets). Every pool of the campaign's spec
  has its series from the start, at zero, so ratios between pools and ``rate()`` see them before the
  first event.

Workers report their per-network figures (training seconds, epochs) in the lease protocol's completion,
so short-lived worker pods need not be scraped. Labels never carry a unit index, a lease id or a worker
id: ``namespace``, ``campaign``, ``pool``, ``accelerator`` and small fixed value sets only.
"""

from __future__ import annotations

import importlib.metadata
import platform
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING

from aiohttp import web
from mlds_contract.campaign import Phase
from mlds_contract.lease import RejectReason
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from mlds_operator.leases.registry import Campaigns
    from mlds_operator.leases.service import CampaignService

__all__ = [
    "ATTEMPT_FAILURE_REASONS",
    "METRIC_NAMES",
    "CampaignMetrics",
    "ServerMetrics",
    "bound_port",
    "instrument",
]

PREFIX = "mlds"
CAMPAIGN_LABELS = ("namespace", "campaign")
POOL_LABELS = ("namespace", "campaign", "pool", "accelerator")
#: Why an attempt ended without a result: the worker reported an error, training hit the epoch cap, the lease ran out.
ATTEMPT_FAILURE_REASONS = ("error", "unconverged", "expired")
UNIT_STATES = ("pending", "leased", "succeeded", "failed")
#: Seconds per network: a ds1 network trains in well under a second on a GPU, a ds3 one in minutes on a CPU.
TRAINING_SECONDS_BUCKETS = (0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
#: Epochs per network: powers of two up to past the default cap (2048).
EPOCH_BUCKETS = tuple(float(2**i) for i in range(14))
#: Lease API latency: a grant or heartbeat is ~1 ms; a completion reads and writes the result files.
REQUEST_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: Workers count as connected when the book heard from them this recently (LeaseBook.stats' default).
WORKER_ACTIVE_SECONDS = 300.0


def _pool_help(what: str) -> str:
    return f"{what} Labels: namespace, campaign, pool (the spec's pool name), accelerator (cpu|nvidia|rocm|unknown)."


class CampaignMetrics:
    """The event counters and histograms of one campaign (see the module docstring).

    ``accelerators`` maps the campaign's pools to their accelerator; a pool a worker names that is not
    in it is labelled ``accelerator="unknown"``.
    """

    def __init__(
        self,
        namespace: str,
        campaign: str,
        accelerators: Mapping[str, str],
        *,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.namespace, self.campaign = namespace, campaign
        self._accelerators = dict(accelerators)
        self._wall = wall
        #: Wall time of the last verified result; the opening time until the first one (stall alerts use it).
        self.last_verified = wall()
        labels = POOL_LABELS

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> Counter:
            return Counter(f"{PREFIX}_{name}", doc, (*labels, *extra), registry=None)

        self.leases_granted = counter("leases_granted", _pool_help("Leases granted to workers."))
        self.leases_extended = counter("leases_extended", _pool_help("Heartbeats that extended a lease."))
        self.leases_expired = counter(
            "leases_expired", _pool_help("Leases that ran out before their worker completed or released them.")
        )
        self.units_reissued = counter(
            "units_reissued",
            _pool_help("Units granted again after an earlier attempt ended without a result (expiry, error, cap)."),
        )
        self.results_verified = counter(
            "results_verified",
            _pool_help("Converged results verified in storage and counted (each unit once: campaign progress)."),
        )
        self.results_duplicate = counter(
            "results_duplicate", _pool_help("Completions of units that had already succeeded (dropped, not counted).")
        )
        self.results_rejected = counter(
            "results_rejected",
            _pool_help(f"Completions refused by verification. Extra label reason: {'|'.join(RejectReason)}."),
            ("reason",),
        )
        self.attempts_failed = counter(
            "attempts_failed",
            _pool_help(
                "Unit attempts that ended without a result (retried with new seeds up to maxAttempts). "
                f"Extra label reason: {'|'.join(ATTEMPT_FAILURE_REASONS)}."
            ),
            ("reason",),
        )
        self.uploaded_bytes = counter(
            "uploaded_bytes", _pool_help("Bytes of result files verified and published (converged or not).")
        )
        self.training_seconds = Histogram(
            f"{PREFIX}_network_training_seconds",
            _pool_help("Wall-clock seconds a worker spent training one verified network (reported by the worker)."),
            labels,
            buckets=TRAINING_SECONDS_BUCKETS,
            registry=None,
        )
        self.epochs = Histogram(
            f"{PREFIX}_network_epochs",
            _pool_help("Epochs one verified network trained for (reported by the worker)."),
            labels,
            buckets=EPOCH_BUCKETS,
            registry=None,
        )
        self._lock = threading.Lock()  # guards _accelerators; the metric objects lock themselves
        for pool in self._accelerators:
            self._touch(pool)

    # --------------------------------------------------------------------- ServiceObserver protocol

    def lease_granted(self, pool: str, *, units: int, reissued: int) -> None:
        self.leases_granted.labels(*self._labels(pool)).inc()
        if reissued:
            self.units_reissued.labels(*self._labels(pool)).inc(reissued)

    def lease_extended(self, pool: str) -> None:
        self.leases_extended.labels(*self._labels(pool)).inc()

    def lease_expired(self, pool: str, *, units: int, counted: bool) -> None:
        self.leases_expired.labels(*self._labels(pool)).inc()
        if counted and units:
            self.attempts_failed.labels(*self._labels(pool), "expired").inc(units)

    def attempt_failed(self, pool: str, reason: str) -> None:
        self.attempts_failed.labels(*self._labels(pool), reason).inc()

    def result_published(self, pool: str, size: int) -> None:
        self.uploaded_bytes.labels(*self._labels(pool)).inc(size)

    def result_verified(self, pool: str, *, training_seconds: float, epochs: int) -> None:
        labels = self._labels(pool)
        self.results_verified.labels(*labels).inc()
        self.training_seconds.labels(*labels).observe(training_seconds)
        self.epochs.labels(*labels).observe(epochs)
        self.last_verified = self._wall()

    def result_duplicate(self, pool: str) -> None:
        self.results_duplicate.labels(*self._labels(pool)).inc()

    def result_rejected(self, pool: str, reason: RejectReason) -> None:
        self.results_rejected.labels(*self._labels(pool), reason).inc()

    # ------------------------------------------------------------------------------------ exporting

    def accelerator(self, pool: str) -> str:
        with self._lock:
            return self._accelerators.get(pool, "unknown")

    def _labels(self, pool: str) -> tuple[str, str, str, str]:
        return (self.namespace, self.campaign, pool, self.accelerator(pool))

    def _touch(self, pool: str) -> None:
        """Create every series of ``pool`` at zero."""
        labels = self._labels(pool)
        for c in (
            self.leases_granted,
            self.leases_extended,
            self.leases_expired,
            self.units_reissued,
            self.results_verified,
            self.results_duplicate,
            self.uploaded_bytes,
        ):
            c.labels(*labels)
        for rejected in RejectReason:
            self.results_rejected.labels(*labels, rejected)
        for reason in ATTEMPT_FAILURE_REASONS:
            self.attempts_failed.labels(*labels, reason)
        self.training_seconds.labels(*labels)
        self.epochs.labels(*labels)

    def collect(self) -> Iterator[Metric]:
        for metric in (
            self.leases_granted,
            self.leases_extended,
            self.leases_expired,
            self.units_reissued,
            self.results_verified,
            self.results_duplicate,
            self.results_rejected,
            self.attempts_failed,
            self.uploaded_bytes,
            self.training_seconds,
            self.epochs,
        ):
            yield from metric.collect()


def instrument(service: CampaignService, namespace: str, accelerators: Mapping[str, str] | None = None) -> None:
    """Give a campaign service its :class:`CampaignMetrics` (pools and accelerators from its spec by default)."""
    pools = accelerators if accelerators is not None else {p.name: p.accelerator.value for p in service.spec.pools}
    service.observer = CampaignMetrics(namespace, service.name, pools, wall=service.wall)


class _CampaignCollector(Collector):
    """Scrape-time series of every served campaign: gauges from the book, the campaign's own counters."""

    def __init__(self, campaigns: Campaigns) -> None:
        self._campaigns = campaigns

    def describe(self) -> Iterable[Metric]:
        return []  # the series depend on which campaigns are served: nothing to declare up front

    def collect(self) -> Iterator[Metric]:
        units = GaugeMetricFamily(
            f"{PREFIX}_campaign_units",
            f"Units of a campaign by state. Labels: namespace, campaign, state ({'|'.join(UNIT_STATES)}).",
            labels=(*CAMPAIGN_LABELS, "state"),
        )
        phase = GaugeMetricFamily(
            f"{PREFIX}_campaign_phase",
            "1 for the campaign's current phase, 0 for the others. "
            f"Labels: namespace, campaign, phase ({'|'.join(p.value for p in Phase)}).",
            labels=(*CAMPAIGN_LABELS, "phase"),
        )
        leases = GaugeMetricFamily(
            f"{PREFIX}_campaign_leases",
            "Live leases of a campaign. Labels: namespace, campaign.",
            labels=CAMPAIGN_LABELS,
        )
        workers = GaugeMetricFamily(
            f"{PREFIX}_campaign_workers",
            _pool_help(f"Workers that talked to the lease API in the last {WORKER_ACTIVE_SECONDS:.0f} seconds."),
            labels=POOL_LABELS,
        )
        pool_units = GaugeMetricFamily(
            f"{PREFIX}_campaign_pool_units",
            _pool_help("Units of a campaign per pool. Extra label state: succeeded|leased."),
            labels=(*POOL_LABELS, "state"),
        )
        eta = GaugeMetricFamily(
            f"{PREFIX}_campaign_eta_timestamp_seconds",
            "When the campaign should finish at the recent rate (Unix time); absent until two results in the "
            "rate window and once finished. Labels: namespace, campaign.",
            labels=CAMPAIGN_LABELS,
        )
        last = GaugeMetricFamily(
            f"{PREFIX}_campaign_last_verified_timestamp_seconds",
            "Unix time of the campaign's last verified result, or of the lease server opening it when none has "
            "arrived since. Labels: namespace, campaign.",
            labels=CAMPAIGN_LABELS,
        )
        stack_live = GaugeMetricFamily(
            f"{PREFIX}_campaign_stack_live",
            _pool_help("Networks training in the pool's continuous stacks now (workers heard from recently)."),
            labels=POOL_LABELS,
        )
        stack_slots = GaugeMetricFamily(
            f"{PREFIX}_campaign_stack_slots",
            _pool_help("Slots of the pool's continuous stacks (occupancy = stack_live / stack_slots)."),
            labels=POOL_LABELS,
        )
        stack_mean = GaugeMetricFamily(
            f"{PREFIX}_campaign_stack_occupancy_mean",
            _pool_help("Mean stack occupancy over the campaign so far, time-weighted (0..1)."),
            labels=POOL_LABELS,
        )
        families: dict[str, Metric] = {}
        for (ns, name), service in sorted(self._campaigns.items(), key=lambda kv: kv[0]):
            snap = service.snapshot()
            stats = snap.stats
            key = [ns, name]
            for state in UNIT_STATES:
                units.add_metric([*key, state], float(getattr(stats, state)))
            for p in Phase:
                phase.add_metric([*key, p.value], 1.0 if snap.phase is p else 0.0)
            leases.add_metric(key, float(stats.leases))
            observer = service.observer
            accelerator = observer.accelerator if isinstance(observer, CampaignMetrics) else (lambda _: "unknown")
            leased: dict[str, int] = {}
            for view in service.book.leases():
                leased[view.pool] = leased.get(view.pool, 0) + len(view.units)
            for figures in stats.pools:
                labels = [*key, figures.name, accelerator(figures.name)]
                workers.add_metric(labels, float(figures.workers))
                pool_units.add_metric([*labels, "succeeded"], float(figures.succeeded))
                pool_units.add_metric([*labels, "leased"], float(leased.get(figures.name, 0)))
            for pool, occupancy in snap.occupancy.items():
                labels = [*key, pool, accelerator(pool)]
                stack_live.add_metric(labels, float(occupancy.live))
                stack_slots.add_metric(labels, float(occupancy.slots))
                if occupancy.mean is not None:
                    stack_mean.add_metric(labels, occupancy.mean)
            if snap.eta is not None:
                eta.add_metric(key, snap.eta.timestamp())
            if isinstance(observer, CampaignMetrics):
                last.add_metric(key, observer.last_verified)
                for metric in observer.collect():
                    _merge(families, metric)
        yield from (units, phase, leases, workers, pool_units, eta, last, stack_live, stack_slots, stack_mean)
        yield from families.values()


def _merge(families: dict[str, Metric], metric: Metric) -> None:
    """Fold one campaign's family into the family of the same name (one HELP/TYPE per name in the output)."""
    family = families.get(metric.name)
    if family is None:
        family = families[metric.name] = Metric(metric.name, metric.documentation, metric.type)
    # Drop *_created samples: the creation time of each series is noise on a dashboard and doubles the series.
    family.samples.extend(s for s in metric.samples if not s.name.endswith("_created"))


def _version() -> str:
    try:
        return importlib.metadata.version("mlds")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class ServerMetrics:
    """The metrics of one lease server: its registry, its request observer and its ``/metrics`` handler.

    One per server (not module globals), so tests can run several servers in one process.
    ``component`` is ``operator`` or ``run`` (a label of ``mlds_build_info``).
    """

    def __init__(self, campaigns: Campaigns, *, component: str = "operator") -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        build = Gauge(
            f"{PREFIX}_build_info",
            "Always 1. Labels: version (the mlds package), python (version), component (operator|run).",
            ("version", "python", "component"),
            registry=self.registry,
        )
        build.labels(_version(), platform.python_version(), component).set(1)
        self.requests = Histogram(
            f"{PREFIX}_api_request_duration_seconds",
            "Lease API request latency, by route. Labels: endpoint (the route template, e.g. "
            "/v1/campaigns/{namespace}/{name}/leases; unmatched for unknown paths), code (HTTP status).",
            ("endpoint", "code"),
            buckets=REQUEST_SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_CampaignCollector(campaigns))
        ProcessCollector(registry=self.registry)

    def observe_request(self, endpoint: str, code: int, seconds: float) -> None:
        """The lease API's :data:`~mlds_operator.leases.http.RequestObserver`."""
        self.requests.labels(endpoint, str(code)).observe(seconds)

    def exposition(self) -> bytes:
        """The registry in the Prometheus text format 0.0.4 (Prometheus 2.x reads it; all names are legacy-valid)."""
        return generate_latest(self.registry)

    async def handle(self, request: web.Request) -> web.Response:
        return web.Response(body=self.exposition(), headers={"Content-Type": CONTENT_TYPE_PLAIN_0_0_4})

    def add_route(self, app: web.Application) -> None:
        """Serve ``GET /metrics`` from ``app`` (the metrics port's application, before it starts)."""
        app.router.add_get("/metrics", self.handle)

    async def serve(self, host: str, port: int) -> web.AppRunner:
        """Serve ``GET /metrics`` alone on ``host:port``, apart from the lease API; the caller cleans up the runner.

        A port of its own: worker pods reach the lease port, and ``/metrics`` lists every campaign's
        namespace and name, so it is not served there (issue 13). Port 0 picks a free one (see
        :func:`bound_port`).
        """
        app = web.Application()
        self.add_route(app)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port, reuse_address=True).start()
        except BaseException:
            await runner.cleanup()
            raise
        return runner


def bound_port(runner: web.AppRunner) -> int:
    """The TCP port a started runner listens on."""
    port: int = runner.addresses[0][1]
    return port


#: Every metric name this module exports (counters without their ``_total`` suffix), for docs and tests.
METRIC_NAMES = (
    "mlds_build_info",
    "mlds_api_request_duration_seconds",
    "mlds_campaign_units",
    "mlds_campaign_phase",
    "mlds_campaign_leases",
    "mlds_campaign_workers",
    "mlds_campaign_pool_units",
    "mlds_campaign_stack_live",
    "mlds_campaign_stack_slots",
    "mlds_campaign_stack_occupancy_mean",
    "mlds_campaign_eta_timestamp_seconds",
    "mlds_campaign_last_verified_timestamp_seconds",
    "mlds_leases_granted",
    "mlds_leases_extended",
    "mlds_leases_expired",
    "mlds_units_reissued",
    "mlds_results_verified",
    "mlds_results_duplicate",
    "mlds_results_rejected",
    "mlds_attempts_failed",
    "mlds_uploaded_bytes",
    "mlds_network_training_seconds",
    "mlds_network_epochs",
)
