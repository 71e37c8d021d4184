"""The libvirt hook's pure parts (docs/vms.md): domain metadata, host configuration, the decisions
taken before any call to the manager, and the installed files. The hook against a real libvirtd and
manager: tests/kernel/test_libvirt_domains.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from omniwall.libvirt import domain, install
from omniwall.libvirt.config import ConfigError, HookConfig, from_json, load
from omniwall.libvirt.hook import run

META = (
    '<ow:workload xmlns:ow="https://omniwall.io/xmlns/libvirt/v1" tenant="shop" name="web-1">'
    '<ow:label key="tier" value="web"/><ow:attribute key="owner" value="alice"/>'
    '<ow:vnic mac="52:54:00:AA:00:01" name="eth0" ips="10.20.0.1, fd00:20::1"/></ow:workload>'
)


def xml(meta: str = META, target: str = "<target dev='vnet3'/>") -> str:
    return (
        "<domain type='qemu'><name>web</name><uuid>0b6e-1</uuid>"
        f"<metadata>{meta}</metadata><devices>"
        f"<interface type='ethernet'><mac address='52:54:00:aa:00:01'/>{target}</interface>"
        "</devices></domain>"
    )


def test_metadata_becomes_the_workload() -> None:
    d = domain.parse(xml())
    assert d.annotated and d.key == "shop/web-1" and d.missing_taps() == []
    assert d.workload_doc("hv-1") == {
        "apiVersion": "omniwall.io/v1",
        "kind": "Workload",
        "metadata": {"name": "web-1", "tenant": "shop", "labels": {"tier": "web"}},
        "spec": {
            "host": "hv-1",
            "vnics": [
                {
                    "name": "eth0",
                    "mac": "52:54:00:aa:00:01",
                    "ips": ["10.20.0.1", "fd00:20::1"],
                    "hostIfname": "vnet3",
                }
            ],
            "attributes": {"owner": "alice", "libvirt.domain": "web", "libvirt.uuid": "0b6e-1"},
        },
    }


def test_no_metadata_and_taps_not_yet_named() -> None:
    assert not domain.parse(xml(meta="")).annotated
    assert domain.parse(xml(target="")).missing_taps() == ["52:54:00:aa:00:01"]


@pytest.mark.parametrize(
    ("meta", "reason"),
    [
        (META.replace('tenant="shop" ', ""), "attribute tenant is missing"),
        (META.replace("52:54:00:AA:00:01", "52:54:00:aa:00:99"), "no <interface> with that MAC"),
        (META.replace(' mac="52:54:00:AA:00:01"', ""), "attribute mac is missing"),
        (
            META.replace('<ow:label key="tier" value="web"/>', '<ow:label value="web"/>'),
            "<ow:label> #1: attribute key",
        ),
        (META.split("<ow:vnic")[0] + "</ow:workload>", "no <ow:vnic>"),
    ],
)
def test_bad_metadata_names_the_element(meta: str, reason: str) -> None:
    with pytest.raises(domain.MetadataError, match=reason):
        domain.parse(xml(meta=meta))


def test_not_a_domain() -> None:
    with pytest.raises(domain.MetadataError, match="not <domain>"):
        domain.parse("<network/>")
    with pytest.raises(domain.MetadataError, match="domain XML"):
        domain.parse("<domain")


def cfg(tmp_path: Path, **over: object) -> HookConfig:
    d = {
        "server": "http://127.0.0.1:9",
        "tokenFile": str(tmp_path / "t"),
        "host": "hv-1",
        "log": str(tmp_path / "hook.log"),
    }
    return from_json({**d, **over})


@pytest.mark.parametrize(
    ("over", "reason"),
    [
        ({"host": ""}, "field 'host' is required"),
        ({"unannotated": "open"}, "field 'unannotated' must be one of ignore, refuse"),
        ({"tenants": "shop"}, "field 'tenants' must be a list"),
        ({"timeout": 0}, "field 'timeout' must be a positive"),
        ({"color": 1}, "unknown field 'color'"),
    ],
)
def test_bad_config_names_the_field(tmp_path: Path, over: dict[str, object], reason: str) -> None:
    with pytest.raises(ConfigError, match=reason):
        cfg(tmp_path, **over)


def test_refusals_before_any_call(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Nothing listens on the server: these decisions must not need the manager.
    assert run(cfg(tmp_path), ["web", "prepare", "begin", "-"], xml(meta="")) == 0
    assert run(cfg(tmp_path, unannotated="refuse"), ["web", "prepare", "begin", "-"], xml(meta="")) == 1
    assert "refuses unannotated domains" in capsys.readouterr().err
    assert run(cfg(tmp_path, tenants=["bank"]), ["web", "start", "begin", "-"], xml()) == 1
    assert "tenant 'shop' in the domain's metadata may not be used on host hv-1" in capsys.readouterr().err
    assert (
        run(cfg(tmp_path), ["web", "prepare", "begin", "-"], xml(meta=META.replace('tenant="shop" ', "")))
        == 1
    )
    assert run(cfg(tmp_path), ["web", "started", "begin", "-"], "not even XML") == 0  # not ours to judge
    log = (tmp_path / "hook.log").read_text()
    assert "web: prepare: no Omniwall metadata: left alone" in log
    assert "web: start: REFUSED: tenant 'shop'" in log and "attribute tenant is missing" in log


def test_manager_unreachable_fails_closed(tmp_path: Path) -> None:
    (tmp_path / "t").write_text("secret\n")
    assert run(cfg(tmp_path, timeout=0.5), ["web", "start", "begin", "-"], xml()) == 1
    assert "manager is unreachable" in (tmp_path / "hook.log").read_text()
    assert run(cfg(tmp_path, timeout=0.5), ["web", "release", "end", "-"], xml()) == 0  # gone anyway


def test_install_writes_hook_and_config(tmp_path: Path) -> None:
    c = cfg(tmp_path, tenants=["shop"])
    hook, conf = install.install(c, root=tmp_path, python="/opt/ow/bin/python")
    assert hook == tmp_path / "etc/libvirt/hooks/qemu" and os.access(hook, os.X_OK)
    assert f"/opt/ow/bin/python -m omniwall.libvirt.hook --config {conf}" in hook.read_text()
    assert conf.stat().st_mode & 0o777 == 0o600
    assert load(conf) == c and json.loads(conf.read_text())["tenants"] == ["shop"]
    install.install(c, root=tmp_path)  # ours: replaced
    hook.write_text("#!/bin/sh\nexit 0\n")
    with pytest.raises(install.InstallError, match="not Omniwall's hook"):
        install.install(c, root=tmp_path)


def test_the_example_domain_is_a_protected_workload() -> None:
    text = (Path(__file__).resolve().parents[2] / "examples/vm/libvirt-domain.xml").read_text()
    d = domain.parse(text)
    assert d.key == "shop/web-vm" and d.vnics[0].tap == "vnet-web" and d.vnics[0].ips == ("10.20.0.1",)


WORLD = """
kind: Tenant
metadata: {name: shop}
---
kind: Host
metadata: {name: hv-1}
---
kind: Host
metadata: {name: hv-2}
---
kind: Workload
metadata: {name: web-1, tenant: shop}
spec:
  host: hv-1
  vnics: [{name: eth0, mac: "52:54:00:aa:00:01", ips: [10.20.0.1], hostIfname: vnet3}]
  attributes: {libvirt.domain: web}
