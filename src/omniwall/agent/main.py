"""The agent process: wires the feed, the reconciler, the reporter and the address watcher to one backend.

Lifecycle:
- start: adopt the kernel state (`backend.realized()`), report its revision, resume the feed from it.
  Nothing is written before the manager has spoken (Felix restart doctrine).
- connected: every snapshot/delta goes through the reconciler; each realized revision is acked.
- manager away: reconnect with jittered backoff, to the next manager of the list (agent/managers.py);
  the kernel keeps the last realized state meanwhile (fail-static), and the feed resumes from the
  desired revision, so a manager that holds the same state causes no kernel write at all.
- SIGTERM/SIGINT: stop the loops and exit; the kernel state stays (a stopped agent must not open the
  firewall, and the next one adopts it).

Everything runs on one asyncio loop and the backend is called synchronously from it: its writes are short
transactions, and one thread means the reconciler needs no locks. Many `Agent`s can share one loop (the
fan-out benchmark runs 1,000 with sim backends).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

from omniwall import sdnotify
from omniwall.agent.addresses import AddressWatcher
from omniwall.agent.commands import post_result, run_command
from omniwall.agent.conntrack_usage import ConntrackUsage, ConntrackUsageReader
from omniwall.agent.feed import Backoff, Delta, FeedError, FeedRejected, Opened, Snapshot, read_feed
from omniwall.agent.flows import FlowCollector
from omniwall.agent.guard import Guard
from omniwall.agent.managers import Managers
from omniwall.agent.metrics import AgentMetrics
from omniwall.agent.reconciler import Outcome, Reconciler
from omniwall.agent.reporter import Addresses, Reporter
from omniwall.dataplane.backend import Backend
from omniwall.stream.wire import Command
from omniwall.tls import ReloadingContext

log = logging.getLogger("omniwall.agent")

DEFAULT_STATE_DIR = Path("/var/lib/omniwall/agent")
AGENT_KEEPALIVE = 60.0  # below the manager's 90 s (api/server.py), so the agent closes idle ones first


def agent_limits() -> httpx.Limits:
    """Keep the status connection open between acks: httpx's default 5 s expiry meant a new TCP (TLS)
    connection for nearly every ack, which cost the manager more than the ack itself."""
    return httpx.Limits(max_connections=10, max_keepalive_connections=4, keepalive_expiry=AGENT_KEEPALIVE)


class Agent:
    def __init__(
        self,
        manager_url: str | Sequence[str],
        host: str,
        token: str,
        backend: Backend,
        *,
        netns: str | None = None,
        client: httpx.AsyncClient | None = None,
        watch_addresses: bool = True,
        counters_interval: float = 5.0,
        idle_timeout: float = 60.0,
        backoff: Backoff | None = None,
        guard: Guard | None = None,
        tls: ReloadingContext | None = None,
        flows: FlowCollector | None = None,
        metrics: AgentMetrics | None = None,
    ) -> None:
        self.managers = Managers(manager_url, host)  # one URL or a list (failover)
        self.tls = tls  # https: CA + this host's certificate, re-read on reconnect / SIGHUP
        self.host = host
        self.token = token
        self.backend = backend
        self.netns = netns
        self.idle_timeout = idle_timeout
        self.backoff = backoff or Backoff()
        self.reconciler = Reconciler(backend, host, guard)
        self._own_client = client is None
        self.client = client or httpx.AsyncClient(
            limits=agent_limits(), verify=tls.context if tls is not None else True
        )
        self.reporter = Reporter(
            self.client,
            lambda: self.managers.current,
            host,
            token,
            counters_source=backend.counters if backend.capabilities.counters else None,
            counters_interval=counters_interval,
            conntrack_source=self._conntrack_usage,
            ssl_context=tls.context if tls is not None else None,
        )
        self.watcher = (
            AddressWatcher(self._vnic_names, self._on_addresses, netns=netns) if watch_addresses else None
        )
        self._conntrack = ConntrackUsageReader(netns)
        self.connected = asyncio.Event()  # set while a feed connection delivers messages
        self.connects = 0  # successful connections (tests, bench)
        self._want_snapshot = False
        self._retry = asyncio.Event()
        self._stop = asyncio.Event()
        self._posts: set[asyncio.Task[None]] = set()  # command results on their way
        # flow records (agent/flows.py) and /metrics (agent/metrics.py): both optional
        self.flows = flows
        self.metrics = metrics
        if flows is not None and metrics is not None:
            metrics.watch_dropped(lambda: flows.dropped)
            flows.on_records = metrics.on_records
        self._seen_state: object = None

    # ---- public
    async def run(self) -> None:
        """Run until `stop()`. Never tears the data plane down."""
        adopted = self.reconciler.adopt()
        if adopted is not None:
            log.info("adopted realized state at revision %d (%d vNICs)", adopted.revision, len(adopted.vnics))
        self.reporter.set_realized(self.reconciler.realized_revision, None)
        self._realized_changed()
        # systemd (Type=notify): up once the kernel state is adopted, before the manager answers; an
        # agent waiting for its manager is a healthy, fail-static agent
        sdnotify.ready(f"realized revision {self.reconciler.realized_revision}")
        if self.flows is not None:
            try:
                self.flows.start()
            except OSError as e:  # e.g. another process holds the NFLOG group: enforce without records
                log.error("flow records off: cannot read the kernel's flow logs (%s)", e)
                self.flows.close()
                self.flows = None
        tasks = [
            asyncio.create_task(self._feed_loop(), name="feed"),
            asyncio.create_task(self._retry_loop(), name="retry"),
            asyncio.create_task(self.reporter.run(), name="reporter"),
        ]
        if self.watcher is not None:
            tasks.append(asyncio.create_task(self._watch_addresses(), name="addresses"))
        if self.flows is not None:
            tasks.append(
                asyncio.create_task(
                    self.flows.run(self.client, lambda: self.managers.current, self.token), name="flows"
                )
            )
        stop = asyncio.create_task(self._stop.wait())
        try:
            done, _ = await asyncio.wait([stop, *tasks], return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                if t is stop:
                    continue
                err = None if t.cancelled() else t.exception()
                if err is not None:
                    raise err
                raise RuntimeError(f"agent loop {t.get_name()!r} ended unexpectedly")
        finally:
            for t in (stop, *tasks):
                t.cancel()
            await asyncio.gather(stop, *tasks, return_exceptions=True)
            await self.reporter.aclose()
            if self.flows is not None:
                self.flows.close()
            if self._own_client:
                await self.client.aclose()
            self._conntrack.close()

    def stop(self) -> None:
        self._stop.set()

    @property
    def manager_url(self) -> str:
        """The manager this agent talks to now."""
        return self.managers.current

    def _conntrack_usage(self) -> ConntrackUsage | None:
        return self._conntrack.read()

    # ---- loops
    async def _feed_loop(self) -> None:
        while True:
            from_revision = 0 if self._want_snapshot else self.reconciler.resume_revision
            if self.tls is not None:
                self.tls.reload_if_changed()  # a rotated certificate is used from this connection on
            try:
                url = self.managers.current
                ctx = self.tls.context if self.tls is not None else None
                feed = read_feed(url, self.host, self.token, from_revision, self.idle_timeout, ctx)
                # aclosing: leaving the loop early (resync) must close the HTTP stream now, not at GC time
                async with contextlib.aclosing(feed) as messages:
                    async for msg in messages:
                        if isinstance(msg, Opened):
                            self.reporter.use_stream(msg.status_stream)
                        if not self.connected.is_set():
                            self.connected.set()
                            self.connects += 1
                            self.backoff.reset()
                            self.reporter.resend()  # this manager may not know our realized revision
                            log.info("feed connected to %s (from=%d)", url, from_revision)
                        if isinstance(msg, Snapshot):
                            self._want_snapshot = False
                            self._desired(msg.state.revision)
                            t0 = time.perf_counter()
                            outcome = self.reconciler.on_snapshot(msg.state)
                            self._timed("snapshot", t0, outcome)
                            self._after(outcome)
                        elif isinstance(msg, Delta):
                            self._desired(msg.delta.to_revision)
                            t0 = time.perf_counter()
                            outcome = self.reconciler.on_delta(msg.delta)
                            self._timed("delta", t0, outcome)
                            if outcome.kind == "resync":
                                self._want_snapshot = True
                                break  # reconnect at once with from=0
                            self._after(outcome)
                        elif isinstance(msg, Command):
                            self._command(msg)
                if self._want_snapshot:
                    self.connected.clear()
                    if from_revision != 0:
                        continue  # at once; a manager that sends gaps even after from=0 gets the backoff
                    await asyncio.sleep(self.backoff.next())
                    continue
            except FeedRejected as e:
                log.error("%s: %s", url, e)
            except FeedError as e:
                log.warning(
                    "%s: %s; keeping the realized state (revision %d)",
                    url,
                    e,
                    self.reconciler.realized_revision,
                )
            self.connected.clear()
            # the next manager of the list (managers on one etcd are interchangeable); the backoff still
            # grows per failed attempt, so a fleet that lost its manager does not stampede the others
            self.managers.failover()
            await asyncio.sleep(self.backoff.next())

    async def _retry_loop(self) -> None:
        backoff = Backoff(base=1.0, cap=30.0)
        while True:
            await self._retry.wait()
            await asyncio.sleep(backoff.next())
            outcome = self.reconciler.retry()
            self._report(outcome)
            if self.reconciler.in_sync:
                self._retry.clear()
                backoff.reset()

    async def _watch_addresses(self) -> None:
        assert self.watcher is not None
        backoff = Backoff(base=1.0, cap=60.0)
        while True:
            try:
                await self.watcher.run()
            except Exception as e:  # netlink trouble must not take enforcement down with it
                log.warning("address watcher failed (%s: %s); restarting it", type(e).__name__, e)
            await asyncio.sleep(backoff.next())

    # ---- helpers
    def _after(self, outcome: Outcome) -> None:
        self._report(outcome)
        if not self.reconciler.in_sync:
            self._retry.set()
        elif outcome.wrote and self.watcher is not None:
            self.watcher.poke()  # the vNIC list may have changed

    def _command(self, cmd: Command) -> None:
        """Run a feed command now (in order with the deltas); answer in the background."""
        state = self.reconciler.realized or self.reconciler.desired
        result = run_command(self.backend, state, cmd.op, cmd.args)
        task = asyncio.create_task(
            post_result(self.client, self.managers.current, self.host, self.token, cmd.id, result)
        )
        self._posts.add(task)
        task.add_done_callback(self._posts.discard)

    def _report(self, outcome: Outcome) -> None:
        self.reporter.set_realized(outcome.realized_revision, self.reconciler.error)
        self._realized_changed()

    def _desired(self, revision: int) -> None:
        if self.metrics is not None:
            self.metrics.desired(revision)

    def _timed(self, kind: str, t0: float, outcome: Outcome) -> None:
        if self.metrics is not None and outcome.kind in ("applied", "synced", "failed"):
            self.metrics.apply_seconds.labels(kind).observe(time.perf_counter() - t0)
            if outcome.kind == "failed":
                self.metrics.apply_failures.inc()

    def _realized_changed(self) -> None:
        """Names for the flow records and gauges follow the realized state (not the desired one: the
        kernel logs what it holds)."""
        state = self.reconciler.realized
        if state is self._seen_state:
            return
        self._seen_state = state
        if state is not None and self.flows is not None:
            self.flows.set_state(state)
        if self.metrics is not None:
            self.metrics.realized(state)

    def _vnic_names(self) -> list[str]:
        state = self.reconciler.desired or self.reconciler.realized
        return [v.ifname for v in state.vnics] if state is not None else []

    def _on_addresses(self, addresses: Addresses) -> None:
        self.reporter.set_addresses(addresses)


def make_backend(
    kind: str, host: str, netns: str | None, state_dir: Path | None, *, flows: bool = True
) -> Backend:
    """`nft`: the kernel (H5's NftBackend, in `netns`); `memory` (alias `sim`): in memory, persisted
    under `state_dir`.
    `flows`: the kernel logs every hop verdict for flow records (nft only)."""
    if kind in ("memory", "sim"):
        from omniwall.dataplane.memory_backend import MemoryBackend

        state_file = state_dir / f"sim-{host}.json" if state_dir is not None else None
        if state_file is not None:
            state_file.parent.mkdir(parents=True, exist_ok=True)
        return MemoryBackend(host=host, state_file=state_file)
    if kind == "nft":
        from omniwall.dataplane.nft.backend import NftBackend
        from omniwall.dataplane.nft.render import DEFAULT_FLOW_GROUP

        # No --netns means "this host": the one case where programming the agent's own namespace is the
        # point (the backend refuses it otherwise, to protect test machines).
        return NftBackend(
            netns=netns,
            allow_initial_netns=netns is None,
            flow_group=DEFAULT_FLOW_GROUP if flows else None,
        )
    raise ValueError(f"backend: unknown kind {kind!r} (expected nft, memory or sim)")


async def run_agent_async(agent: Agent) -> None:
    """Run `agent` until SIGTERM/SIGINT (when on the main thread) or `agent.stop()`.

    Plain `signal.signal` rather than `loop.add_signal_handler`: the latter routes signals through a
    wake-up fd that forked children inherit, so a library that forks a helper and SIGTERMs it (pyroute2
    does, for namespaces) would stop the agent. Here a signal only counts in this very process."""
    loop = asyncio.get_running_loop()
    pid = os.getpid()

    def on_signal(signum: int, frame: object) -> None:
        if os.getpid() == pid:
            loop.call_soon_threadsafe(agent.stop)

    previous = {}

    def on_hup(signum: int, frame: object) -> None:
        if os.getpid() == pid and agent.tls is not None:
            loop.call_soon_threadsafe(agent.tls.reload_if_changed)

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, on_signal)
        previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, on_hup)
    try:
        await agent.run()
    finally:
        sdnotify.stopping()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    log.info("agent stopped; the data plane keeps revision %d", agent.reconciler.realized_revision)


def run_agent(
    manager_url: str | Sequence[str],
    host: str,
    token: str,
    netns: str | None = None,
    backend: Backend | str | None = None,
    state_dir: Path | str | None = DEFAULT_STATE_DIR,
    *,
    flows: bool = True,
    metrics_address: str | None = None,
    **agent_options: object,
) -> None:
    """Blocking entry point: build the backend (default nft), run the agent until SIGTERM/SIGINT.
    `flows`: flow records (kernel backend only); `metrics_address`: serve Prometheus /metrics there."""
    sdir = Path(state_dir) if state_dir is not None else None
    be = (
        make_backend(backend or "nft", host, netns, sdir, flows=flows)
        if backend is None or isinstance(backend, str)
        else backend
    )
    agent_kwargs: dict = dict(agent_options)
    group = getattr(be, "flow_group", None)
    # the conntrack mirror (revocation's) is subscribed to DESTROY events already: flows read them there
    mirror = getattr(getattr(be, "ct", None), "mirror", None)
    collector = (
        FlowCollector(host, netns=netns, group=group, ct_feed=mirror) if flows and group is not None else None
    )
    metrics = AgentMetrics(host) if metrics_address else None
    if metrics is not None and metrics_address:
        bound = metrics.serve(metrics_address)
        log.info("metrics at http://%s:%d/metrics", *bound)

    async def main() -> None:
        await run_agent_async(
            Agent(manager_url, host, token, be, netns=netns, flows=collector, metrics=metrics, **agent_kwargs)
        )

    try:
        asyncio.run(main())
    finally:
        if metrics is not None:
            metrics.close()
        close = getattr(be, "close", None)  # releases handles only; the kernel state stays
        if callable(close):
            close()


__all__ = ["DEFAULT_STATE_DIR", "Agent", "make_backend", "run_agent", "run_agent_async"]
