"""`omniwall.client`: a typed Python client of the manager's REST API (docs/api.md#python-client).

The CLI makes every manager call through it; a libvirt hook, a CNI plugin or a script can too:

    from omniwall.client import Client, ClientError

    with Client.connect() as api:   # OMNIWALL_SERVER/OMNIWALL_TOKEN/OMNIWALL_CA, else the config file
        api.migrate("tenant-a/app-1", "host-3")

Modules: `api` (Client, Retry, Migration), `settings` (where server, token and TLS files come from),
`errors` (ClientError), `sse` (Server-Sent Events).
"""

from __future__ import annotations

from .api import COLLECTIONS, JSON, NO_RETRY, Client, Migration, Retry, kind_of, split_ref
from .errors import ClientError
from .settings import DEFAULT_SERVER, Settings, config_path, effective, read_config

__all__ = [
    "COLLECTIONS",
    "DEFAULT_SERVER",
    "JSON",
    "NO_RETRY",
    "Client",
    "ClientError",
    "Migration",
    "Retry",
    "Settings",
    "config_path",
    "effective",
    "kind_of",
    "read_config",
    "split_ref",
]
