"""The gateway's LLM endpoint on real unix sockets: tokens, models, budgets, exact metering."""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from accounting.config import configs_dir
from accounting.errors import SandboxError
from accounting.pricing import load_pricing
from sandbox.credentials import AttemptRef
from sandbox.gateway import AttemptChannel, AttemptGrant, Gateway
from sandbox.gateway_thread import GatewayThread, UnixHTTPConnection
from sandbox.providers import count_input_tokens, count_tokens
from sandbox.recorder import MemorySink
from sandbox.scripted import ScriptedProvider
from scheduler.budget import BudgetBook, BudgetClient, Caps

REF = AttemptRef("team-a", "b1", "t1", 1)
PRICES = load_pricing()
IN, CACHED, OUT = 400, 100, 1600  # nano-USD per token of `scripted` (priced like gpt-4.1-mini)


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
    def __init__(self, root: Path, caps: Caps) -> None:
        self.root = root
        self.sink = MemorySink()
        self.book = BudgetBook(lambda ref: caps)
        self.refused: list[AttemptRef] = []
        self.script = ScriptedProvider.from_file(
            configs_dir() / "scripts" / "test.yaml", name="scripted", models=["scripted"]
        )
        self.thread = GatewayThread(self._build).start()
        self.channels: dict[AttemptRef, AttemptChannel] = {}

    def _build(self) -> Gateway:
        from sandbox.credentials import TaskCredentials

        return Gateway(
            self.root,
            credentials=TaskCredentials(),
            providers={"scripted": self.script},
            budget=BudgetClient.local(self.book),
            sink=self.sink,
            prices=PRICES,
            node="node-1",
            on_budget_refused=lambda ref, e: self.refused.append(ref),
        )

    def open(
        self, ref: AttemptRef = REF, models: tuple[str, ...] = ("scripted",)
    ) -> AttemptChannel:
        grant = AttemptGrant(ref, deadline=time.time() + 600, models=models, task_type="fix")
        self.channels[ref] = self.thread.open_attempt(grant)
        return self.channels[ref]

    def close(self) -> None:
        self.thread.stop()


@pytest.fixture
def gw_root() -> Iterator[Path]:
    """A short directory for the sockets (a unix socket path must stay under ~100 bytes)."""
    root = Path(tempfile.mkdtemp(prefix="sfgw-", dir="/tmp"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def harness(request: pytest.FixtureRequest, gw_root: Path) -> Iterator[Harness]:
    h = Harness(gw_root, getattr(request, "param", Caps(task=10**9)))
    yield h
    h.close()


def call(
    channel: AttemptChannel,
    body: dict[str, Any] | None,
    *,
    token: str | None = None,
    method: str = "POST",
    path: str = "/v1/chat/completions",
) -> tuple[int, bytes]:
    conn = UnixHTTPConnection(channel.socket)
    try:
        headers = {"Authorization": f"Bearer {token or channel.token}"}
        data = json.dumps(body).encode() if body is not None else None
        if data is not None:
            headers["Content-Type"] = "application/json"
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def chat(prompt: str, **extra: Any) -> dict[str, Any]:
    return {
        "model": "scripted",
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": prompt},
        ],
        **extra,
    }


def sse_events(raw: bytes) -> list[Any]:
    out = []
    for block in raw.decode().split("\n\n"):
        if block.startswith("data: "):
            data = block[len("data: ") :]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def llm_events(h: Harness, n: int = 1) -> list[dict[str, Any]]:
    return wait_for_events(h.thread, h.sink, "llm_call", n)


def test_socket_directory_and_socket_belong_to_the_sandbox_user_only(harness: Harness) -> None:
    ch = harness.open()
    d, s = os.stat(ch.directory), os.stat(ch.socket)
    assert stat.S_IMODE(d.st_mode) == 0o700 and stat.S_IMODE(s.st_mode) == 0o600
    assert (d.st_uid, s.st_uid) == (10001, 10001)
    assert stat.S_ISSOCK(s.st_mode)
    assert (ch.directory / "token").read_text() == ch.token
    assert ch.volumes() == {str(ch.directory): {"bind": "/run/sandfleet", "mode": "ro"}}


def test_chat_completion_returns_the_scripted_reply_with_exact_tokens_and_cost(
    harness: Harness,
) -> None:
    ch = harness.open()
    status, raw = call(ch, chat("say hello"))
    assert status == 200, raw
    reply = json.loads(raw)
    assert reply["choices"][0]["message"]["content"] == "Hello from the scripted model!"
    # input: (1 + ceil(14/4)) + (1 + ceil(9/4)) = 5 + 4 = 9; output: ceil(30/4) = 8
    assert reply["usage"]["prompt_tokens"] == 9 and reply["usage"]["completion_tokens"] == 8
    [event] = llm_events(harness)
    assert (event["input_uncached"], event["output"], event["status"]) == (9, 8, 200)
    assert event["cost_nusd"] == 9 * IN + 8 * OUT == 16_400
    assert event["price_version"] == PRICES.price_version
    charges = {c.usage_bucket: c for c in harness.sink.charges()}
    assert set(charges) == {"input_uncached", "output"}
    assert charges["output"].cost_nusd == 12_800 and charges["output"].quantity == 8
    assert charges["input_uncached"].price_version == PRICES.price_version
    assert harness.book.spent("task", "b1/t1") == 16_400


def test_cached_system_prompt_is_charged_as_cache_reads_from_turn_two(harness: Harness) -> None:
    ch = harness.open()
    body = chat("say hello")
    body["messages"] += [
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "again"},
    ]
    assert call(ch, body)[0] == 200
    [event] = llm_events(harness)
    assert event["input_cache_read"] == 5  # the system message: 1 + ceil(14/4)
    assert event["input_uncached"] == count_input_tokens(body["messages"]) - 5
    assert event["cost_nusd"] == 5 * CACHED + event["input_uncached"] * IN + 1 * OUT


