"""A stand-in manager that speaks only the agent's wire format (feed + status), for tests and benchmarks.

It is a real HTTP server on a real socket (stdlib `http.server`, one thread per connection), so the agent
under test runs its real httpx client, timeouts and reconnects. It can be stopped (listener and every live
feed connection closed at once: "the manager went away") and started again on the same port with the same
states. Not a manager: no store, no compiler, no auth beyond a per-host token.

    fm = FakeManager(tokens={"h1": "secret"}); fm.start()
    fm.publish(state)                      # a HostDesiredState; connected feeds get the delta
    fm.inject("h1", {"type": "delta", ...})  # any line, e.g. a delta with a gap
    fm.statuses["h1"][-1]                  # last status body the agent posted
    fm.flow_batches["h1"]                  # FlowBatch bodies the agent posted
    fm.stop(); fm.start()
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from omniwall.compiler.ir import HostDesiredState, diff


class FakeManager:
    def __init__(
        self,
        tokens: dict[str, str] | None = None,
        port: int = 0,
        heartbeat: float = 1.0,
        snapshot_always: bool = False,
    ) -> None:
        self.tokens = dict(tokens or {})  # host -> token; a host missing here accepts any token
        self.port = port
        self.heartbeat = heartbeat
        self.snapshot_always = snapshot_always  # answer every connection with a snapshot
        self.states: dict[str, HostDesiredState] = {}
        self.history: dict[str, list[dict[str, Any]]] = {}  # host -> deltas (JSON), oldest first
        self.live: dict[str, list[str]] = {}  # host -> lines sent to connected feeds, in order
        self.statuses: dict[str, list[dict[str, Any]]] = {}
        self.flow_batches: dict[str, list[dict[str, Any]]] = {}  # host -> FlowBatch bodies posted
        self.flows_status = 204  # what POST /v1/hosts/{host}/flows answers (tests set 503, 413, ...)
        self.feed_requests: list[tuple[str, int]] = []  # (host, from) per feed request, refused ones too
        self._cond = threading.Condition()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._conns: set[socket.socket] = set()
        self._generation = 0  # bumped by stop(): feed loops of the old server end

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # ---- control
    def start(self) -> None:
        server = _Server(("127.0.0.1", self.port), _handler(self))
        server.daemon_threads = True
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        with self._cond:
            self._generation += 1
            for conn in list(self._conns):
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
            self._conns.clear()
            self._cond.notify_all()
        self._server = None

    def publish(self, state: HostDesiredState) -> None:
        with self._cond:
            prev = self.states.get(state.host)
            self.states[state.host] = state
            if prev is not None:
                delta = diff(prev, state).to_json()
                self.history.setdefault(state.host, []).append(delta)
                self._send_live(state.host, {"type": "delta", "delta": delta})
            else:
                self._send_live(state.host, self._snapshot(state))

    def inject(self, host: str, message: dict[str, Any]) -> None:
        with self._cond:
            self._send_live(host, message)

    def last_status(self, host: str) -> dict[str, Any] | None:
        with self._cond:
            posted = self.statuses.get(host)
            return posted[-1] if posted else None

    # ---- internals (called with the lock held)
    def _send_live(self, host: str, message: dict[str, Any]) -> None:
        self.live.setdefault(host, []).append(json.dumps(message))
        self._cond.notify_all()

    @staticmethod
    def _snapshot(state: HostDesiredState) -> dict[str, Any]:
        return {"type": "snapshot", "revision": state.revision, "state": state.to_json()}

    def _opening(self, host: str, from_revision: int) -> list[str]:
        """Lines that bring an agent at `from_revision` up to date."""
        state = self.states.get(host)
        if state is None:
            return []
        if from_revision == state.revision and not self.snapshot_always:
            return []
        deltas = self.history.get(host, [])
        starts = [i for i, d in enumerate(deltas) if d["from_revision"] == from_revision]
        if from_revision == 0 or not starts or self.snapshot_always:
            return [json.dumps(self._snapshot(state))]
        return [json.dumps({"type": "delta", "delta": d}) for d in deltas[starts[0] :]]


class _Server(ThreadingHTTPServer):
    request_queue_size = 1024  # the stdlib's 5 makes a thousand agents connecting at once retry SYNs


def _handler(fm: FakeManager) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"  # the feed ends when the connection does

        def log_message(self, format: str, *args: Any) -> None:  # quiet tests
            return

        def _host(self, suffix: str) -> str | None:
            parts = urlsplit(self.path).path.strip("/").split("/")
            if len(parts) == 4 and parts[:2] == ["v1", "hosts"] and parts[3] == suffix:
                return parts[2]
            return None

        def _authorized(self, host: str) -> bool:
            want = fm.tokens.get(host)
            if want is None or self.headers.get("Authorization") == f"Bearer {want}":
                return True
            self.send_error(401, "bad token")
            return False

        def do_POST(self) -> None:
            host = self._host("status")
            flows = self._host("flows")
            if flows is not None:
                self._flows(flows)
                return
            if host is None:
                self.send_error(404)
                return
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            if not self._authorized(host):
                return
            with fm._cond:
                fm.statuses.setdefault(host, []).append(body)
            self.send_response(204)
            self.end_headers()

        def _flows(self, host: str) -> None:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            if not self._authorized(host):
                return
            if fm.flows_status != 204:  # tests: a manager that refuses or fails
                self.send_error(fm.flows_status)
                return
            with fm._cond:
                fm.flow_batches.setdefault(host, []).append(body)
            self.send_response(204)
            self.end_headers()

        def do_GET(self) -> None:
            host = self._host("feed")
            if host is None:
                self.send_error(404)
                return
            from_revision = int(parse_qs(urlsplit(self.path).query).get("from", ["0"])[0])
            with fm._cond:
                fm.feed_requests.append((host, from_revision))
            if not self._authorized(host):
                return
            with fm._cond:
                generation = fm._generation
                pending = fm._opening(host, from_revision)
                seen = len(fm.live.get(host, []))
                fm._conns.add(self.connection)
            self.send_response(200)
            self.send_header("Content-Type", "application/x-ndjson")
            self.end_headers()
            try:
                while True:
                    for line in pending:
                        self.wfile.write(line.encode() + b"\n")
                    self.wfile.flush()
                    with fm._cond:
                        fm._cond.wait_for(
                            lambda n=seen: len(fm.live.get(host, [])) > n or fm._generation != generation,
                            timeout=fm.heartbeat,
                        )
                        if fm._generation != generation:
                            return
                        lines = fm.live.get(host, [])
                        pending, seen = lines[seen:], len(lines)
                    if not pending:
                        with fm._cond:
                            state = fm.states.get(host)
                        revision = state.revision if state is not None else 0
                        pending = [json.dumps({"type": "heartbeat", "revision": revision})]
            except OSError:
                return  # the agent went away
            finally:
                with fm._cond:
                    fm._conns.discard(self.connection)

    return Handler


__all__ = ["FakeManager"]
