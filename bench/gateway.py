"""Benchmark: what the forwarder + gateway add to an LLM call, and proxy throughput.

    .venv/bin/python bench/gateway.py [--quick]

Four processes on this machine, as in production: a fake OpenAI-compatible upstream
(this script's own loopback server), the gateway (openai provider -> that upstream,
real LedgerWriter to a temporary data dir, an in-process budget book), the forwarder
(`sandbox/forwarder.py`, run on the host on free ports: the same code a sandbox runs),
and the client.

- LLM: sequential non-streaming chat calls on one keep-alive connection, through
  forwarder + gateway vs straight to the upstream; p50 / p99 per call and the
  difference (targets: <= 2 ms added at p50).
- Proxy: one CONNECT tunnel through forwarder + gateway to the upstream's bulk port,
  reading N MiB, vs reading it directly (target: >= 200 MB/s through the proxy).

Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import multiprocessing as mp
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MODEL = "gpt-4.1-mini"
KEY = "sk-bench-upstream-key"
COMPLETION = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "model": MODEL,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Run pytest -q and read the failure."},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 42, "completion_tokens": 9, "total_tokens": 51},
    }
).encode()
BODY = json.dumps(
    {
        "model": MODEL,
        "max_tokens": 256,
        "messages": [
            {"role": "system", "content": "You are a coding agent. " * 20},
            {"role": "user", "content": "The test test_parse fails; what should I run first?"},
        ],
    }
).encode()
CHUNK = b"x" * (1 << 20)


# --- the fake upstream (own process) ---------------------------------------------------------


async def _llm_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    from sandbox.http1 import read_body, read_head

    try:
        while (head := await read_head(reader)) is not None:
            await read_body(reader, head)
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%b"
                % (len(COMPLETION), COMPLETION)
            )
            await writer.drain()
    finally:
        writer.close()


def _bulk_conn(size_mib: int):  # type: ignore[no-untyped-def]
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            for _ in range(size_mib):
                writer.write(CHUNK)
                await writer.drain()
        finally:
            writer.close()

    return handle


def run_upstream(ports: Any, size_mib: int) -> None:
    async def main() -> None:
        llm = await asyncio.start_server(_llm_conn, "127.0.0.1", 0)
        bulk = await asyncio.start_server(_bulk_conn(size_mib), "127.0.0.1", 0)
        ports.put((llm.sockets[0].getsockname()[1], bulk.sockets[0].getsockname()[1]))
        await asyncio.Event().wait()

    asyncio.run(main())


# --- the gateway (own process) ---------------------------------------------------------------


def run_gateway(out: Any, root: str, data_dir: str, llm_port: int, bulk_port: int) -> None:
    from sandbox.credentials import AttemptRef, TaskCredentials
    from sandbox.egress import Resolver
    from sandbox.gateway import AttemptGrant, Gateway
    from sandbox.openai_provider import OpenAIProvider
    from sandbox.providers import ProviderConfig

    async def main() -> None:
        from accounting.writer import LedgerWriter
        from scheduler.budget import BudgetBook, BudgetClient, Caps

        writer = LedgerWriter(data_dir, signing_key=Path(root).parent / "bench-audit.key")
        provider = OpenAIProvider(
            ProviderConfig(
                name="bench",
                kind="openai",
                models=(MODEL,),
                api_key_env="BENCH_KEY",
                base_url=f"http://127.0.0.1:{llm_port}/v1",
            ),
            env={"BENCH_KEY": KEY},
        )
        gateway = Gateway(
            Path(root),
            credentials=TaskCredentials(),
            providers={MODEL: provider},
            budget=BudgetClient.local(BudgetBook(lambda ref: Caps())),
            sink=writer,
            resolver=Resolver({"bulk.test": "127.0.0.1"}),
            owner_uid=None,
        )
        await gateway.start()
        ref = AttemptRef("bench", "bench", "t1", 1)
        channel = await gateway.open_attempt(
            AttemptGrant(ref, time.time() + 3600, (MODEL,), (f"bulk.test:{bulk_port}",))
        )
        out.put((str(channel.socket), channel.token))
        await asyncio.Event().wait()

    asyncio.run(main())


# --- measuring -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(port: int, deadline_s: float = 20) -> None:
    end = time.monotonic() + deadline_s
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > end:
                raise
            time.sleep(0.02)


def llm_latencies(port: int, token: str, n: int, path: str) -> list[float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    out = []
    for i in range(n + 50):
        t0 = time.perf_counter()
        conn.request("POST", path, body=BODY, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        dt = (time.perf_counter() - t0) * 1000
        if resp.status != 200:
            raise SystemExit(f"call failed: {resp.status} {data[:200]!r}")
        if i >= 50:  # warm-up calls are not counted
            out.append(dt)
    conn.close()
    return out


def read_all(sock: socket.socket) -> int:
    buf = bytearray(1 << 20)
    view, total = memoryview(buf), 0
    while n := sock.recv_into(view):
        total += n
    return total


def throughput(port: int, connect_to: str | None) -> tuple[float, int]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    with sock:
        t0 = time.perf_counter()
        if connect_to:
            sock.sendall(f"CONNECT {connect_to} HTTP/1.1\r\n\r\n".encode())
            head = b""
            while b"\r\n\r\n" not in head:
                head += sock.recv(1)
            if not head.startswith(b"HTTP/1.1 200"):
                raise SystemExit(f"CONNECT refused: {head!r}")
        total = read_all(sock)
        return total / (time.perf_counter() - t0) / 1e6, total


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--quick", action="store_true", help="fewer calls and bytes (CI smoke)")
    args = ap.parse_args()
    n_calls, size_mib = (300, 128) if args.quick else (2000, 1024)
    ctx = mp.get_context("spawn")
    tmp = Path(tempfile.mkdtemp(prefix="sfbench-", dir="/tmp"))
    procs: list[Any] = []
    try:
        q = ctx.Queue()
        procs.append(ctx.Process(target=run_upstream, args=(q, size_mib), daemon=True))
        procs[-1].start()
        llm_port, bulk_port = q.get(timeout=30)
        procs.append(
            ctx.Process(
                target=run_gateway,
                args=(q, str(tmp / "gw"), str(tmp / "data"), llm_port, bulk_port),
                daemon=True,
            )
        )
        procs[-1].start()
        sock_path, token = q.get(timeout=60)
        fwd_llm, fwd_proxy = free_port(), free_port()
        forwarder = Path(__file__).resolve().parent.parent / "sandbox" / "forwarder.py"
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    str(forwarder),
                    "--socket",
                    sock_path,
                    "--llm-port",
                    str(fwd_llm),
                    "--proxy-port",
                    str(fwd_proxy),
                ]
            )
        )
        wait_listening(fwd_llm)

        direct = llm_latencies(llm_port, KEY, n_calls, "/v1/chat/completions")
        through = llm_latencies(fwd_llm, token, n_calls, "/v1/chat/completions")
        d_mb, d_bytes = throughput(bulk_port, None)
        p_mb, p_bytes = throughput(fwd_proxy, f"bulk.test:{bulk_port}")
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            if isinstance(p, subprocess.Popen):
                p.wait(10)
            else:
                p.join(10)
        shutil.rmtree(tmp, ignore_errors=True)  # the gateway dir, the ledger and its key

    result = {
        "bench": "gateway",
        "quick": args.quick,
        "calls": n_calls,
        "llm_direct_p50_ms": round(pct(direct, 50), 3),
        "llm_direct_p99_ms": round(pct(direct, 99), 3),
        "llm_gateway_p50_ms": round(pct(through, 50), 3),
        "llm_gateway_p99_ms": round(pct(through, 99), 3),
        "added_p50_ms": round(pct(through, 50) - pct(direct, 50), 3),
        "added_p99_ms": round(pct(through, 99) - pct(direct, 99), 3),
        "proxy_mb_s": round(p_mb, 1),
        "direct_mb_s": round(d_mb, 1),
        "bytes": p_bytes,
        "cpus": os.cpu_count(),
    }
    assert d_bytes == p_bytes == size_mib << 20, "a transfer was cut short"
    result["targets"] = {"added_p50_ms_max": 2.0, "proxy_mb_s_min": 200.0}
    result["met"] = {
        "added_p50": result["added_p50_ms"] <= 2.0,
        "proxy_throughput": result["proxy_mb_s"] >= 200.0,
    }
    print(
        f"LLM call, direct:            p50 {result['llm_direct_p50_ms']:7.3f} ms   "
        f"p99 {result['llm_direct_p99_ms']:7.3f} ms"
    )
    print(
        f"LLM call, forwarder+gateway: p50 {result['llm_gateway_p50_ms']:7.3f} ms   "
        f"p99 {result['llm_gateway_p99_ms']:7.3f} ms"
    )
    print(
        f"added:                       p50 {result['added_p50_ms']:7.3f} ms   "
        f"p99 {result['added_p99_ms']:7.3f} ms   (target <= 2 ms at p50)"
    )
    print(
        f"proxy throughput: {result['proxy_mb_s']:.1f} MB/s through the proxy, "
        f"{result['direct_mb_s']:.1f} MB/s direct (target >= 200 MB/s)"
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
