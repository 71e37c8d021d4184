"""`Client`: the manager's REST API (docs/api.md) as Python methods.

One `httpx.Client` (kept-alive connections) with the token in every request. A call returns the
decoded JSON answer; any failure raises `ClientError` (status + the server's message). Retries:
- no answer (connection refused or reset, connect timeout): retried with exponential backoff; a request
  that may already have reached the manager (a read timeout, a connection lost after sending) is
  retried only when its method is idempotent (GET, PUT, DELETE, HEAD);
- 503 (the store is unavailable): retried after the `Retry-After` the manager sends;
- any 4xx, any other 5xx: never retried (the manager has decided).

Objects are named `tenant/name` or `name` plus `tenant=` (None: the token's tenant, or the provider).
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn, TypedDict
from urllib.parse import quote

import httpx

from .errors import ClientError
from .settings import Settings
from .sse import sse_events

JSON = dict[str, Any]
IDEMPOTENT = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})
PAGE = 500  # objects per list request (the API's largest is 1000)


class Migration(TypedDict, total=False):
    """A migration record (`GET /v1/workloads/{name}/migration`, docs/design/migration.md)."""

    id: str
    workload: str  # tenant/name
    tenant: str
    name: str
    source: str
    destination: str
    phase: str  # prepare, export, import, switching, switched, finalize, done, rollback, rolled-back
    result: str  # running | succeeded | failed
    started: str
    ended: str | None
    error: str | None
    actor: str
    phases: list[JSON]  # [{phase, at, ms}]
    stats: JSON


@dataclass(frozen=True)
class Retry:
    """How a call is retried: `attempts` in all (1: never retried), waits of `backoff` s doubling up to
    `max_backoff`; a `Retry-After` longer than `max_wait` s is not waited for (the error is raised)."""

    attempts: int = 4
    backoff: float = 0.2
    max_backoff: float = 5.0
    max_wait: float = 30.0

    def delay(self, attempt: int) -> float:
        return float(min(self.max_backoff, self.backoff * 2**attempt))


NO_RETRY = Retry(attempts=1)


def split_ref(ref: str, tenant: str | None = None) -> tuple[str | None, str]:
    """`tenant/name` or `name` (+ `tenant`) -> (tenant, name). A tenant given both ways must agree."""
    if "/" not in ref:
        return tenant, ref
    t, _, name = ref.partition("/")
    if not t or not name or "/" in name:
        raise ValueError(f"{ref!r}: expected NAME or TENANT/NAME")
    if tenant and tenant != t:
        raise ValueError(f"{ref!r} names tenant {t!r} but --tenant is {tenant!r}")
    return t, name


# The API's collections (part of its contract, docs/api.md); the client needs no model classes.
COLLECTIONS = {
    "Tenant": "tenants",
    "Host": "hosts",
    "Workload": "workloads",
    "Group": "groups",
    "Service": "services",
    "Application": "applications",
    "Policy": "policies",
}


def kind_of(word: str) -> str:
    """`policies`, `policy`, `Policy` -> `Policy`; ClientError naming the known kinds otherwise."""
    low = word.strip().lower()
    for kind, plural in COLLECTIONS.items():
        if low in (kind.lower(), plural):
            return kind
    raise ClientError(f"unknown kind {word!r}; known kinds: {', '.join(sorted(COLLECTIONS))}")


def _plural(kind: str) -> str:
    """`workload`, `Workloads`, `policy` ... -> the API's collection (`workloads`, `policies`)."""
    return COLLECTIONS[kind_of(kind)]


def _seg(name: str) -> str:
    return quote(name, safe="")


