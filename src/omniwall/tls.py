"""TLS for the manager (server side, client certificates) and the agent (client side): contexts built
from files, reloaded in place when the files change, and the rule that a token never travels in clear
text to a manager off this machine.

Reloading: `ssl.SSLContext.load_cert_chain` on a live context affects the handshakes that follow and
leaves established connections alone, so a rotated certificate takes effect without a restart and
without dropping a feed (docs/security.md "Certificate rotation").
"""

from __future__ import annotations

import ipaddress
import logging
import os
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

log = logging.getLogger(__name__)


class TlsConfigError(ValueError):
    """A TLS option is missing, contradicts another, or names an unreadable file."""


def is_loopback_host(host: str) -> bool:
    h = host.strip("[]").lower()
    if h == "localhost" or h.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def check_manager_url(url: str, *, option: str = "--manager") -> None:
    """An agent (or any client holding a token) talks plain HTTP only to a manager on this machine."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise TlsConfigError(f"{option}: {url!r} is not an http(s) URL")
    if parts.scheme == "http" and not is_loopback_host(parts.hostname):
        raise TlsConfigError(
            f"{option}: {url!r}: plain HTTP to a manager that is not on this machine would send the "
            "host's token in clear text; use https:// (with --ca naming the manager's CA)"
        )


def _mtimes(paths: tuple[Path, ...]) -> tuple[int, ...]:
    out = []
    for p in paths:
        try:
            out.append(p.stat().st_mtime_ns)
        except OSError:
            out.append(-1)
    return tuple(out)


def _readable(path: Path, option: str) -> Path:
    if not os.access(path, os.R_OK):
        raise TlsConfigError(f"{option}: cannot read {path}")
    return path


@dataclass
class ReloadingContext:
    """An SSLContext plus the certificate/key files it was loaded from; `reload_if_changed()` re-reads
    them when their modification time moved (a rotation)."""

    context: ssl.SSLContext
    cert: Path | None
    key: Path | None
    reloads: int = 0
    _seen: tuple[int, ...] = field(default=(), repr=False)
    on_reload: Callable[[], None] | None = None

    def _files(self) -> tuple[Path, ...]:
        return tuple(p for p in (self.cert, self.key) if p is not None)

    def load(self) -> None:
        if self.cert is not None:
            try:
                self.context.load_cert_chain(self.cert, self.key)
            except (OSError, ssl.SSLError) as e:
                raise TlsConfigError(f"cannot load certificate {self.cert} / key {self.key}: {e}") from e
        self._seen = _mtimes(self._files())

    def reload_if_changed(self) -> bool:
        """True when the files changed and were loaded. A half-written pair (certificate and key that do
        not match) keeps the old one loaded and is tried again next time."""
        if self.cert is None or _mtimes(self._files()) == self._seen:
            return False
        try:
            self.load()
        except TlsConfigError as e:
            log.warning("certificate rotation: %s; keeping the loaded certificate", e)
            return False
        self.reloads += 1
        log.info("certificate reloaded from %s", self.cert)
        if self.on_reload is not None:
            self.on_reload()
        return True


def server_context(cert: str | Path, key: str | Path, client_ca: str | Path | None) -> ReloadingContext:
    """The manager's context. With `client_ca`, clients may present a certificate issued by it (verified
    in the handshake: a certificate from another CA fails the connection); whether one is required is the
    API's decision per role (agents: yes; people with bearer tokens: no)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if client_ca is not None:
        try:
            ctx.load_verify_locations(cafile=str(_readable(Path(client_ca), "--client-ca")))
        except ssl.SSLError as e:
            raise TlsConfigError(f"--client-ca {client_ca}: {e}") from e
        ctx.verify_mode = ssl.CERT_OPTIONAL
    rc = ReloadingContext(ctx, _readable(Path(cert), "--tls-cert"), _readable(Path(key), "--tls-key"))
    rc.load()
    return rc


def client_context(
    ca: str | Path | None, cert: str | Path | None = None, key: str | Path | None = None
) -> ReloadingContext:
    """An agent's (or CLI's) context: trust `ca` (None: the system's trust store), present `cert`/`key`."""
    if (cert is None) != (key is None):
        raise TlsConfigError("--cert and --key go together")
    ctx = ssl.create_default_context(cafile=str(_readable(Path(ca), "--ca")) if ca is not None else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    rc = ReloadingContext(
        ctx,
        _readable(Path(cert), "--cert") if cert is not None else None,
        _readable(Path(key), "--key") if key is not None else None,
    )
    rc.load()
    return rc


__all__ = [
    "ReloadingContext",
    "TlsConfigError",
    "check_manager_url",
    "client_context",
    "is_loopback_host",
    "server_context",
]
