"""`Lab`: the network-namespace lab as a Python object (tests, demos, benchmarks) and behind the CLI.

    with Lab.up(["examples/three-tier/"]) as lab:        # or a Catalog, resources, or YAML text
        assert lab.probe("tenant-a/web-1", "tenant-a/app-1", "tcp", 8080)
        lab.exec("tenant-a/web-1", ["ip", "addr"])
        for e in lab.matrix(): ...

Every lab has a unique namespace prefix (`ow` + 5 random hex digits + `-`) and a state file named after
it (or after `name=`), so parallel labs never collide and a crashed one can be removed with
`omniwall lab down --name <name>`. Teardown (leaving the `with` block, an exception, Ctrl-C, SIGTERM):
stop policy, kill the responders by PID, delete the namespaces, delete the state file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import signal
import subprocess
import threading
from collections.abc import Iterator, Sequence
from types import FrameType, TracebackType
from typing import Any

from omniwall.lab import netns, responder, state, topology
from omniwall.lab.drivers import default_driver, driver_for
from omniwall.lab.errors import LabError
from omniwall.lab.inputs import Source, catalog_from_dump, dump_catalog, load_catalog
from omniwall.lab.matrix import (
    MatrixEntry,
    Target,
    entries_of,
    matrix_probes,
    parse_targets,
    served_targets,
)
from omniwall.lab.plan import LabPlan, plan_lab
from omniwall.lab.probe import DEFAULT_TIMEOUT, Probe, ProbeResult, run_probes
from omniwall.lab.standalone import NoPolicy, PolicyDriver, Standalone
from omniwall.model.catalog import Catalog

log = logging.getLogger(__name__)


PREFIX_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,15}")


def new_prefix() -> str:
    return f"ow{secrets.token_hex(3)[:5]}-"


class Lab:
    def __init__(self, st: state.LabState, catalog: Catalog | None = None) -> None:
        self.state = st
        self._catalog = catalog
        self._old_handlers: dict[int, Any] = {}

    # ------------------------------------------------------------------------------------- lifecycle

    @classmethod
    def up(
        cls,
        source: Source,
        *,
        name: str | None = None,
        prefix: str | None = None,
        ipv6: bool | None = None,
        policy: PolicyDriver | bool | None = None,
        responders: bool = True,
    ) -> Lab:
        """Build the lab for `source`. `policy`: a driver, True (standalone, required), False (none),
        None (standalone when the compiler and nftables backend are installed). `ipv6`: None = when the
        kernel has it. Fails (and cleans up) if a lab of that name is already up."""
        catalog, files = load_catalog(source)
        prefix = prefix or new_prefix()
        name = name or prefix.rstrip("-")
        if ipv6 is None:
            ipv6 = netns.ipv6_available()
        driver: PolicyDriver
        if policy is None:
            driver = default_driver()
        elif policy is True:
            driver = Standalone()
        elif policy is False:
            driver = NoPolicy()
        else:
            driver = policy
        plan = plan_lab(catalog, prefix, ipv6=ipv6)
        if not PREFIX_RE.fullmatch(prefix):
            raise LabError(f"prefix {prefix!r}: 1-16 letters, digits, '.', '_', '-'")
        clash = netns.list_names(prefix)
        if clash:
            raise LabError(f"namespaces with prefix {prefix!r} already exist: {', '.join(clash)}")
        st = state.LabState(name=name, prefix=prefix, ipv6=ipv6, files=files, plan=plan)
        st.resources = dump_catalog(catalog)
        state.claim(st)  # refuses a second lab of the same name, before anything is built
        lab = cls(st, catalog)
        lab._trap_signals()
        try:
            topology.build(plan, ipv6=ipv6)
            st.policy = driver.mode
            state.save(st)
            driver.start(plan, catalog)
            if responders:
                lab._start_responders()
            st.status = "up"
            state.save(st)
        except BaseException:
            lab.down()
            raise
        finally:
            lab._restore_signals()
        return lab

    @classmethod
    def attach(cls, name: str) -> Lab:
        """The lab a previous `up` (maybe another process) left running under `name`."""
        return cls(state.load(name))

    @staticmethod
    def down_by_name(name: str) -> list[str]:
        """Tear down lab `name`, even half-built. Returns the namespaces deleted; [] if none was up."""
        try:
            st = state.load(name)
        except state.LabStateError:
            if not state.path_of(name).exists():
                return []
            # Unreadable state file: nothing to go on but the file itself.
            state.remove(name)
            return []
        return Lab(st).down()

    def down(self) -> list[str]:
        """Idempotent teardown: policy, responders (by PID), namespaces (also stray ones with our prefix),
        state file. Returns the namespaces deleted."""
        st = self.state
        plan = st.plan
        if plan is not None:
            with contextlib.suppress(Exception):
                driver_for(st.policy).stop(plan)
        targets: list[tuple[int, str | None]] = []
        for key, pid in sorted(st.responders.items()):
            ns = None
            if plan is not None:
                with contextlib.suppress(KeyError):
                    ns = plan.workload(key).netns
            targets.append((pid, ns))
        if st.prefix:  # also any responder of ours the state file never recorded
            recorded = {pid for pid, _ in targets}
            targets += [(pid, ns) for pid, ns in responder.find(st.prefix) if pid not in recorded]
        responder.stop_many(targets)
        st.responders.clear()
        deleted = topology.destroy(plan, st.prefix)
        state.remove(st.name)
        return deleted

    def __enter__(self) -> Lab:
        self._trap_signals()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            self.down()
        finally:
            self._restore_signals()

    def _trap_signals(self) -> None:
        """SIGTERM (and SIGHUP) become an exception, so `finally`/`__exit__` clean up as for Ctrl-C."""
        if threading.current_thread() is not threading.main_thread() or self._old_handlers:
            return

        owner = os.getpid()

        def raise_exit(signum: int, frame: FrameType | None) -> None:
            if os.getpid() != owner:
                # A forked child (pyroute2 forks helpers for namespaces and ends them with SIGTERM)
                # inherits this handler: it must just die, never run the lab's teardown.
                os._exit(128 + signum)
            raise KeyboardInterrupt(f"signal {signum}")

        for sig in (signal.SIGTERM, signal.SIGHUP):
            self._old_handlers[sig] = signal.signal(sig, raise_exit)

    def _restore_signals(self) -> None:
        for sig, old in self._old_handlers.items():
            signal.signal(sig, old)
        self._old_handlers.clear()

    def _start_responders(self) -> None:
        plan = self.plan
        specs = [
            responder.ResponderSpec(w.netns, w.key, w.ips, w.servers)
            for w in plan.workloads
            if w.servers and w.kind != "vm"  # a VM's guest starts its own responders (lab/vm.py)
        ]
        try:
            responder.start_many(specs, started=self.state.responders)
        finally:
            state.save(self.state)

    @contextlib.contextmanager
    def responder_paused(self, workload: str) -> Iterator[None]:
        """Stop `workload`'s responder for the block (its ports are free for a long-lived server, e.g. a
        migration's live connection), then start it again. The state file is re-read under its lock
        each time: the lab's hypervisor may have moved a workload meanwhile."""
        key = self.plan.workload(workload).key
        with state.locked(self.name):
            self.reload()
            w = self.plan.workload(key)
            pid = self.state.responders.pop(key, None)
            if pid is not None:
                responder.stop_many([(pid, w.netns)])
            state.save(self.state)
        try:
            yield
        finally:
            with state.locked(self.name):
                self.reload()
                w = self.plan.workload(key)
                if w.servers and w.kind != "vm":
                    spec = responder.ResponderSpec(w.netns, w.key, w.ips, w.servers)
                    try:
                        responder.start_many([spec], started=self.state.responders)
                    finally:
                        state.save(self.state)

    def move(self, workload: str, to_host: str) -> None:
        """Move a workload to another host (the lab's half of a migration, DESIGN.md §8). With
        standalone policy: the destination host is programmed first, the vNICs move, then the source
        host drops the workload's chains. (Conntrack entries are not carried: that is the migration
        feature's job, through the backends.)"""
        w = self.plan.workload(workload)
        if w.host == to_host:
            return
        self.plan.host(to_host)
        old_host = w.host
        catalog = _with_host(self.catalog, w.tenant, w.name, to_host)
        driver = driver_for(self.state.policy)
        driver.start(self.plan, catalog, hosts=[to_host])
        self.state.plan = topology.move_workload(self.plan, w.key, to_host, ipv6=self.state.ipv6)
        self._catalog = catalog
        self.state.resources = dump_catalog(catalog)
        state.save(self.state)
        driver.start(self.plan, catalog, hosts=[old_host])

    def reload(self) -> None:
        """Read the state file again: another process (the lab's hypervisor, `lab migrate`) may have
        moved a workload since."""
        self.state = state.load(self.name)
        self._catalog = None

    # ------------------------------------------------------------------------------------- lookups

    @property
    def name(self) -> str:
        return self.state.name

    @property
    def prefix(self) -> str:
        return self.state.prefix

    @property
    def plan(self) -> LabPlan:
        if self.state.plan is None:
            raise LabError(f"lab {self.name!r} has no plan (it was cut short while building)")
        return self.state.plan

    @property
    def catalog(self) -> Catalog:
        if self._catalog is None:
            self._catalog = catalog_from_dump(self.state.resources)
        return self._catalog

    def host_netns(self, host: str) -> str:
        return self.plan.host(host).netns

    def workload_netns(self, workload: str) -> str:
        return self.plan.workload(workload).netns

    def namespaces(self) -> list[str]:
        return self.plan.namespaces()

    # ------------------------------------------------------------------------------------- actions

    def exec(
        self, workload: str, argv: Sequence[str], *, capture: bool = True, timeout: float | None = 30
    ) -> subprocess.CompletedProcess[str]:
        """Run `argv` inside the workload's namespace; look at `.returncode` (never raises on failure)."""
        return netns.run(self.workload_netns(workload), argv, capture=capture, timeout=timeout)

    def exec_host(
        self, host: str, argv: Sequence[str], *, capture: bool = True, timeout: float | None = 30
    ) -> subprocess.CompletedProcess[str]:
        return netns.run(self.host_netns(host), argv, capture=capture, timeout=timeout)

    def probe_result(
        self,
        src: str,
        dst: str,
        proto: str,
        port: int | None = None,
        *,
        family: int = 4,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> ProbeResult:
        s, d = self.plan.workload(src), self.plan.workload(dst)
        src_addr, dst_addr = s.address(family), d.address(family)
        if src_addr is None or dst_addr is None:
            raise LabError(f"{s.key} or {d.key} has no IPv{family} address")
        p = Probe(s.netns, dst_addr, proto, port, s.key, d.key, src_addr, d.key)
        return run_probes([p], timeout=timeout)[0]

    def probe(
        self,
        src: str,
        dst: str,
        proto: str,
        port: int | None = None,
        *,
        family: int = 4,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> bool:
        """Does a real `proto` exchange from `src` to `dst` (port) succeed right now?"""
        return self.probe_result(src, dst, proto, port, family=family, timeout=timeout).allowed

    def matrix(
        self,
        ports: str | Sequence[Target] | None = None,
        *,
        family: int = 4,
        expect: bool = False,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> list[MatrixEntry]:
        """Probe every ordered pair of workloads (see `lab.matrix`); `expect=True` adds the policy's
        expected result to each entry (needs the compiler and the sim)."""
        targets = parse_targets(ports) if isinstance(ports, str) else ports
        probes = matrix_probes(self.plan, targets, family=family)
        results = run_probes(probes, timeout=timeout)
        expected = None
        if expect:
            from omniwall.lab.expect import expected as expected_of

            # A probe can only succeed where something answers: a responder, or the kernel for ICMP.
            served = {w.key: set(served_targets(w)) for w in self.plan.workloads}
            if self.state.policy == "managed":
                # The manager's policy now (posture reports, later applies), not the lab's files.
                from omniwall.lab.control import ManagedError, live_expected

                try:
                    verdicts = live_expected(self.prefix, probes)
                except ManagedError as e:  # the manager is down (fail-static): the lab's own record
                    log.warning("manager not asked (%s); expectation from the lab's resources", e)
                    verdicts = expected_of(self.catalog, probes)
            else:
                verdicts = expected_of(self.catalog, probes)
            expected = [
                ok and (p.proto == "icmp" or Target(p.proto, p.port) in served[p.dst])
                for p, ok in zip(probes, verdicts, strict=True)
            ]
        return entries_of(results, expected)


def _with_host(catalog: Catalog, tenant: str, name: str, host: str) -> Catalog:
    """A copy of `catalog` in which workload tenant/name runs on `host`."""
    out = Catalog.of(catalog)
    wl = out.workloads[(tenant, name)]
    out.workloads[(tenant, name)] = wl.model_copy(update={"spec": wl.spec.model_copy(update={"host": host})})
    return out


__all__ = ["Lab", "LabError", "new_prefix"]
