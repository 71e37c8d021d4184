"""The manager's Prometheus metrics, served on their own port (`omniwall manager --metrics-address`).

Why a separate, unauthenticated listener: Prometheus scrapes `/metrics` without credentials by
convention, and the numbers here name hosts and policies (never tenants' workloads or addresses), so they
belong to the operator's network, not to the API's bearer-token world. Binding them to their own address
(loopback by default in the docs) lets the operator expose the API and keep the metrics private, and
keeps `/metrics` out of the API's route table and authorization matrix. Off unless asked for.

Every app has its own registry (several apps live in one test process). Request latency comes from an
ASGI middleware labelled by route template (bounded: the app's routes); everything else is read from
the manager and the flow service at scrape time by a collector, so nothing here is on the hot path:

    omniwall_api_request_duration_seconds{method,route,status}   histogram
    omniwall_flow_records_total{stage="offered|stored|pruned"}  counters
    omniwall_flow_records_dropped_total{place}                 manager places + agents' reported ones
    omniwall_flow_batches_refused_total{reason}
    omniwall_flow_records_pending, omniwall_flow_records_stored   gauges (queue, rows in the store)
    omniwall_flow_verdicts_total{policy,verdict}               the top POLICY_TOP policies, rest "(other)"
    omniwall_hosts_connected, omniwall_hosts
    omniwall_host_realization_lag_revisions{host}              the LAG_HOSTS hosts lagging most
    omniwall_model_revision
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from fastapi import FastAPI

POLICY_TOP = 20  # policies named in omniwall_flow_verdicts_total; the others sum into "(other)"
LAG_HOSTS = 50  # hosts named in the lag gauge (the most behind); cardinality stays bounded

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class ManagerCollector(Collector):
    def __init__(self, app: FastAPI) -> None:
        self.app = app

    def collect(self) -> Iterator[Metric]:
        m = self.app.state.manager
        svc = self.app.state.flows
        st = svc.stats()
        records = CounterMetricFamily(
            "omniwall_flow_records", "Flow records through the manager", labels=["stage"]
        )
        for stage in ("offered", "stored", "pruned"):
            records.add_metric([stage], st[stage])
        yield records
        dropped = CounterMetricFamily(
            "omniwall_flow_records_dropped",
            "Flow records lost, by place (agents' as they report)",
            labels=["place"],
        )
        places: dict[str, int] = dict(st["dropped"])
        places["watch"] = st["watchDropped"]
        for h in st["hosts"].values():
            for place, n in h["agentDropped"].items():
                key = f"agent-{place}" if not place.startswith("agent") else place
                places[key] = places.get(key, 0) + n
        for place, n in sorted(places.items()):
            dropped.add_metric([place], n)
        yield dropped
        refused = CounterMetricFamily(
            "omniwall_flow_batches_refused", "Flow batches refused whole", labels=["reason"]
        )
        for reason, n in sorted(st["refusedBatches"].items()):
            refused.add_metric([reason], n)
        yield refused
        yield GaugeMetricFamily(
            "omniwall_flow_records_pending", "Flow records queued for storage", value=st["pending"]
        )
        verdicts = CounterMetricFamily(
            "omniwall_flow_verdicts",
            "Flow records per deciding policy and verdict",
            labels=["policy", "verdict"],
        )
        counts = svc.verdict_counts()
        per_policy: dict[str, int] = {}
        for (pol, _), n in counts.items():
            per_policy[pol] = per_policy.get(pol, 0) + n
        top = set(sorted(per_policy, key=lambda k: -per_policy[k])[:POLICY_TOP])
        folded: dict[tuple[str, str], int] = {}
        for (pol, verdict), n in counts.items():
            key = (pol if pol in top else "(other)", verdict)
            folded[key] = folded.get(key, 0) + n
        for (pol, verdict), n in sorted(folded.items()):
            verdicts.add_metric([pol, verdict], n)
        yield verdicts
        statuses = m.host_statuses()
        yield GaugeMetricFamily("omniwall_hosts", "Hosts known to the manager", value=len(statuses))
        yield GaugeMetricFamily(
            "omniwall_hosts_connected",
            "Hosts with an open feed",
            value=sum(1 for s in statuses.values() if s.get("connected")),
        )
        lag = GaugeMetricFamily(
            "omniwall_host_realization_lag_revisions",
            f"Desired minus realized revision, for the {LAG_HOSTS} hosts most behind",
            labels=["host"],
        )
        lags = []
        for host, s in statuses.items():
            desired, realized = s.get("desiredRevision"), s.get("realizedRevision")
            if isinstance(desired, int):
                lags.append((desired - (realized if isinstance(realized, int) else 0), host))
        for value, host in sorted(lags, key=lambda x: (-x[0], x[1]))[:LAG_HOSTS]:
            lag.add_metric([host], value)
        yield lag
        yield GaugeMetricFamily(
            "omniwall_model_revision", "The manager's model (store) revision", value=m.revision
        )


class RequestTimer:
    """ASGI middleware: one histogram observation per HTTP request, labelled by route template."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], histogram: Histogram) -> None:
        self.app = app
        self.histogram = histogram

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = [500]

        async def sending(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "(unmatched)"
            self.histogram.labels(scope["method"], template, str(status[0])).observe(
                time.perf_counter() - start
            )


def install(app: FastAPI) -> CollectorRegistry:
    """A registry for this app with its collector, and the request timer; returns the registry."""
    registry = CollectorRegistry()
    histogram = Histogram(
        "omniwall_api_request_duration_seconds",
        "API request latency (streams: until the stream ends)",
        ["method", "route", "status"],
        registry=registry,
        buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    )
    registry.register(ManagerCollector(app))
    app.add_middleware(RequestTimer, histogram=histogram)
    app.state.metrics = registry
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)


def serve(registry: CollectorRegistry, address: str) -> Any:
    """Serve `/metrics` of `registry` on `HOST:PORT` in a background thread (prometheus_client's own
    server); returns (server, thread)."""
    from prometheus_client import start_http_server

    from .listen import parse_listen

    host, port = parse_listen(address)
    return start_http_server(port, addr=host, registry=registry)


__all__ = ["LAG_HOSTS", "POLICY_TOP", "ManagerCollector", "RequestTimer", "install", "render", "serve"]