def test_streamed_chat_counts_usage_exactly_once_and_strips_it_when_not_asked(
    harness: Harness,
) -> None:
    ch = harness.open()
    for include_usage in (True, False):
        extra: dict[str, Any] = {"stream": True}
        if include_usage:
            extra["stream_options"] = {"include_usage": True}
        status, raw = call(ch, chat("stream please", **extra))
        assert status == 200
        events = sse_events(raw)
        assert events[-1] == "[DONE]"
        chunks = events[:-1]
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
        assert text == "one two three four five six seven eight nine ten"
        usage_chunks = [c for c in chunks if c.get("usage")]
        assert len(usage_chunks) == (1 if include_usage else 0)
        assert all(c["choices"] for c in chunks) != include_usage
    tokens = [(e["input_uncached"], e["output"], e["stream"]) for e in llm_events(harness, 2)]
    assert tokens == [(5 + 5, 12, True)] * 2  # never summed twice
    assert harness.book.spent("task", "b1/t1") == 2 * (10 * IN + 12 * OUT)


def test_models_lists_only_the_models_the_task_may_use(harness: Harness) -> None:
    ch = harness.open()
    status, raw = call(ch, None, method="GET", path="/v1/models")
    assert status == 200
    assert [m["id"] for m in json.loads(raw)["data"]] == ["scripted"]
    assert call(ch, None, method="GET", path="/v1/models/scripted")[0] == 200
    assert call(ch, None, method="GET", path="/v1/models/gpt-4o")[0] == 404


def test_a_model_the_task_may_not_use_gets_404(harness: Harness) -> None:
    ch = harness.open()
    status, raw = call(ch, {**chat("say hello"), "model": "gpt-4o"})
    assert status == 404
    assert json.loads(raw)["error"]["code"] == "model_not_found"
    assert harness.book.spent("task", "b1/t1") == 0


def test_missing_forged_or_foreign_tokens_get_401_and_are_recorded(harness: Harness) -> None:
    mine = harness.open()
    other = harness.open(AttemptRef("team-a", "b1", "t2", 1))
    assert call(mine, chat("say hello"), token="not-a-token")[0] == 401
    status, raw = call(mine, chat("say hello"), token=other.token)  # replay on another socket
    assert status == 401
    assert "not to this socket" in json.loads(raw)["error"]["message"]
    assert other.token not in raw.decode()
    assert [e["status"] for e in llm_events(harness, 2)] == [401, 401]
    assert harness.book.spent("task", "b1/t1") == 0


def test_a_closed_attempt_refuses_its_token_and_removes_its_socket(harness: Harness) -> None:
    ch = harness.open()
    harness.thread.close_attempt(REF)
    assert not ch.directory.exists()
    with pytest.raises(OSError):
        call(ch, chat("say hello"))


