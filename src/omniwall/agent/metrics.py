"""The agent's Prometheus `/metrics` (`omniwall agent --metrics-address 127.0.0.1:9464`).

One `CollectorRegistry` per agent (many agents share a process in tests and benchmarks), served by
prometheus-client's own HTTP server thread. Names follow the Prometheus conventions: `omniwall_agent_`
prefix, base units (seconds), `_total` for counters.

Label cardinality is bounded: the per-policy verdict counter keeps at most `max_policies` distinct
(tenant, policy) pairs; the rest count under `policy="(other)"`. Drop places and verdicts are small
fixed sets.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from omniwall.compiler.ir import HostDesiredState
from omniwall.flows.record import FlowRecord

OTHER = "(other)"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class _Dropped(Collector):
    """Flow records lost, by place, read from the flow collector at scrape time (its counts are the
    truth: the kernel's sequence gaps are only known to the reader)."""

    def __init__(self, source: Callable[[], dict[str, int]]) -> None:
        self.source = source

    def collect(self) -> Iterator[CounterMetricFamily]:
        m = CounterMetricFamily(
            "omniwall_agent_flow_records_dropped",
            "Flow records lost before they reached the manager, by place",
            labels=["place"],
        )
        for place, n in sorted(self.source().items()):
            m.add_metric([place], n)
        yield m


class AgentMetrics:
    def __init__(self, host: str, *, max_policies: int = 200) -> None:
        self.host = host
        self.max_policies = max_policies
        self.registry = r = CollectorRegistry()
        self.apply_seconds = Histogram(
            "omniwall_agent_apply_seconds",
            "Time to realize one feed message (snapshot or delta) in the data plane",
            ["kind"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.lag_seconds = Histogram(
            "omniwall_agent_realization_lag_seconds",
            "From a desired revision's arrival to its realization (retries included)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.realized_revision = Gauge(
            "omniwall_agent_realized_revision", "Revision the data plane holds", registry=r
        )
        self.desired_revision = Gauge(
            "omniwall_agent_desired_revision", "Latest revision received from the manager", registry=r
        )
        self.revision_lag = Gauge(
            "omniwall_agent_realization_lag_revisions", "Desired minus realized revision", registry=r
        )
        self.apply_failures = Counter(
            "omniwall_agent_apply_failures", "Data-plane writes that failed", registry=r
        )
        self.rules = Gauge("omniwall_agent_rules", "Rules realized on this host", registry=r)
        self.sets = Gauge("omniwall_agent_sets", "Address sets realized on this host", registry=r)
        self.set_elements = Gauge(
            "omniwall_agent_set_elements", "Addresses and networks in the realized sets", registry=r
        )
        self.vnics = Gauge("omniwall_agent_vnics", "vNICs realized on this host", registry=r)
        self.flow_records = Counter(
            "omniwall_agent_flow_records", "Flow records emitted, by verdict", ["verdict"], registry=r
        )
        self.verdicts = Counter(
            "omniwall_agent_verdicts",
            "Connections (allowed) and packets (otherwise) judged, by deciding policy and verdict",
            ["tenant", "policy", "verdict"],
            registry=r,
        )
        self._policies: set[tuple[str, str]] = set()
        self._dropped: _Dropped | None = None
        self._server = None
        self._pending_since: dict[int, float] = {}
        self._desired = 0

    # ---- sources
    def watch_dropped(self, source: Callable[[], dict[str, int]]) -> None:
        self._dropped = _Dropped(source)
        self.registry.register(self._dropped)

    def on_records(self, records: list[FlowRecord]) -> None:
        for rec in records:
            self.flow_records.labels(rec.verdict).inc()
            if rec.count:
                key = (rec.rule_tenant, rec.policy)
                if key not in self._policies:
                    if len(self._policies) >= self.max_policies:
                        key = (OTHER, OTHER)
                    else:
                        self._policies.add(key)
                self.verdicts.labels(key[0], key[1], rec.verdict).inc(rec.count)

    def desired(self, revision: int, now: float | None = None) -> None:
        self._desired = max(self._desired, revision)
        self.desired_revision.set(self._desired)
        self._pending_since.setdefault(revision, time.monotonic() if now is None else now)

    def realized(self, state: HostDesiredState | None, now: float | None = None) -> None:
        rev = state.revision if state is not None else 0
        self.realized_revision.set(rev)
        now = time.monotonic() if now is None else now
        for r in [r for r in self._pending_since if r <= rev]:
            self.lag_seconds.observe(max(0.0, now - self._pending_since.pop(r)))
        self.revision_lag.set(max(0, self._desired - rev))
        if state is not None:
            self.rules.set(len(state.rules))
            self.sets.set(len(state.sets))
            self.set_elements.set(sum(len(s.addresses) + len(s.cidrs) for s in state.sets))
            self.vnics.set(len(state.vnics))

    # ---- serving
    def serve(self, address: str) -> tuple[str, int]:
        """Serve `/metrics` at `address` ("host:port"; port 0: any free one); returns the bound one."""
        host, sep, port = address.rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"--metrics-address: {address!r} is not host:port")
        server, _thread = start_http_server(
            int(port), addr=host.strip("[]") or "127.0.0.1", registry=self.registry
        )
        self._server = server
        return server.server_address[0], server.server_address[1]

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


__all__ = ["AgentMetrics"]
