"""The `openai` provider behind the gateway, against the test's own fake upstream on loopback.

Proves: the real key reaches upstream and is redacted from everything sent back, the
task token never goes upstream, streamed usage is counted once, and an upstream that
returns 500, garbage or hangs gives the agent a clear error, is recorded, and does not
stop the gateway serving other calls.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from accounting.pricing import load_pricing
from sandbox.credentials import AttemptRef, TaskCredentials
from sandbox.gateway import AttemptChannel, AttemptGrant, Gateway
from sandbox.gateway_thread import GatewayThread, UnixHTTPConnection
from sandbox.openai_provider import OpenAIProvider
from sandbox.providers import Provider, ProviderConfig
from sandbox.recorder import MemorySink
from scheduler.budget import BudgetBook, BudgetClient, Caps

KEY = "sk-real-upstream-secret-0123456789"
REF = AttemptRef("team-a", "b1", "t1", 1)
MODES = {  # model -> the fake upstream's behaviour
    "gpt-4.1-mini": "ok",
    "gpt-4.1-nano": "stream",
    "gpt-4o-mini": "e500",
    "gpt-4o": "garbage",
    "gpt-5-mini": "garbage_stream",
    "o3": "hang",
    "o4-mini": "nousage",
}
USAGE = {
    "prompt_tokens": 11,
    "completion_tokens": 7,
    "total_tokens": 18,
    "prompt_tokens_details": {"cached_tokens": 3},
    "completion_tokens_details": {"reasoning_tokens": 2},
}
COST = 8 * 400 + 3 * 100 + 5 * 1600 + 2 * 1600  # gpt-4.1-mini per-token prices, nano-USD


class Upstream(BaseHTTPRequestHandler):
    seen: list[dict[str, Any]]
    release: threading.Event

    def log_message(self, *args: Any) -> None:
        pass

    def _send(self, status: int, body: bytes, ctype: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        mode = self.path.split("/")[1]
        self.seen.append({"mode": mode, "headers": dict(self.headers), "body": body.decode()})
        echo = f"upstream saw {self.headers['Authorization']}"
        completion = {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "model": "gpt-4.1-mini",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": echo},
                    "finish_reason": "stop",
                }
            ],
            "usage": USAGE,
        }
        if mode == "ok":
            self._send(200, json.dumps(completion).encode())
        elif mode == "nousage":
            del completion["usage"]
            self._send(200, json.dumps(completion).encode())
        elif mode == "e500":
            self._send(500, json.dumps({"error": {"message": f"exploded ({echo})"}}).encode())
        elif mode == "garbage":
            self._send(200, b"<html>this is not json</html>", "text/html")
        elif mode == "hang":
            self.release.wait(30)
        else:
            chunks = [
                {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
                {"choices": [{"index": 0, "delta": {"content": echo}}]},
                {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
                {"choices": [], "usage": USAGE},
            ]
            lines = [f"data: {json.dumps(c)}\n\n" for c in chunks] + ["data: [DONE]\n\n"]
            if mode == "garbage_stream":
                lines = [*lines[:2], "data: {not json\n\n"]
            self._send(200, "".join(lines).encode(), "text/event-stream")


def wait_for_events(thread: GatewayThread, sink: MemorySink, kind: str, n: int) -> list[Any]:
    """The payloads of `kind` events once at least `n` were recorded (deadline 10 s)."""
    deadline = time.monotonic() + 10
    while True:
        thread.flush()
        found = [dict(e.payload) for e in sink.events(kind)]
        if len(found) >= n or time.monotonic() > deadline:
            return found
        time.sleep(0.01)


class Harness:
    def __init__(self, root: Path) -> None:
        Upstream.seen, Upstream.release = [], threading.Event()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()
        port = self.server.server_address[1]
        self.providers: dict[str, Provider] = {
            model: OpenAIProvider(
                ProviderConfig(
                    name=f"fake-{mode}",
                    kind="openai",
                    models=(model,),
                    base_url=f"http://127.0.0.1:{port}/{mode}/v1",
                    api_key_env="FAKE_KEY",
                    timeout_s=0.5,
                ),
                env={"FAKE_KEY": KEY},
            )
            for model, mode in MODES.items()
        }
        self.root = root
        self.sink = MemorySink()
        self.book = BudgetBook(lambda ref: Caps(task=10**9))
        self.thread = GatewayThread(self._build).start()
        grant = AttemptGrant(REF, deadline=time.time() + 600, models=tuple(MODES))
        self.channel: AttemptChannel = self.thread.open_attempt(grant)

    def _build(self) -> Gateway:
        return Gateway(
            self.root,
            credentials=TaskCredentials(),
            providers=self.providers,
            budget=BudgetClient.local(self.book),
            sink=self.sink,
            prices=load_pricing(),
        )

    def close(self) -> None:
        Upstream.release.set()
        self.thread.stop()
        self.server.shutdown()
        self.server.server_close()

    def call(self, model: str, **extra: Any) -> tuple[int, bytes]:
        conn = UnixHTTPConnection(self.channel.socket)
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}
        try:
            conn.request(
                "POST",
                "/v1/chat/completions",
                body=json.dumps(body),
                headers={"Authorization": f"Bearer {self.channel.token}"},
            )
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def events(self, n: int = 1) -> list[dict[str, Any]]:
        return wait_for_events(self.thread, self.sink, "llm_call", n)


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


def test_the_real_key_goes_upstream_and_is_redacted_from_the_reply(h: Harness) -> None:
    status, raw = h.call("gpt-4.1-mini")
    assert status == 200
    [seen] = Upstream.seen
    assert seen["headers"]["Authorization"] == f"Bearer {KEY}"
    assert h.channel.token not in json.dumps(seen)  # the task token never leaves the host
    assert KEY not in raw.decode() and "upstream saw Bearer [REDACTED]" in raw.decode()
    [event] = h.events()
    assert (event["input_uncached"], event["input_cache_read"]) == (8, 3)
    assert (event["output"], event["reasoning"], event["cost_nusd"]) == (5, 2, COST)
    assert h.book.spent("task", "b1/t1") == COST


def test_streams_ask_upstream_for_usage_and_count_it_once(h: Harness) -> None:
    status, raw = h.call("gpt-4.1-nano", stream=True)
    assert status == 200
    assert json.loads(Upstream.seen[0]["body"])["stream_options"] == {"include_usage": True}
    assert KEY not in raw.decode() and b"[REDACTED]" in raw
    assert b'"usage"' not in raw  # the agent did not ask for it
    [event] = h.events()
    assert (event["input_uncached"], event["output"], event["reasoning"]) == (8, 5, 2)
    assert event["estimated"] is False


def test_an_upstream_500_is_a_clear_error_recorded_without_the_key(h: Harness) -> None:
    status, raw = h.call("gpt-4o-mini")
    assert status == 502
    err = json.loads(raw)["error"]
    assert "returned HTTP 500" in err["message"] and "exploded" in err["message"]
    assert KEY not in raw.decode()
    [event] = h.events()
    assert event["status"] == 502 and KEY not in event["error"] and event["cost_nusd"] == 0
    assert h.book.held("task", "b1/t1") == 0  # the reservation was released


def test_an_upstream_answering_garbage_is_a_clear_error(h: Harness) -> None:
    status, raw = h.call("gpt-4o")
    assert status == 502
    assert "malformed response" in json.loads(raw)["error"]["message"]
    status, raw = h.call("gpt-5-mini", stream=True)
    assert status == 200  # the stream had started; the error arrives as an SSE event
    assert b'"error"' in raw and b"malformed stream chunk" in raw and b"[DONE]" not in raw
    statuses = [e["status"] for e in h.events(2)]
    assert statuses == [502, 502]


def test_an_upstream_that_hangs_times_out_while_others_are_served(h: Harness) -> None:
    with ThreadPoolExecutor(1) as pool:
        hanging = pool.submit(h.call, "o3")
        assert h.call("gpt-4.1-mini")[0] == 200  # served while the other call hangs
        status, raw = hanging.result(timeout=30)
    assert status == 504
    assert "did not answer within 0.5s" in json.loads(raw)["error"]["message"]
    by_model = {e["model"]: e["status"] for e in h.events(2)}
    assert by_model == {"gpt-4.1-mini": 200, "o3": 504}
    assert h.call("gpt-4.1-mini")[0] == 200  # and still serving afterwards


def test_an_answer_without_usage_is_priced_on_an_estimate(h: Harness) -> None:
    status, _ = h.call("o4-mini")
    assert status == 200
    [event] = h.events()
    assert event["estimated"] is True and event["input_uncached"] == 2  # 1 + ceil(2/4)
    statuses = {c.cost_status for c in h.sink.charges()}
    assert statuses == {"estimated"}
