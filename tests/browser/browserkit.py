"""What the browser tests share: the world the in-process manager serves, and signing in."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omniwall.manager.service import Manager

# An object whose label looks like markup: the console must show it as text (names cannot hold it, labels
# and selector strings can).
HOSTILE = '<img src=x onerror="window.__pwned=1"><b>bold</b>'
HOSTILE_SELECTOR = "<script>window.__pwned=2</script><i>x</i>"

WORLD = f"""
kind: Tenant
metadata: {{name: acme}}
---
kind: Tenant
metadata: {{name: globex}}
---
kind: Host
metadata: {{name: hv-east}}
---
kind: Host
metadata: {{name: hv-west}}
---
kind: Workload
metadata: {{name: web-1, tenant: acme, labels: {{tier: web}}}}
spec: {{host: hv-east, vnics: [{{name: eth0, ips: [10.1.0.1]}}]}}
---
kind: Workload
metadata: {{name: db-1, tenant: acme, labels: {{tier: db, note: '{HOSTILE}'}}}}
spec: {{host: hv-west, vnics: [{{name: eth0, ips: [10.1.0.2]}}]}}
---
kind: Workload
metadata: {{name: secret-app, tenant: globex, labels: {{tier: app}}}}
spec: {{host: hv-west, vnics: [{{name: eth0, ips: [10.2.0.1]}}]}}
---
kind: Group
metadata: {{name: web, tenant: acme, labels: {{owner: '{HOSTILE}'}}}}
spec: {{selector: 'tier == "web"'}}
---
kind: Group
metadata: {{name: db, tenant: acme}}
spec: {{selector: 'note == "{HOSTILE_SELECTOR}" || tier == "db"'}}
---
kind: Group
metadata: {{name: globex-apps, tenant: globex}}
spec: {{selector: 'tier == "app"'}}
---
kind: Policy
metadata: {{name: web-db, tenant: acme}}
spec:
  rules:
  - {{name: sql, sources: [web], destinations: [db], services: [tcp/5432], action: allow}}
  - {{name: no-ssh, sources: [any], destinations: [db], services: [tcp/22], action: drop}}
---
kind: Policy
metadata: {{name: globex-private, tenant: globex}}
spec:
  rules:
  - {{name: inbound, sources: [any], destinations: [globex-apps], services: [tcp/443], action: allow}}
"""


@dataclass
class World:
    url: str
    manager: Manager
    tokens: dict[str, str]  # caller -> token
    agents: dict[str, str]  # host -> agent token


def sign_in(page: Any, url: str, token: str, where: str = "flows") -> None:
    page.goto(f"{url}/ui/")
    page.evaluate("sessionStorage.clear()")  # whoever was signed in in this tab before
    page.reload()
    page.fill("#token", token)
    page.click("#signin")
    page.wait_for_selector("#principal-role")
    page.goto(f"{url}/ui/#/{where}")
    page.wait_for_selector(f"#page-{where.split('?')[0]}")
