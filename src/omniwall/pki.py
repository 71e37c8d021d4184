"""A small PKI for mutual TLS between agents and managers: one CA, manager (server) certificates, one client
certificate per host.

Layout of a PKI directory (every key 0600, the directory 0700):
    ca.crt, ca.key                       the CA (keep ca.key offline in production)
    manager.crt, manager.key             a server certificate (SANs: the IPs / DNS names given)
    hosts/<host>.crt, hosts/<host>.key   a client certificate naming the host

A host certificate names its host twice: the subject CN, and a URI SAN `urn:omniwall:host:<host>`. The
manager trusts only the URI SAN (a CN is free text that other certificate issuers fill in too); the
CN is for people reading the certificate.

`cryptography` (PyCA) rather than shelling out to `openssl`: the same keys and extensions on every
machine, no parsing of command output, and the tests issue throwaway certificates in milliseconds. Keys
are ECDSA P-256: fast handshakes, small files, supported by every TLS stack the agent may meet.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

HOST_URI_PREFIX = "urn:omniwall:host:"
CA_DAYS = 3650
LEAF_DAYS = 397  # the CA/Browser limit for server certificates; rotate well before (docs/security.md)
_HOST_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,252}$")
_DNS_NAME = re.compile(
    r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)


class PkiError(ValueError):
    """A PKI operation could not be done: the message names the file or the argument."""


@dataclass(frozen=True, slots=True)
class Issued:
    cert: Path
    key: Path


def ca_paths(d: Path) -> Issued:
    return Issued(d / "ca.crt", d / "ca.key")


def host_paths(d: Path, host: str) -> Issued:
    return Issued(d / "hosts" / f"{host}.crt", d / "hosts" / f"{host}.key")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    """Write a private key 0600 from the start (never world-readable, not even for a moment); the file is
    replaced atomically, so an agent re-reading it during a rotation sees the old key or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    os.replace(tmp, path)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _secure_dir(d: Path) -> None:
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)


def init_ca(d: Path, *, name: str = "Omniwall CA", days: int = CA_DAYS, force: bool = False) -> Issued:
    """Create the CA in `d`. Refuses to overwrite an existing CA unless `force` (every certificate it
    issued would stop being trusted)."""
    paths = ca_paths(d)
    if paths.key.exists() and not force:
        raise PkiError(f"{paths.key} exists: a CA is already there (--force replaces it)")
    _secure_dir(d)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_key(paths.key, key)
    _write_cert(paths.cert, cert)
    return paths


def _load_ca(d: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    paths = ca_paths(d)
    try:
        cert = x509.load_pem_x509_certificate(paths.cert.read_bytes())
        key = serialization.load_pem_private_key(paths.key.read_bytes(), password=None)
    except FileNotFoundError as e:
        raise PkiError(f"{e.filename}: no CA here (run `omniwall pki init --dir {d}` first)") from None
    except ValueError as e:
        raise PkiError(f"{d}: cannot load the CA: {e}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"{paths.key}: not an EC key")
    return cert, key


def _leaf(
    d: Path,
    common_name: str,
    sans: Sequence[x509.GeneralName],
    usage: x509.ObjectIdentifier,
    out: Issued,
    days: int,
) -> Issued:
    ca_cert, ca_key = _load_ca(d)
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    # key first: a reader that sees the new certificate must find its key
    _write_key(out.key, key)
    _write_cert(out.cert, cert)
    return out


def san_of(name: str) -> x509.GeneralName:
    """An IP address or a DNS name, as given on the command line."""
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        pass
    if not _DNS_NAME.match(name):
        raise PkiError(f"--san {name!r}: neither an IP address nor a DNS name")
    return x509.DNSName(name)


def issue_manager(
    d: Path, names: Sequence[str], *, out: Issued | None = None, days: int = LEAF_DAYS
) -> Issued:
    """A server certificate for the manager, valid for every IP address and DNS name in `names`."""
    sans = [san_of(n) for n in names]
    if not sans:
        raise PkiError("--san: give at least one IP address or DNS name the agents use to reach the manager")
    out = out or Issued(d / "manager.crt", d / "manager.key")
    return _leaf(d, names[0], sans, ExtendedKeyUsageOID.SERVER_AUTH, out, days)


def check_host_name(host: str) -> str:
    if not _HOST_NAME.match(host):
        raise PkiError(f"host {host!r}: expected letters, digits, '.', '_' or '-' (at most 253)")
    return host


def issue_host(d: Path, host: str, *, out: Issued | None = None, days: int = LEAF_DAYS) -> Issued:
    """A client certificate for the agent of `host`: CN=<host>, URI SAN urn:omniwall:host:<host>."""
    check_host_name(host)
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(HOST_URI_PREFIX + host)]
    return _leaf(d, host, sans, ExtendedKeyUsageOID.CLIENT_AUTH, out or host_paths(d, host), days)


# ------------------------------------------------------------------------------ reading peer certificates


def host_of_peercert(peercert: Mapping[str, Any] | None) -> str | None:
    """The host a verified peer certificate (`ssl.SSLSocket.getpeercert()` form) names in its URI SAN,
    or None (no certificate, or not a host certificate)."""
    if not peercert:
        return None
    for kind, value in peercert.get("subjectAltName", ()):
        if kind == "URI" and isinstance(value, str) and value.startswith(HOST_URI_PREFIX):
            return value[len(HOST_URI_PREFIX) :]
    return None


def describe(path: Path) -> dict[str, Any]:
    """Subject, SANs, serial and validity of a certificate file (for `omniwall pki show`)."""
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as e:
        raise PkiError(f"{path}: {e}") from None
    try:
        sans = [
            str(g.value) for g in cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        ]
    except x509.ExtensionNotFound:
        sans = []
    return {
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "serial": f"{cert.serial_number:x}",
        "notBefore": cert.not_valid_before_utc.isoformat(),
        "notAfter": cert.not_valid_after_utc.isoformat(),
        "sans": sans,
    }


__all__ = [
    "HOST_URI_PREFIX",
    "Issued",
    "PkiError",
    "ca_paths",
    "check_host_name",
    "describe",
    "host_of_peercert",
    "host_paths",
    "init_ca",
    "issue_host",
    "issue_manager",
    "san_of",
]
