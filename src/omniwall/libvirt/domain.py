"""A libvirt domain's XML as the hook reads it: the Omniwall metadata and the interfaces.

The metadata lives in the domain's `<metadata>` under the Omniwall XML namespace (libvirt keeps
foreign-namespace metadata untouched; `virsh metadata --uri NS` edits it):

    <metadata>
      <ow:workload xmlns:ow="https://omniwall.io/xmlns/libvirt/v1" tenant="shop" name="web-1">
        <ow:label key="tier" value="web"/>
        <ow:attribute key="owner" value="alice"/>
        <ow:vnic mac="52:54:00:12:34:56" name="eth0" ips="10.20.0.1,fd00:20::1"/>
      </ow:workload>
    </metadata>

`name` defaults to the domain's name. Each `<ow:vnic>` names one of the domain's `<interface>`s by its
MAC (stable across hosts, unlike tap names) and gives its addresses; the tap's name comes from that
interface's `<target dev=.../>` (known once libvirt prepared the domain). Interfaces without an
`<ow:vnic>` are not registered: the host's agent drops traffic on them if they match its
`vnicInterfaces` (fail closed), so a domain's every interface should be listed.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

NS = "https://omniwall.io/xmlns/libvirt/v1"
API_VERSION = "omniwall.io/v1"


class MetadataError(ValueError):
    """The domain's Omniwall metadata is unusable; the message names the element and the reason."""


@dataclass(frozen=True, slots=True)
class Vnic:
    mac: str
    name: str
    ips: tuple[str, ...]
    tap: str | None  # the interface's <target dev>, None before libvirt named it


@dataclass(frozen=True, slots=True)
class Domain:
    name: str
    uuid: str
    tenant: str | None  # None: no Omniwall metadata
    workload: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    attributes: dict[str, str] = field(default_factory=dict)
    vnics: tuple[Vnic, ...] = ()

    @property
    def annotated(self) -> bool:
        return self.tenant is not None

    @property
    def key(self) -> str:
        return f"{self.tenant}/{self.workload}"

    def missing_taps(self) -> list[str]:
        return [v.mac for v in self.vnics if not v.tap]

    def workload_doc(self, host: str) -> dict[str, object]:
        """The Workload the hook applies for this domain on `host`."""
        attrs = {**self.attributes, "libvirt.domain": self.name, "libvirt.uuid": self.uuid}
        return {
            "apiVersion": API_VERSION,
            "kind": "Workload",
            "metadata": {"name": self.workload, "tenant": self.tenant, "labels": dict(self.labels)},
            "spec": {
                "host": host,
                "vnics": [
                    {"name": v.name, "mac": v.mac, "ips": list(v.ips), "hostIfname": v.tap}
                    for v in self.vnics
                ],
                "attributes": attrs,
            },
        }


def parse(xml: str) -> Domain:
    """Raises MetadataError for XML that is not a domain or Omniwall metadata that is malformed."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as e:
        raise MetadataError(f"domain XML: {e}") from None
    if root.tag != "domain":
        raise MetadataError(f"domain XML: the root element is <{root.tag}>, not <domain>")
    name = (root.findtext("name") or "").strip()
    uuid = (root.findtext("uuid") or "").strip()
    if not name:
        raise MetadataError("domain XML: <name> is missing")
    meta = root.find(f"metadata/{{{NS}}}workload")
    if meta is None:
        return Domain(name=name, uuid=uuid, tenant=None)
    tenant = (meta.get("tenant") or "").strip()
    if not tenant:
        raise MetadataError("<ow:workload>: attribute tenant is missing")
    taps = _interfaces(root)
    vnics = []
    for i, el in enumerate(meta.findall(f"{{{NS}}}vnic")):
        where = f"<ow:vnic> #{i + 1}"
        mac = (el.get("mac") or "").strip().lower()
        if not mac:
            raise MetadataError(f"{where}: attribute mac is missing (it names the domain's <interface>)")
        if mac not in taps:
            raise MetadataError(f"{where}: mac {mac}: the domain has no <interface> with that MAC")
        ips = tuple(x.strip() for x in (el.get("ips") or "").split(",") if x.strip())
        vnics.append(Vnic(mac=mac, name=el.get("name") or f"eth{i}", ips=ips, tap=taps[mac]))
    if not vnics:
        raise MetadataError("<ow:workload>: no <ow:vnic>: name at least one interface by its mac")
    return Domain(
        name=name,
        uuid=uuid,
        tenant=tenant,
        workload=(meta.get("name") or name).strip(),
        labels=_pairs(meta, "label"),
        attributes=_pairs(meta, "attribute"),
        vnics=tuple(vnics),
    )


def _interfaces(root: ET.Element) -> dict[str, str | None]:
    """MAC -> tap name (None while libvirt has not named it) of each <interface>."""
    out: dict[str, str | None] = {}
    for itf in root.findall("devices/interface"):
        mac = itf.find("mac")
        if mac is None or not mac.get("address"):
            continue
        target = itf.find("target")
        out[mac.get("address", "").lower()] = target.get("dev") if target is not None else None
    return out


def _pairs(meta: ET.Element, tag: str) -> dict[str, str]:
    out = {}
    for i, el in enumerate(meta.findall(f"{{{NS}}}{tag}")):
        key = el.get("key")
        if not key:
            raise MetadataError(f"<ow:{tag}> #{i + 1}: attribute key is missing")
        out[key] = el.get("value", "")
    return out


__all__ = ["NS", "Domain", "MetadataError", "Vnic", "parse"]
