"""Real etcd servers for tests: Debian's `etcd` binary on free loopback ports, data under a tmp dir.

Each server has a unique name per run, is stopped by its PID at the end (also when the test fails), and
touches nothing but its own data dir and ports. Tests skip only when the binary is missing (`make
install` installs `etcd-server`).
"""

from __future__ import annotations

import os
import shutil
import signal
import ssl
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from omniwall.lab.control import free_ports

ETCD = shutil.which("etcd") or ("/usr/bin/etcd" if os.path.exists("/usr/bin/etcd") else None)

needs_etcd = pytest.mark.skipif(ETCD is None, reason="etcd binary missing (apt-get install etcd-server)")


@dataclass
class Member:
    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"


@dataclass
class Cluster:
    members: list[Member] = field(default_factory=list)
    # TLS for clients: (ca, server cert, server key, client cert, client key); clients must present a cert
    tls: tuple[Path, Path, Path, Path, Path] | None = None

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    @property
    def endpoints(self) -> list[str]:
        return [f"{self.scheme}://{m.endpoint}" for m in self.members]

    @property
    def url(self) -> str:
        return "etcd://" + ",".join(m.endpoint for m in self.members)

    def start(self, m: Member, state: str = "new") -> None:
        assert ETCD is not None
        initial = ",".join(f"{x.name}={x.peer_url}" for x in self.members)
        cmd = [
            ETCD,
            "--name", m.name,
            "--data-dir", str(m.data_dir),
            "--listen-client-urls", f"{self.scheme}://{m.endpoint}",
            "--advertise-client-urls", f"{self.scheme}://{m.endpoint}",
            "--listen-peer-urls", m.peer_url,
            "--initial-advertise-peer-urls", m.peer_url,
            "--initial-cluster", initial,
            "--initial-cluster-token", m.name.rsplit("-", 1)[0],
            "--initial-cluster-state", state,
            # fast elections on loopback: tests wait for a leader, not for a WAN timeout
            "--heartbeat-interval", "20",
            "--election-timeout", "200",
        ]  # fmt: skip
        if self.tls:
            ca, crt, key = self.tls[:3]
            cmd += ["--cert-file", str(crt), "--key-file", str(key), "--client-cert-auth",
                    "--trusted-ca-file", str(ca)]  # fmt: skip
        with m.log.open("ab") as log:
            m.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def kill(self, m: Member) -> None:
        """SIGKILL one member (by PID) and reap it."""
        if m.proc is not None and m.proc.poll() is None:
            os.kill(m.proc.pid, signal.SIGKILL)
            m.proc.wait(timeout=10)

    def stop_all(self) -> None:
        for m in self.members:
            if m.proc is not None and m.proc.poll() is None:
                os.kill(m.proc.pid, signal.SIGTERM)
        for m in self.members:
            if m.proc is None:
                continue
            try:
                m.proc.wait(timeout=2)  # a member whose peers are gone may linger: its data is scratch
            except subprocess.TimeoutExpired:
                os.kill(m.proc.pid, signal.SIGKILL)
                m.proc.wait(timeout=5)

    def client(self) -> httpx.Client:
        if not self.tls:
            return httpx.Client(timeout=1)
        ctx = ssl.create_default_context(cafile=str(self.tls[0]))
        ctx.load_cert_chain(str(self.tls[3]), str(self.tls[4]))
        return httpx.Client(timeout=1, verify=ctx)

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Until a linearizable read succeeds on every running member (so a leader exists)."""
        deadline = time.monotonic() + timeout
        for m in self.members:
            if m.proc is None or m.proc.poll() is not None:
                continue
            while True:
                try:
                    r = self.client().post(f"{self.scheme}://{m.endpoint}/v3/kv/range", json={"key": "AA=="})
                    if r.status_code == 200 and "header" in r.json():
                        break
                except httpx.HTTPError:
                    pass
                if m.proc.poll() is not None:
                    raise RuntimeError(f"etcd {m.name} exited: {m.log.read_text()[-2000:]}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"etcd {m.name} not ready: {m.log.read_text()[-2000:]}")
                time.sleep(0.05)


@contextmanager
def etcd_cluster(
    tmp: Path, size: int = 1, tls: tuple[Path, Path, Path, Path, Path] | None = None
) -> Iterator[Cluster]:
    run = f"owtest-{uuid.uuid4().hex[:8]}"
    cluster = Cluster(tls=tls)
    ports = free_ports(2 * size)  # all distinct: picked one at a time they can repeat
    for i in range(size):
        d = tmp / f"etcd-{run}-{i}"
        d.mkdir(parents=True)
        cluster.members.append(
            Member(f"{run}-{i}", ports[2 * i], ports[2 * i + 1], d / "data", d / "etcd.log")
        )
    try:
        for m in cluster.members:
            cluster.start(m)
        cluster.wait_ready()
        yield cluster
    finally:
        cluster.stop_all()


def etcd_server_cert(pki_dir: Path) -> tuple[Path, Path]:
    """A certificate for etcd on 127.0.0.1, signed by the `omniwall pki` CA in `pki_dir`. etcd 3.4's
    HTTP gateway dials its own gRPC port with the server certificate, so with --client-cert-auth that
    certificate must allow client authentication too (omniwall's manager certificates allow serverAuth
    only)."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    from omniwall.pki import _load_ca

    ca_cert, ca_key = _load_ca(pki_dir)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    usages = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "etcd")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    crt, pem = pki_dir / "etcd.crt", pki_dir / "etcd.key"
    pem.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return crt, pem


@dataclass
class ManagerProcess:
    """`omniwall manager --store <etcd>` as a real process on a free loopback port (kill -9 tests)."""

    url: str
    proc: subprocess.Popen[bytes]
    log: Path

    def kill(self) -> None:
        """SIGKILL by PID (no clean shutdown: its lease expires on its own) and reap it."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()


@contextmanager
def manager_processes(
    tmp: Path, store_url: str, count: int = 1, env: dict[str, str] | None = None, timeout: float = 60.0
) -> Iterator[list[ManagerProcess]]:
    """`count` managers on one store, each in its own working directory under `tmp`, killed by PID at
    the end (also on failure). Yields once every one answers /healthz."""
    import sys

    out: list[ManagerProcess] = []
    ports = free_ports(count)  # distinct, though no manager has bound its port yet
    try:
        for i, port in enumerate(ports):
            d = tmp / f"manager-{uuid.uuid4().hex[:6]}-{i}"
            d.mkdir(parents=True)
            log = d / "manager.log"
            main = "from omniwall.cli.main import app; app()"
            cmd = [
                sys.executable,
                "-c",
                main,
                "manager",
                "--store",
                store_url,
                "--listen",
                f"127.0.0.1:{port}",
            ]
            with log.open("ab") as f:
                proc = subprocess.Popen(
                    cmd, cwd=d, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                    env={**os.environ, **(env or {})},
                )  # fmt: skip
            out.append(ManagerProcess(f"http://127.0.0.1:{port}", proc, log))
        deadline = time.monotonic() + timeout
        for mp in out:
            while True:
                try:
                    if httpx.get(f"{mp.url}/healthz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if mp.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"manager at {mp.url} did not start: {mp.log.read_text()[-2000:]}")
                time.sleep(0.1)
        yield out
    finally:
        for mp in out:
            mp.kill()
