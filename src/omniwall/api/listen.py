"""Listen addresses of the manager's servers (API and metrics): parse `HOST:PORT`, and the warning for
plain HTTP on an address other machines can reach. Apart from `server.py` so that `metrics.py`, which
`app.py` installs, can parse its address without importing the server that imports the app."""

from __future__ import annotations

from omniwall.tls import is_loopback_host

PLAIN_HTTP_WARNING = """
************************************************************************************************
  PLAIN HTTP on %s: bearer tokens (agents' too) cross the network in clear text.
  Serve HTTPS: omniwall manager --tls-cert manager.crt --tls-key manager.key --client-ca ca.crt
  (omniwall pki: docs/security.md).
************************************************************************************************"""


def plain_http_warning(host: str, port: int, *, tls: bool) -> str | None:
    """The boxed warning for plain HTTP on an address other machines can reach, else None."""
    return None if tls or is_loopback_host(host) else PLAIN_HTTP_WARNING % f"{host}:{port}"


def parse_listen(listen: str) -> tuple[str, int]:
    """`HOST:PORT`, `:PORT` or `[v6]:PORT` -> (host, port)."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--listen {listen!r}: expected HOST:PORT, like 127.0.0.1:8443")
    return (host.strip("[]") or "0.0.0.0"), int(port)
