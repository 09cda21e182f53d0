"""End to end in a real hardened sandbox: the UNMODIFIED openai SDK -> forwarder -> gateway.

The container is the project's hardened spec (`container_spec`: uid 10001, no
capabilities, no-new-privileges, the seccomp profile, read-only root, network none)
plus the attempt's socket directory and the forwarder, both mounted read-only. The
gateway writes real Parquet through `LedgerWriter`; the test reads it back with DuckDB
and checks the exact tokens and cost of each call. Egress targets are HTTP servers the
test starts on the host's loopback.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import duckdb
import pytest
from helpers import require_image

import sandbox.forwarder
from accounting.config import configs_dir
from accounting.pricing import load_pricing
from accounting.writer import LedgerWriter
from sandbox.container_spec import container_spec, sandbox_labels, sandbox_name
from sandbox.credentials import AttemptRef, TaskCredentials
from sandbox.egress import Resolver
from sandbox.gateway import AttemptGrant, Gateway
from sandbox.gateway_thread import GatewayThread
from sandbox.scripted import ScriptedProvider
from sandbox.templates import load_template
from scheduler.budget import BudgetBook, BudgetClient, Caps

pytestmark = [pytest.mark.docker, pytest.mark.slow]

AGENT = textwrap.dedent(
    """
    import json, os, socket, urllib.error, urllib.request
    import openai
    from openai import OpenAI

    out = {"env_has_key": os.environ.get("OPENAI_API_KEY", "").startswith("sft1.")}
    client = OpenAI(max_retries=0, timeout=30)
    system = {"role": "system", "content": "You are terse."}
    r = client.chat.completions.create(
        model="scripted", messages=[system, {"role": "user", "content": "say hello"}])
    out["plain"] = {"text": r.choices[0].message.content, "usage": r.usage.model_dump()}

    text, usage = "", None
    for chunk in client.chat.completions.create(
            model="scripted", messages=[system, {"role": "user", "content": "stream please"}],
            stream=True, stream_options={"include_usage": True}):
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
        if chunk.usage is not None:
            usage = chunk.usage.model_dump()
    out["stream"] = {"text": text, "usage": usage}
    out["models"] = [m.id for m in client.models.list()]

    try:
        client.chat.completions.create(
            model="scripted", messages=[{"role": "user", "content": "fail with 500"}])
    except openai.APIStatusError as e:
        out["upstream_error"] = {"status": e.status_code, "message": e.message}
    try:
        OpenAI(api_key="sft1.k1.forged.token", max_retries=0).chat.completions.create(
            model="scripted", messages=[{"role": "user", "content": "say hello"}])
    except openai.AuthenticationError as e:
        out["forged"] = e.status_code

    out["allowed"] = urllib.request.urlopen(os.environ["ALLOWED_URL"], timeout=30).read().decode()
    try:
        urllib.request.urlopen(os.environ["DENIED_URL"], timeout=30)
    except urllib.error.HTTPError as e:
        out["denied"] = e.code

    with socket.create_connection(("127.0.0.1", 3128), timeout=30) as s:
        s.sendall(f"CONNECT {os.environ['ALLOWED_HOSTPORT']} HTTP/1.1\\r\\n\\r\\n".encode())
        s.sendall(b"GET /tunnel HTTP/1.0\\r\\nHost: allowed.test\\r\\n\\r\\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    text = data.decode()
    out["tunnel"] = text.split("\\r\\n")[0] + " | " + text.split("\\r\\n\\r\\n")[-1]

    try:  # the host's loopback is not this sandbox's loopback
        socket.create_connection(("127.0.0.1", int(os.environ["ALLOWED_PORT"])), timeout=5)
        out["direct"] = "connected"
    except OSError as e:
        out["direct"] = type(e).__name__
    print(json.dumps(out))
    """
)


class Target(BaseHTTPRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        body = f"hello from {self.path}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class Counting(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Target)
        self.accepted = 0

    def get_request(self) -> Any:
        self.accepted += 1
        return super().get_request()


@pytest.fixture
def servers() -> Iterator[tuple[Counting, Counting]]:
    pair = (Counting(), Counting())
    for s in pair:
        threading.Thread(target=s.serve_forever, args=(0.05,), daemon=True).start()
    yield pair
    for s in pair:
        s.shutdown()
        s.server_close()


@pytest.fixture
def gw_root() -> Iterator[Path]:
    """A short directory for the sockets (a unix socket path must stay under ~100 bytes)."""
    root = Path(tempfile.mkdtemp(prefix="sfgw-", dir="/tmp"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


def test_the_unmodified_openai_sdk_in_a_hardened_sandbox_is_metered_exactly(
    docker_client: Any, tmp_path: Path, servers: tuple[Counting, Counting], gw_root: Path
) -> None:

    image = require_image(docker_client, "python")
    allowed, denied = servers
    a_port, d_port = allowed.server_address[1], denied.server_address[1]
    data_dir = tmp_path / "data"
    writer = LedgerWriter(data_dir, node="node-1", signing_key=tmp_path / "audit.key")
    book = BudgetBook(lambda ref: Caps(task=10**9))
    root = gw_root
    script = ScriptedProvider.from_file(
        configs_dir() / "scripts" / "test.yaml", name="scripted", models=["scripted"]
    )
    thread = GatewayThread(
        lambda: Gateway(
            root,
            credentials=TaskCredentials(),
            providers={"scripted": script},
            budget=BudgetClient.local(book),
            sink=writer,
            prices=load_pricing(),
            node="node-1",
            resolver=Resolver({"allowed.test": "127.0.0.1", "denied.test": "127.0.0.1"}),
        )
    ).start()
    batch = f"pytest-gw-{uuid.uuid4().hex[:8]}"
    ref = AttemptRef("team-a", batch, "t1", 1)
    agent_dir = tmp_path / "agent"
    agent_dir.mkdir(mode=0o755)
    agent_dir.chmod(0o755)
    (agent_dir / "agent.py").write_text(AGENT)
    (agent_dir / "agent.py").chmod(0o644)
    workspace = tmp_path / "ws"
    workspace.mkdir()
    workspace.chmod(0o777)
    container = None
    try:
        channel = thread.open_attempt(
            AttemptGrant(
                ref,
                deadline=time.time() + 600,
                models=("scripted",),
                egress=(f"allowed.test:{a_port}",),
                task_type="demo",
            )
        )
        env = {k: v for k, v in channel.env().items() if k != "OPENAI_API_KEY"}  # token file
        env |= {
            "ALLOWED_URL": f"http://allowed.test:{a_port}/hello",
            "DENIED_URL": f"http://denied.test:{d_port}/secret",
            "ALLOWED_HOSTPORT": f"allowed.test:{a_port}",
            "ALLOWED_PORT": str(a_port),
        }
        spec = container_spec(
            load_template("python"),
            image=image,
            labels=sandbox_labels(batch=batch, task="t1", attempt=1, team="team-a", owner="pytest"),
            workspace_host_path=str(workspace),
            name=sandbox_name(batch, "t1", 1, uuid.uuid4().hex[:8]),
            env=env,
            command=[
                "python3",
                "/opt/sandfleet/forwarder.py",
                "--socket",
                "/run/sandfleet/gw.sock",
                "--",
                "python3",
                "/opt/agent/agent.py",
            ],
        )
        spec["volumes"] |= channel.volumes()
        spec["volumes"][str(Path(sandbox.forwarder.__file__))] = {
            "bind": "/opt/sandfleet/forwarder.py",
            "mode": "ro",
        }
        spec["volumes"][str(agent_dir)] = {"bind": "/opt/agent", "mode": "ro"}
        assert spec["network_mode"] == "none" and spec["read_only"] and spec["cap_drop"] == ["ALL"]
        assert spec["user"] == "10001:10001"
        container = docker_client.containers.create(**spec)
        container.start()
        status = container.wait(timeout=120)
        stdout = container.logs(stdout=True, stderr=False).decode()
        stderr = container.logs(stdout=False, stderr=True).decode()
        assert status["StatusCode"] == 0, stderr
        out = json.loads(stdout.strip().splitlines()[-1])
    finally:
        if container is not None:
            container.remove(force=True)
        thread.stop()
        writer.close()

    # what the agent saw
    assert out["env_has_key"] is True
    assert out["plain"]["text"] == "Hello from the scripted model!"
    assert (out["plain"]["usage"]["prompt_tokens"], out["plain"]["usage"]["completion_tokens"]) == (
        9,
        8,
    )
    assert out["stream"]["text"] == "one two three four five six seven eight nine ten"
    assert (
        out["stream"]["usage"]["prompt_tokens"],
        out["stream"]["usage"]["completion_tokens"],
    ) == (10, 12)
    assert out["models"] == ["scripted"]
    assert out["upstream_error"]["status"] == 500
    assert "scripted upstream failure" in out["upstream_error"]["message"]
    assert out["forged"] == 401
    assert out["allowed"] == "hello from /hello" and out["denied"] == 403
    assert out["tunnel"] == "HTTP/1.1 200 Connection Established | hello from /tunnel"
    assert out["direct"] == "ConnectionRefusedError"
    assert denied.accepted == 0 and allowed.accepted == 2

    # what the ledger holds (real Parquet, read back with DuckDB)
    con = duckdb.connect()
    ledger = data_dir / "ledger"
    calls = con.execute(
        f"""SELECT json_extract(payload, '$.input_uncached')::INT,
                   json_extract(payload, '$.output')::INT,
                   json_extract(payload, '$.cost_nusd')::BIGINT,
                   json_extract(payload, '$.status')::INT,
                   json_extract(payload, '$.stream')::BOOL
            FROM read_parquet('{ledger}/events/**/*.parquet', hive_partitioning = true)
            WHERE kind = 'llm_call' AND batch = '{batch}' ORDER BY event_seq"""
    ).fetchall()
    plain, streamed = 9 * 400 + 8 * 1600, 10 * 400 + 12 * 1600
    assert calls == [
        (9, 8, plain, 200, False),
        (10, 12, streamed, 200, True),
        (0, 0, 0, 500, False),
        (0, 0, 0, 401, False),
    ]  # the forged-token call ran on this attempt's socket too: refused and recorded
    charges = con.execute(
        f"""SELECT usage_bucket, sum(quantity)::BIGINT, sum(cost_nusd)::BIGINT, count(*)
            FROM read_parquet('{ledger}/charges/**/*.parquet', hive_partitioning = true)
            WHERE batch = '{batch}' GROUP BY usage_bucket ORDER BY usage_bucket"""
    ).fetchall()
    by_bucket = {row[0]: row[1:] for row in charges}
    assert by_bucket["input_uncached"] == (19, 19 * 400, 2)  # 9 + 10 tokens, two calls
    assert by_bucket["output"] == (20, 20 * 1600, 2)  # 8 + 12 tokens
    egress_cost = by_bucket["egress"][1]
    egress = con.execute(
        f"""SELECT quantity::BIGINT, cost_nusd FROM read_parquet('{ledger}/charges/**/*.parquet',
            hive_partitioning = true) WHERE batch = '{batch}' AND usage_bucket = 'egress'"""
    ).fetchall()
    per_byte = load_pricing().network.usd_per_egress_gib * 10**9 / 2**30
    assert len(egress) == 2 and all(cost == round(q * per_byte) for q, cost in egress)
    decisions = con.execute(
        f"""SELECT json_extract_string(payload, '$.host'), json_extract(payload, '$.allowed')::BOOL
            FROM read_parquet('{ledger}/events/**/*.parquet', hive_partitioning = true)
            WHERE kind = 'egress_decision' AND batch = '{batch}' ORDER BY event_seq"""
    ).fetchall()
    assert sorted(decisions) == [
        ("allowed.test", True),
        ("allowed.test", True),
        ("denied.test", False),
    ]
    assert book.spent("task", f"{batch}/t1") == plain + streamed + egress_cost