@pytest.mark.parametrize("harness", [Caps(task=7 * IN + 3 * OUT)], indirect=True, ids=["caps"])
def test_output_cap_is_cut_to_what_the_budget_can_pay(harness: Harness) -> None:
    ch = harness.open()
    status, raw = call(ch, chat("long"))  # input 5 + 2 tokens; a 100-byte reply = 25 wanted
    assert status == 200
    reply = json.loads(raw)
    assert reply["choices"][0]["finish_reason"] == "length"
    assert count_tokens(reply["choices"][0]["message"]["content"]) == 3
    [event] = llm_events(harness)
    assert event["output_cap"] == 3 and event["output"] == 3
    assert harness.book.spent("task", "b1/t1") == 7 * IN + 3 * OUT  # exactly the cap


@pytest.mark.parametrize("harness", [Caps(task=9 * IN)], indirect=True, ids=["caps"])
def test_a_refused_reservation_gets_402_naming_the_cap(harness: Harness) -> None:
    ch = harness.open()
    status, raw = call(ch, chat("say hello"))
    assert status == 402
    err = json.loads(raw)["error"]
    assert err["code"] == "budget_exceeded" and err["type"] == "insufficient_quota"
    assert "task b1/t1 cap" in err["message"]
    assert harness.refused == [REF]
    [event] = llm_events(harness)
    assert event["status"] == 402 and event["cost_nusd"] == 0


@pytest.mark.parametrize("harness", [Caps(task=100_000)], indirect=True, ids=["caps"])
def test_fifty_concurrent_calls_at_the_budget_edge_never_exceed_the_cap(harness: Harness) -> None:
    ch = harness.open()
    start = threading.Barrier(50)

    def one(_: int) -> int:
        start.wait()
        return call(ch, chat("say hello", max_tokens=10))[0]

    with ThreadPoolExecutor(50) as pool:
        statuses = list(pool.map(one, range(50)))
    assert set(statuses) <= {200, 402} and 402 in statuses
    spent = harness.book.spent("task", "b1/t1")
    harness.thread.flush()
    charged = sum(c.cost_nusd for c in harness.sink.charges())
    assert spent == charged <= 100_000
    assert statuses.count(200) == spent // 16_400
    assert harness.book.held("task", "b1/t1") == 0


def test_the_task_token_in_a_prompt_is_redacted_before_it_goes_upstream(harness: Harness) -> None:
    ch = harness.open()
    seen: list[Any] = []
    original = harness.script.complete

    async def spy(request: Any) -> Any:
        seen.append(json.dumps(request.body))
        return await original(request)

    harness.script.complete = spy  # type: ignore[method-assign]
    assert call(ch, chat(f"my key is {ch.token}"))[0] == 200
    assert ch.token not in seen[0] and "[REDACTED]" in seen[0]


def test_bad_requests_get_openai_style_400s(harness: Harness) -> None:
    ch = harness.open()
    assert call(ch, {"model": "scripted"})[0] == 400
    assert call(ch, chat("say hello", max_tokens=0))[0] == 400
    status, raw = call(ch, None, method="GET", path="/v1/other")
    assert status == 404 and "error" in json.loads(raw)


def test_when_the_ledger_cannot_record_calls_are_refused(harness: Harness) -> None:
    ch = harness.open()

    def broken(table: str, rows: Any) -> None:
        raise OSError("disk full")

    harness.sink.append = broken  # type: ignore[method-assign]
    assert call(ch, chat("say hello"))[0] == 200  # this call's rows cannot be written ...
    with pytest.raises(Exception, match="cannot record to the ledger"):
        harness.thread.flush()
    status, raw = call(ch, chat("say hello"))  # ... so the next call is refused
    assert status == 503 and b"metering_unavailable" in raw
    del harness.sink.append  # the ledger is back: nothing recorded so far was lost
    assert [e["status"] for e in llm_events(harness, 2)] == [200, 503]
    assert len(harness.sink.charges()) == 2
    assert call(ch, chat("say hello"))[0] == 200


def test_an_unknown_model_cannot_be_granted(harness: Harness) -> None:
    with pytest.raises(SandboxError, match="no provider serves"):
        harness.open(models=("gpt-4o",))
