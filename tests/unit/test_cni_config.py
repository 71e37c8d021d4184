"""The CNI plugin's input checks and pure parts (docs/containers.md): every bad field is a CNI error
naming it, VERSION needs no config, the workload's name and labels come from the runtime's arguments."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from omniwall.cni import ipam
from omniwall.cni.config import CniError, args_labels, parse_env, parse_netconf, workload_name
from omniwall.cni.net import host_ifname
from omniwall.cni.plugin import run

CONF = {
    "cniVersion": "1.0.0",
    "name": "ow",
    "type": "omniwall",
    "server": "https://m:8443/",
    "tokenFile": "/t",
    "host": "h1",
    "tenant": "t1",
    "subnet": "10.9.0.0/30",
}
ENV = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "abc", "CNI_NETNS": "/run/netns/x", "CNI_IFNAME": "eth0"}


def test_version_needs_no_config() -> None:
    code, out = run({"CNI_COMMAND": "VERSION"}, "")
    assert code == 0 and out == {"cniVersion": "1.0.0", "supportedVersions": ["0.4.0", "1.0.0"]}


@pytest.mark.parametrize(
    ("change", "code", "field"),
    [
        ({"host": None}, 7, "host"),
        ({"subnet": "10.9.0.0/33"}, 7, "subnet"),
        ({"cniVersion": "0.1.0"}, 1, "cniVersion"),
        ({"timeout": 0}, 7, "timeout"),
        ({"hostNetns": "../x"}, 7, "hostNetns"),
        ({"managerNetns": "proc/1/ns/net"}, 7, "managerNetns"),
        ({"runtimeConfig": {"aliases": {"ow": "app=web"}}}, 7, "runtimeConfig.aliases"),
        ({"args": {"cni": {"labels": [{"key": "a"}]}}}, 7, "args.cni.labels[0]"),
    ],
)
def test_bad_config_names_the_field(change: dict, code: int, field: str) -> None:
    conf = {k: v for k, v in {**CONF, **change}.items() if v is not None}
    rc, out = run(ENV, json.dumps(conf))
    assert rc == 1 and out["code"] == code and field in out["msg"], out


def test_bad_environment_names_the_variable() -> None:
    for env, name in (
        ({**ENV, "CNI_COMMAND": "UP"}, "CNI_COMMAND"),
        ({**ENV, "CNI_IFNAME": "x" * 16}, "CNI_IFNAME"),
        ({**ENV, "CNI_NETNS": ""}, "CNI_NETNS"),
        ({**ENV, "CNI_ARGS": "A=1;junk"}, "CNI_ARGS"),
    ):
        with pytest.raises(CniError, match=name) as e:
            parse_env(env)
        assert e.value.code == 4
    assert run({**ENV, "CNI_COMMAND": "UP"}, "")[1]["code"] == 4


def test_labels_name_and_interface() -> None:
    conf = parse_netconf(
        json.dumps(
            {
                **CONF,
                "args": {"cni": {"labels": [{"key": "app", "value": "web"}]}},
                "runtimeConfig": {"labels": {"tier": "1"}},
            }
        )
    )
    assert conf.labels == {"app": "web", "tier": "1"} and conf.server == "https://m:8443"
    env = parse_env({**ENV, "CNI_ARGS": "K8S_POD_NAMESPACE=Shop;K8S_POD_NAME=web_1;IgnoreUnknown=1"})
    assert workload_name(env) == "shop.web-1"
    assert workload_name(parse_env({**ENV, "CNI_CONTAINERID": "0123456789abcdef"})) == "c-0123456789ab"
    name = host_ifname("abc", "eth0")
    assert name.startswith("ow") and len(name) == 12 and name == host_ifname("abc", "eth0")


def test_labels_from_podman_aliases_and_cni_args() -> None:
    """podman 4.3 passes `--network-alias` values as `runtimeConfig.aliases[<network>]` (with the
    container's short id, which is no label) and its own environment's CNI_ARGS; `--label` never."""
    conf = parse_netconf(
        json.dumps(
            {
                **CONF,
                "args": {"cni": {"labels": [{"key": "app", "value": "db"}]}},
                "runtimeConfig": {"aliases": {"ow": ["app=web", "3f346c71748c"], "other-net": ["x=y"]}},
            }
        )
    )
    assert conf.labels == {"app": "web"}
    env = parse_env({**ENV, "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAME=web1;OMNIWALL_LABELS=tier=front,zone="})
    assert args_labels(env) == {"tier": "front", "zone": ""} and workload_name(env) == "web1"
    rc, out = run({**ENV, "CNI_ARGS": "OMNIWALL_LABELS=tier"}, json.dumps(CONF))
    assert rc == 1 and out["code"] == 4 and "OMNIWALL_LABELS" in out["msg"]


def test_ipam_allocates_once_per_container_and_releases(tmp_path: Path) -> None:
    conf = parse_netconf(json.dumps(CONF))
    a = ipam.allocate(tmp_path, "ow", conf.subnet, "c1", "eth0")
    assert ipam.allocate(tmp_path, "ow", conf.subnet, "c1", "eth0") == a
    b = ipam.allocate(tmp_path, "ow", conf.subnet, "c2", "eth0")
    assert {a, b} == {"10.9.0.1", "10.9.0.2"}
    with pytest.raises(CniError, match="no free address") as e:
        ipam.allocate(tmp_path, "ow", conf.subnet, "c3", "eth0")
    assert e.value.code == 11
    assert ipam.release(tmp_path, "ow", "c1", "eth0") == a
    assert ipam.release(tmp_path, "ow", "c1", "eth0") is None
    assert ipam.allocate(tmp_path, "ow", conf.subnet, "c3", "eth0") == a


class _FakeManager:
    """The plugin's manager calls, recorded; `have` is the Workload the manager holds under the name."""

    have: dict | None = None
    deleted: list[str] = []

    def __init__(self, conf: object) -> None:
        pass

    def workload(self, name: str, tenant: str) -> dict | None:
        return self.have

    def delete(self, name: str, tenant: str) -> None:
        self.deleted.append(f"{tenant}/{name}")


def test_a_name_held_by_another_container_is_neither_taken_nor_deleted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """podman names containers: `web1` may run on two hosts of one tenant. ADD refuses a name another
    host's container holds (before any address or veth); DEL leaves a Workload of another container."""
    from omniwall.cni import plugin

    monkeypatch.setattr(plugin, "Manager", _FakeManager)
    monkeypatch.setattr(_FakeManager, "deleted", [])
    env = {**ENV, "CNI_ARGS": "K8S_POD_NAME=web1"}
    conf = json.dumps({**CONF, "dataDir": str(tmp_path)})
    other = {"spec": {"host": "h2", "attributes": {"container.id": "def"}}}
    monkeypatch.setattr(_FakeManager, "have", other)
    rc, out = run(env, conf)
    assert rc == 1 and "container def on host h2" in out["msg"], out
    assert not list(tmp_path.glob("*/*"))  # no address taken
    rc, out = run({**env, "CNI_COMMAND": "DEL"}, conf)
    assert rc == 0 and _FakeManager.deleted == []
    monkeypatch.setattr(_FakeManager, "have", {"spec": {"host": "h1", "attributes": {"container.id": "abc"}}})
    rc, out = run({**env, "CNI_COMMAND": "DEL"}, conf)
    assert rc == 0 and _FakeManager.deleted == ["t1/web1"]
