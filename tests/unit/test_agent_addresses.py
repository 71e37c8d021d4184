"""The pure part of the address watcher: which rtnetlink routes count as a vNIC's workload IPs."""

from __future__ import annotations

from omniwall.agent.addresses import host_routes_by_ifname


def test_pure_filter_ignores_other_tables_and_link_local() -> None:
    links = [{"index": 3, "ifname": "vn0"}]
    routes = [
        {"oif": 3, "dst": "10.0.0.1", "dst_len": 32, "table": 254, "type": 1},
        {"oif": 3, "dst": "10.0.0.2", "dst_len": 32, "table": 255, "type": 2},  # local table
        {"oif": 3, "dst": "fe80::1", "dst_len": 128, "table": 254, "type": 1},
        {"oif": 4, "dst": "10.0.0.3", "dst_len": 32, "table": 254, "type": 1},  # unknown ifindex
    ]
    assert host_routes_by_ifname(links, routes, ["vn0"]) == {"vn0": ["10.0.0.1"]}


def test_both_families_sorted_v4_first() -> None:
    links = [{"index": 3, "ifname": "vn0"}]
    routes = [
        {"oif": 3, "dst": "fd00::2", "dst_len": 128, "table": 254, "type": 1},
        {"oif": 3, "dst": "10.0.0.10", "dst_len": 32, "table": 254, "type": 1},
        {"oif": 3, "dst": "10.0.0.9", "dst_len": 32, "table": 254, "type": 1},
        {"oif": 3, "dst": "10.0.1.0", "dst_len": 24, "table": 254, "type": 1},  # a prefix: not a workload
    ]
    assert host_routes_by_ifname(links, routes, ["vn0", "vn1"]) == {
        "vn0": ["10.0.0.9", "10.0.0.10", "fd00::2"]
    }