---
kind: Workload
metadata: {name: web-2, tenant: shop}
spec:
  host: hv-1
  vnics: [{name: eth0, mac: "52:54:00:aa:00:02", ips: [10.20.0.2], hostIfname: vnet4}]
  attributes: {libvirt.domain: web}
---
kind: Workload
metadata: {name: web-3, tenant: shop}
spec: {host: hv-1, vnics: [{name: eth0, ips: [10.20.0.3]}]}
"""


def test_migration_and_release_against_a_manager(tmp_path: Path) -> None:
    """A real manager on loopback (no agents: the migration stays in `prepare`, which is all the hook
    needs to see): `migrate` on the destination starts the manager's migration; `release` on the source
    keeps a workload that is leaving, and removes one that is not."""
    from apihelpers import seeded_manager, serving

    from omniwall.api.app import create_app
    from omniwall.store.memory import MemoryStore

    m = seeded_manager(MemoryStore(), WORLD)
    token, _ = m.tokens.create("provider-admin", name="libvirt-hook")
    (tmp_path / "t").write_text(token)
    with serving(create_app(m, watch=False), timeout_graceful_shutdown=1) as url:
        dest = cfg(tmp_path, server=url, host="hv-2")
        src = cfg(tmp_path, server=url, host="hv-1")
        assert run(dest, ["web", "migrate", "begin", "-"], xml()) == 0
        log = (tmp_path / "hook.log").read_text()
        assert "migrate: shop/web-1 -> hv-2: migration" in log, log
        assert run(src, ["web", "release", "end", "-"], xml()) == 0
        assert "release: shop/web-1 now belongs to hv-2: kept" in (tmp_path / "hook.log").read_text()
        other = xml(meta=META.replace('name="web-1"', 'name="web-2"').replace("AA:00:01", "aa:00:01"))
        assert run(src, ["web", "release", "end", "-"], other) == 0
        assert "release: shop/web-2 removed from the manager" in (tmp_path / "hook.log").read_text()
        third = xml(meta=META.replace('name="web-1"', 'name="web-3"'))
        assert run(src, ["web", "release", "end", "-"], third) == 0
        assert "shop/web-3 was not registered for this domain" in (tmp_path / "hook.log").read_text()
        names = {w["metadata"]["name"] for w in m_workloads(url, token)}
        assert names == {"web-1", "web-3"}


def m_workloads(url: str, token: str) -> list[dict[str, object]]:
    from omniwall.client import Client

    with Client(url, token) as c:
        return c.list("workload", tenant="shop")
