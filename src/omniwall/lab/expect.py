"""What the policy says each probe should do: the sim's verdict for the same connection.

The catalog is compiled (`compile_catalog`) and every probe becomes a `Packet` from the source
workload's address to the destination's, judged as a whole exchange by `judge_connection` (request and
reply), exactly what the probe observes. `lab matrix --expect` prints both and fails on disagreement.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from omniwall.lab.probe import Probe
from omniwall.model.catalog import Catalog

EPHEMERAL_SPORT = 40000  # rules match destination ports only; any source port gives the same verdict


def expected(catalog: Catalog, probes: Sequence[Probe]) -> list[bool]:
    from omniwall.compiler.build import compile_catalog
    from omniwall.sim.evaluate import Network, judge_connection
    from omniwall.sim.packet import Packet

    states = Network(compile_catalog(catalog))  # built once for every probe
    out = []
    for p in probes:
        v6 = ipaddress.ip_address(p.addr).version == 6
        if p.proto in ("icmp", "icmpv6"):
            pkt = Packet(p.src_addr, p.addr, "icmpv6" if v6 else "icmp")
        else:
            pkt = Packet(p.src_addr, p.addr, p.proto, sport=EPHEMERAL_SPORT, dport=p.port or 0)
        out.append(judge_connection(states, pkt).allowed)
    return out
