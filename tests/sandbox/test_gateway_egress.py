"""The egress proxy on real sockets: allowlisted targets reached, others 403 and never touched.

Every target is an HTTP server this test starts on loopback; the gateway's resolver maps
test names to it, so no other address is ever contacted.
"""

from __future__ import annotations

import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from accounting.pricing import load_pricing
from sandbox.credentials import AttemptRef, TaskCredentials
from sandbox.egress import Resolver
from sandbox.gateway import AttemptChannel, AttemptGrant, Gateway
from sandbox.gateway_thread import GatewayThread, UnixHTTPConnection
from sandbox.recorder import MemorySink
from scheduler.budget import BudgetBook, BudgetClient, Caps

REF = AttemptRef("team-a", "b1", "t1", 1)
BIG = 5 * 1024 * 1024


class Target(BaseHTTPRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        body = b"x" * BIG if self.path == "/big" else f"hello from {self.path}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class CountingServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Target)
        self.accepted = 0
        self.seen_headers: list[str] = []

    def get_request(self) -> tuple[socket.socket, Any]:
        self.accepted += 1
        return super().get_request()


class Harness:
    def __init__(self, root: Path) -> None:
        self.allowed, self.denied = CountingServer(), CountingServer()
        for s in (self.allowed, self.denied):
            threading.Thread(target=s.serve_forever, args=(0.05,), daemon=True).start()
        self.a_port = self.allowed.server_address[1]
        self.d_port = self.denied.server_address[1]
        self.root = root
        self.sink = MemorySink()
        self.book = BudgetBook(lambda ref: Caps(task=10**9))
        self.thread = GatewayThread(self._build).start()
        grant = AttemptGrant(
            REF, deadline=time.time() + 600, egress=(f"allowed.test:{self.a_port}", "localhost")
        )
        self.channel: AttemptChannel = self.thread.open_attempt(grant)

    def _build(self) -> Gateway:
        resolver = Resolver({"allowed.test": "127.0.0.1", "denied.test": "127.0.0.1"})
        return Gateway(
            self.root,
            credentials=TaskCredentials(),
            providers={},
            budget=BudgetClient.local(self.book),
            sink=self.sink,
            prices=load_pricing(),
            resolver=resolver,
        )

    def close(self) -> None:
        self.thread.stop()
        for s in (self.allowed, self.denied):
            s.shutdown()
            s.server_close()

    def get(self, url: str) -> tuple[int, bytes]:
        conn = UnixHTTPConnection(self.channel.socket, role="proxy")
        try:
            conn.request("GET", url)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def connect(self, target: str) -> tuple[socket.socket, bytes]:
        sock = socket.socket(socket.AF_UNIX)
        sock.settimeout(30)
        sock.connect(str(self.channel.socket))
        sock.sendall(b"SANDFLEET/1 proxy\r\n" + f"CONNECT {target} HTTP/1.1\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            data = sock.recv(4096)
            if not data:
                break
            head += data
        return sock, head

    def decisions(self, n: int = 1) -> list[dict[str, Any]]:
        """The egress decisions, once at least `n` were recorded (a connection is recorded
        when it ends, which may be just after the client saw its last byte)."""
        deadline = time.monotonic() + 10
        while True:
            self.thread.flush()
            found = [dict(e.payload) for e in self.sink.events("egress_decision")]
            if len(found) >= n or time.monotonic() > deadline:
                return found
            time.sleep(0.01)


@pytest.fixture
def gw_root() -> Iterator[Path]:
    """A short directory for the sockets (a unix socket path must stay under ~100 bytes)."""
    root = Path(tempfile.mkdtemp(prefix="sfgw-", dir="/tmp"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def h(gw_root: Path) -> Iterator[Harness]:
    harness = Harness(gw_root)
    yield harness
    harness.close()


def read_all(sock: socket.socket) -> bytes:
    out = bytearray()
    while data := sock.recv(1 << 16):
        out += data
    return bytes(out)


def test_plain_http_to_an_allowlisted_host_is_relayed_and_metered(h: Harness) -> None:
    status, body = h.get(f"http://allowed.test:{h.a_port}/hello?x=1")
    assert (status, body) == (200, b"hello from /hello?x=1")
    [d] = h.decisions()
    assert (d["host"], d["port"], d["allowed"], d["reason"]) == (
        "allowed.test",
        h.a_port,
        True,
        "allowlisted",
    )
    assert d["bytes_up"] > 0 and d["bytes_down"] > len(body)
    [charge] = h.sink.charges()
    assert (charge.usage_bucket, charge.quantity) == ("egress", d["bytes_up"])
    per_byte = Decimal("0.09") * 10**9 / 2**30
    assert charge.cost_nusd == round(d["bytes_up"] * per_byte)
    assert h.book.spent("task", "b1/t1") == charge.cost_nusd


def test_connect_tunnels_to_an_allowlisted_host_and_counts_bytes(h: Harness) -> None:
    sock, head = h.connect(f"allowed.test:{h.a_port}")
    with sock:
        assert head.startswith(b"HTTP/1.1 200")
        request = b"GET /big HTTP/1.1\r\nHost: allowed.test\r\nConnection: close\r\n\r\n"
        sock.sendall(request)
        response = read_all(sock)
    assert response.startswith(b"HTTP/1.0 200") and response.endswith(b"x" * 100)
    [d] = h.decisions()
    assert d["allowed"] and d["bytes_up"] == len(request) and d["bytes_down"] == len(response)


@pytest.mark.parametrize(
    "how",
    [
        "plain http",
        "connect",
        "literal address",
        "allowed host, other port",
        "resolves to loopback",
    ],
)
def test_a_target_off_the_allowlist_gets_403_and_is_never_contacted(h: Harness, how: str) -> None:
    if how == "plain http":
        status, body = h.get(f"http://denied.test:{h.d_port}/secret")
        assert status == 403 and b"not allowed for this task" in body
    else:
        target = {
            "connect": f"denied.test:{h.d_port}",
            "literal address": f"127.0.0.1:{h.d_port}",
            "allowed host, other port": f"allowed.test:{h.d_port}",
            "resolves to loopback": "localhost:443",
        }[how]
        sock, head = h.connect(target)
        sock.close()
        assert head.startswith(b"HTTP/1.1 403")
    [d] = h.decisions()
    assert d["allowed"] is False and d["bytes_up"] == d["bytes_down"] == 0
    expected = "blocked_address" if how == "resolves to loopback" else "not_allowlisted"
    assert d["reason"] == expected
    assert h.denied.accepted == 0 and h.allowed.accepted == 0
    assert h.sink.charges() == []


def test_a_request_that_is_not_a_proxy_request_gets_400(h: Harness) -> None:
    status, _ = h.get("/relative/path")
    assert status == 400
    assert h.decisions()[0]["reason"] == "bad_request"


def test_after_the_attempt_ends_the_proxy_is_gone(h: Harness) -> None:
    h.thread.close_attempt(REF)
    with pytest.raises(OSError):
        h.get(f"http://allowed.test:{h.a_port}/hello")
    assert h.allowed.accepted == 0