class Client:
    """A client of one manager. Use as a context manager, or call `close()`.

        from omniwall.client import Client

        with Client.connect() as api:          # --server/--token rules: env, then the config file
            api.apply(open("web.yaml").read())
            print(api.get("workload", "tenant-a/web-1")["spec"]["host"])

    `verify` (an `ssl.SSLContext`, a CA bundle path, or True) overrides `ca`/`cert`/`key`.
    """

    def __init__(
        self,
        server: str,
        token: str,
        *,
        ca: str | None = None,
        cert: str | None = None,
        key: str | None = None,
        verify: Any = None,
        timeout: float = 60.0,
        retry: Retry | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.server = server.rstrip("/")
        self.retry = retry or Retry()
        self.retries = 0  # retries made so far (logs, tests)
        self._sleep = sleep
        if verify is None:
            verify = Settings(self.server, token, ca, cert, key).verify()
        self.http = httpx.Client(
            base_url=self.server,
            headers={"Authorization": f"Bearer {token}"},
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            verify=verify,
        )

    @classmethod
    def from_settings(cls, settings: Settings, **options: Any) -> Client:
        return cls(
            settings.server, settings.token, ca=settings.ca, cert=settings.cert, key=settings.key, **options
        )

    @classmethod
    def connect(
        cls,
        server: str | None = None,
        token: str | None = None,
        *,
        context: str | None = None,
        **options: Any,
    ) -> Client:
        """A client set up as the CLI's: arguments, then `OMNIWALL_*`, then the config file's context."""
        return cls.from_settings(Settings.resolve(server, token, context=context), **options)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------- transport

    def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        json: Any = None,
        content: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> Any:
        """One API call with the retry rules above; the decoded JSON answer (None when empty)."""
        kw: dict[str, Any] = {"params": _params(params), "headers": dict(headers or {})}
        if json is not None:
            kw["json"] = json
        if content is not None:
            kw["content"] = content
        if timeout is not None:
            kw["timeout"] = timeout
        resp = self._send(method, path, kw)
        if resp.status_code >= 400:
            self._fail(_error_of(resp))
        return resp.json() if resp.content else None

    def _send(self, method: str, path: str, kw: dict[str, Any]) -> httpx.Response:
        attempt = 0
        while True:
            last = attempt + 1 >= self.retry.attempts
            try:
                resp = self.http.request(method, path, **kw)
            except httpx.HTTPError as e:
                if last or not _retriable(e, method):
                    self._fail(ClientError(f"cannot reach the manager at {self.server}: {e}"))
                wait = self.retry.delay(attempt)
            else:
                wait_s = _retry_after(resp)
                if wait_s is None or last or wait_s > self.retry.max_wait:
                    return resp
                wait = wait_s
            attempt += 1
            self.retries += 1
            self._sleep(wait)

    def _fail(self, err: ClientError) -> NoReturn:
        """Every failure passes here (a subclass may report it differently, e.g. the CLI's exit)."""
        raise err

    def _stream(self, path: str, params: Mapping[str, Any]) -> Iterator[tuple[str, JSON]]:
        """(event, data) of a Server-Sent Events endpoint, until the server ends it; not retried."""
        try:
            with self.http.stream("GET", path, params=_params(params), timeout=httpx.Timeout(None)) as resp:
                if resp.status_code >= 400:
                    resp.read()
                    self._fail(_error_of(resp))
                yield from sse_events(resp.iter_lines())
        except httpx.HTTPError as e:
            self._fail(ClientError(f"stream from {self.server} ended: {e}"))

    # ------------------------------------------------------------------------------------- status

    def healthy(self) -> bool:
        """Does the manager answer `/healthz` (no token needed; never raises)?"""
        try:
            return self.http.get("/healthz", timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False

    def whoami(self) -> JSON:
        return dict(self.request("GET", "/v1/whoami"))

    def status(self) -> JSON:
        """The store revision and each host's agent: connected, desired/realized revision, last error."""
        return dict(self.request("GET", "/v1/status"))

    # ------------------------------------------------------------------------------------- objects

    def apply(
        self,
        resources: str | Iterable[Mapping[str, Any]],
        *,
        dry_run: bool = False,
        source: str | None = None,
    ) -> JSON:
        """Create or update every object, all or nothing (`POST /v1/apply`). `resources`: YAML/JSON text
        (any number of documents) or resource dicts. Returns `{revision, changes[, impact]}`."""
        if not isinstance(resources, str):
            import yaml

            resources = yaml.safe_dump_all([dict(r) for r in resources], sort_keys=False)
        headers = {"Content-Type": "application/yaml"}
        if source:
            headers["X-Omniwall-Source"] = source
        return dict(
            self.request(
                "POST",
                "/v1/apply",
                params={"dryRun": "true"} if dry_run else None,
                content=resources.encode(),
                headers=headers,
            )
        )

    def get(self, kind: str, name: str, *, tenant: str | None = None) -> JSON:
        tenant, name = _ref(name, tenant)
        return dict(self.request("GET", f"/v1/{_plural(kind)}/{_seg(name)}", params={"tenant": tenant}))

    def list(self, kind: str, *, tenant: str | None = None, selector: str | None = None) -> list[JSON]:
        """Every object of a kind (all pages), optionally filtered by a label selector (`tier=web`)."""
        return list(self.iter(kind, tenant=tenant, selector=selector))

    def iter(self, kind: str, *, tenant: str | None = None, selector: str | None = None) -> Iterator[JSON]:
        path, cont = f"/v1/{_plural(kind)}", None
        while True:
            params = {"tenant": tenant, "labelSelector": selector, "limit": PAGE, "continue": cont}
            page = self.request("GET", path, params=params)
            yield from page["items"]
            cont = page.get("continue")
            if not cont:
                return

    def delete(self, kind: str, name: str, *, tenant: str | None = None) -> JSON:
        """Delete an object (an Application takes what it owns along); `{deleted, revision}`."""
        tenant, name = _ref(name, tenant)
        return dict(self.request("DELETE", f"/v1/{_plural(kind)}/{_seg(name)}", params={"tenant": tenant}))

    def history(self, kind: str, name: str, *, tenant: str | None = None) -> JSON:
        tenant, name = _ref(name, tenant)
        path = f"/v1/{_plural(kind)}/{_seg(name)}/history"
        return dict(self.request("GET", path, params={"tenant": tenant}))

    def rollback(self, kind: str, name: str, revision: int, *, tenant: str | None = None) -> JSON:
        """Restore an object as it was at `revision` (a new write); `{rolledBackTo, revision}`."""
        tenant, name = _ref(name, tenant)
        path = f"/v1/{_plural(kind)}/{_seg(name)}/rollback"
        return dict(self.request("POST", path, params={"tenant": tenant}, json={"revision": revision}))

    def compact(self, revision: int) -> JSON:
        return dict(self.request("POST", "/v1/compact", json={"revision": revision}))

    # ------------------------------------------------------------------------------------- migration

    def migrate(
        self,
        workload: str,
        to: str,
        *,
        tenant: str | None = None,
        switch_timeout: float | None = None,
        wait: bool = False,
        **options: Any,
    ) -> Migration:
        """Start a live migration of `workload` to host `to` (the hypervisor then moves the vNIC and calls
        `switched`). `wait`: answer when it has ended. `options`: the API's other fields
        (`prepareTimeout`, `commandTimeout`, ...)."""
        tenant, name = _ref(workload, tenant)
        body: JSON = {"to": to, **options}
        if switch_timeout is not None:
            body["switchTimeout"] = switch_timeout
        if wait:
            body["wait"] = True
        path = f"/v1/workloads/{_seg(name)}/migrate"
        return Migration(**self.request("POST", path, params={"tenant": tenant}, json=body))

    def migration(self, workload: str, *, tenant: str | None = None) -> Migration:
        """The workload's current or last migration (ClientError 404 when it never migrated)."""
        tenant, name = _ref(workload, tenant)
        path = f"/v1/workloads/{_seg(name)}/migration"
        return Migration(**self.request("GET", path, params={"tenant": tenant}))

    def switched(self, workload: str, migration_id: str, *, tenant: str | None = None) -> Migration:
        """The hypervisor's call: the workload's vNIC is on the destination now."""
        tenant, name = _ref(workload, tenant)
        path = f"/v1/workloads/{_seg(name)}/migrate/{_seg(migration_id)}/switched"
        return Migration(**self.request("POST", path, params={"tenant": tenant}))

    def wait_migration(
        self,
        workload: str,
        *,
        tenant: str | None = None,
        migration_id: str | None = None,
        timeout: float = 300.0,
        poll: float = 0.2,
        on_phase: Callable[[JSON], None] | None = None,
    ) -> Migration:
        """Follow a migration until it ends (result no longer `running`); `on_phase` sees each phase
        record `{phase, at, ms}` once. ClientError (status None) after `timeout` s."""
        deadline = time.monotonic() + timeout
        shown = 0
        while True:
            rec = self.migration(workload, tenant=tenant)
            if migration_id is not None and rec.get("id") != migration_id:
                self._fail(
                    ClientError(f"migration {migration_id} of {workload} was replaced by {rec.get('id')}")
                )
            phases = rec.get("phases", [])
            for ph in phases[shown:] if on_phase else ():
                on_phase(ph)
            shown = len(phases)
            if rec.get("result") != "running":
                return rec
            if time.monotonic() > deadline:
                self._fail(
                    ClientError(
                        f"migration {rec.get('id')} still in phase {rec.get('phase')} after {timeout:g} s"
                    )
                )
            time.sleep(poll)

    # ------------------------------------------------------------------------------------- insight

    def explain(self, src: str, dst: str, proto: str = "tcp", port: int | None = None) -> JSON:
        """Would a connection from `src` to `dst` (workloads `tenant/name` or addresses) be allowed now?
        Each hop, its verdict and the deciding rule."""
        return dict(
            self.request("GET", "/v1/explain", params={"from": src, "to": dst, "proto": proto, "port": port})
        )

    def members(self, group: str, *, tenant: str | None = None) -> JSON:
        tenant, name = _ref(group, tenant)
        return dict(self.request("GET", f"/v1/groups/{_seg(name)}/members", params={"tenant": tenant}))

    def realization(self, policy: str, *, tenant: str | None = None) -> JSON:
        tenant, name = _ref(policy, tenant)
        return dict(self.request("GET", f"/v1/policies/{_seg(name)}/realization", params={"tenant": tenant}))

    # ------------------------------------------------------------------------------------- events

    def identity_event(self, workload: str, user: str, action: str, *, tenant: str | None = None) -> JSON:
        """A user logged in to (`action="login"`) or out of (`"logout"`) a workload (`tenant/name`, or a
        name unique across tenants)."""
        body = {
            "workload": workload,
            "user": user,
            "action": action,
            **({"tenant": tenant} if tenant else {}),
        }
        return dict(self.request("POST", "/v1/identity/events", json=body))

    def posture_report(self, workload: str, facts: Mapping[str, Any], *, tenant: str | None = None) -> JSON:
        """A scanner's facts about a workload (`{"av.status": "infected"}`; None removes a fact)."""
        body = {"workload": workload, **({"tenant": tenant} if tenant else {}), **facts}
        return dict(self.request("POST", "/v1/posture/reports", json=body))

    # ------------------------------------------------------------------------------------- audit, flows

    def audit(self, *, limit: int = 100, cont: str | None = None, **filters: Any) -> JSON:
        """One page of the audit log, oldest first: `{items, continue}`. Filters: tenant, actor, kind,
        name, since, until."""
        return dict(self.request("GET", "/v1/audit", params={**filters, "limit": limit, "continue": cont}))

    def audit_verify(self) -> JSON:
        return dict(self.request("GET", "/v1/audit/verify"))

    def watch_audit(self, **filters: Any) -> Iterator[JSON]:
        """Audit entries as they are committed (Server-Sent Events), until the stream ends or the caller
        stops iterating. Filters: tenant, kind, since (RFC 3339 or relative: 5m), limit."""
        for event, data in self._stream("/v1/audit/watch", filters):
            if event == "audit":
                yield data

    def flows(self, **filters: Any) -> JSON:
        """Flow records, newest first: `{items, ...}` (filters as `GET /v1/flows`)."""
        return dict(self.request("GET", "/v1/flows", params=filters))

    def watch_flows(self, **filters: Any) -> Iterator[tuple[str, JSON]]:
        """(`flow` | `stats`, data) as the manager sees them (`GET /v1/flows/watch`)."""
        yield from self._stream("/v1/flows/watch", filters)

    # ------------------------------------------------------------------------------------- tokens

    def create_token(
        self,
        role: str,
        *,
        tenant: str | None = None,
        host: str | None = None,
        name: str | None = None,
        expires: str | None = None,
    ) -> JSON:
        """A new token; the answer's `token` is the secret, shown this once."""
        body = {"role": role, "tenant": tenant, "host": host, "name": name, "expires": expires}
        return dict(self.request("POST", "/v1/tokens", json={k: v for k, v in body.items() if v}))

    def list_tokens(self) -> list[JSON]:
        return list(self.request("GET", "/v1/tokens")["items"])

    def rotate_token(self, token_id: str) -> JSON:
        return dict(self.request("POST", f"/v1/tokens/{_seg(token_id)}/rotate"))

    def revoke_token(self, token_id: str) -> None:
        self.request("DELETE", f"/v1/tokens/{_seg(token_id)}")


def _ref(ref: str, tenant: str | None) -> tuple[str | None, str]:
    try:
        return split_ref(ref, tenant)
    except ValueError as e:
        raise ClientError(str(e)) from None


def _params(params: Mapping[str, Any] | None) -> dict[str, Any] | None:
    # httpx sends `continue=` for None; the API would read that as a token
    return {k: v for k, v in params.items() if v is not None} if params else None


def _retriable(e: httpx.HTTPError, method: str) -> bool:
    """A connection that failed before the request went out, or any transport failure of an idempotent
    request; never a certificate the client rejects or a URL it cannot use (retrying cannot help)."""
    if isinstance(e, httpx.UnsupportedProtocol) or _tls_rejected(e):
        return False
    if isinstance(e, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout):
        return True
    return method in IDEMPOTENT and isinstance(e, httpx.TransportError)


def _tls_rejected(e: BaseException) -> bool:
    seen: BaseException | None = e
    for _ in range(5):  # httpx wraps httpcore's error, which wraps the ssl module's
        if seen is None:
            return False
        if isinstance(seen, ssl.SSLError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _retry_after(resp: httpx.Response) -> float | None:
    """Seconds to wait before a retry the manager asked for (503: the store is unavailable); else None.
    A 4xx (429 too) is never retried: the request itself, or its token, is the problem."""
    if resp.status_code != 503:
        return None
    raw = resp.headers.get("retry-after")
    if raw is None:
        return 1.0
    try:
        return max(0.0, float(raw))
    except ValueError:
        return None  # an HTTP date: not sent by the manager


def _error_of(resp: httpx.Response) -> ClientError:
    try:
        body = resp.json()
    except ValueError:
        return ClientError(resp.text.strip()[:500] or resp.reason_phrase, status=resp.status_code)
    if not isinstance(body, dict):
        return ClientError(str(body)[:500], status=resp.status_code)
    msg = body.get("message") or body.get("detail") or resp.reason_phrase
    return ClientError(str(msg), status=resp.status_code, errors=body.get("errors") or [], body=body)


__all__ = ["COLLECTIONS", "JSON", "NO_RETRY", "Client", "Migration", "Retry", "kind_of", "split_ref"]
