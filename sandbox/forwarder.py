"""The in-sandbox forwarder: 127.0.0.1 ports relayed to the gateway's unix socket.

Stdlib only (it runs with the sandbox's own python3), bind-mounted read-only at
`/opt/sandfleet/forwarder.py`. The container command becomes::

    python3 /opt/sandfleet/forwarder.py --socket /run/sandfleet/gw.sock -- <agent argv>

It listens on 127.0.0.1:8080 (the LLM endpoint, `OPENAI_BASE_URL`) and 127.0.0.1:3128
(the HTTP proxy), and relays each TCP connection byte for byte to the socket, after a
one-line preamble naming the port's role (`SANDFLEET/1 llm` / `SANDFLEET/1 proxy`).
Once both listen it starts the agent with `agent_env()` layered under the container's
environment (the task token comes from `/run/sandfleet/token` when `OPENAI_API_KEY` is
not set), forwards SIGTERM/SIGINT/SIGHUP to it and exits with its exit status. Without
an agent argv it serves until killed.

No threads (each one would count against the pids limit); one asyncio loop, protocol
level relays with flow control and half-close.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Sequence

__all__ = ["LLM_PORT", "PROXY_PORT", "RelaySide", "agent_env", "main", "serve"]

LLM_PORT = 8080
PROXY_PORT = 3128
PREAMBLES = {"llm": b"SANDFLEET/1 llm\r\n", "proxy": b"SANDFLEET/1 proxy\r\n"}
DEFAULT_SOCKET = "/run/sandfleet/gw.sock"
DEFAULT_TOKEN_FILE = "/run/sandfleet/token"  # noqa: S105 -- a path


def agent_env(token: str, *, llm_port: int = LLM_PORT, proxy_port: int = PROXY_PORT) -> dict:
    """The agent's environment: the LLM endpoint, the task token, the egress proxy."""
    proxy = f"http://127.0.0.1:{proxy_port}"
    env = {
        "OPENAI_BASE_URL": f"http://127.0.0.1:{llm_port}/v1",
        "OPENAI_API_KEY": token,
        "NO_PROXY": "127.0.0.1,localhost",
    }
    for name in ("HTTP_PROXY", "HTTPS_PROXY"):
        env[name] = env[name.lower()] = proxy
    env["no_proxy"] = env["NO_PROXY"]
    return env


class RelaySide(asyncio.Protocol):
    """One end of a relay: what it receives is written to the peer's transport.

    Flow control: when our transport's buffer fills, the peer stops reading. Half-close:
    an EOF is passed on with `write_eof`; both transports close once both sides ended,
    or as soon as one is lost. `received` counts the bytes read on this side.
    """

    def __init__(self, socket_path: str = "", preamble: bytes = b"") -> None:
        self.socket_path = socket_path  # set on the client side: bridge when connected
        self.preamble = preamble
        self.task: asyncio.Task[None] | None = None
        self.transport: asyncio.Transport | None = None
        self.peer: RelaySide | None = None
        self.pending: list[bytes] = []
        self.received = 0
        self.eof = False
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if self.socket_path:
            transport.pause_reading()  # until the gateway side is connected
            self.task = asyncio.get_running_loop().create_task(
                _bridge(self, self.socket_path, self.preamble)
            )

    def link(self, peer: RelaySide) -> None:
        self.peer = peer
        for data in self.pending:
            self._send(data)
        self.pending.clear()
        if self.eof:
            self._peer_eof()

    def _send(self, data: bytes) -> None:
        assert self.peer is not None and self.peer.transport is not None
        self.peer.transport.write(data)

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        if self.peer is None:
            self.pending.append(data)
        else:
            self._send(data)

    def eof_received(self) -> bool:
        self.eof = True
        if self.peer is not None:
            self._peer_eof()
        return True  # keep our writing half open until the peer is done too

    def _peer_eof(self) -> None:
        assert self.peer is not None
        pt = self.peer.transport
        if pt is not None and not pt.is_closing():
            if self.peer.eof:
                pt.close()
                if self.transport is not None:
                    self.transport.close()
            elif pt.can_write_eof():
                pt.write_eof()

    def pause_writing(self) -> None:  # our transport is full: stop reading the peer
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()
        if not self.closed.done():
            self.closed.set_result(None)


async def _bridge(client: RelaySide, socket_path: str, preamble: bytes) -> None:
    loop = asyncio.get_running_loop()
    assert client.transport is not None
    try:
        _, upstream = await loop.create_unix_connection(RelaySide, socket_path)
    except OSError as e:
        sys.stderr.write(f"sandfleet-forwarder: cannot reach the gateway at {socket_path}: {e}\n")
        body = b'{"error":{"message":"the sandfleet gateway is unreachable","type":"api_error"}}'
        client.transport.write(
            b"HTTP/1.1 502 Bad Gateway\r\nContent-Type: application/json\r\n"
            b"Connection: close\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body)
        )
        client.transport.close()
        return
    assert upstream.transport is not None
    upstream.transport.write(preamble)
    upstream.link(client)
    client.link(upstream)
    client.transport.resume_reading()


async def serve(
    socket_path: str,
    *,
    host: str = "127.0.0.1",
    llm_port: int = LLM_PORT,
    proxy_port: int = PROXY_PORT,
) -> list[asyncio.Server]:
    """Start both listeners; returns the servers (already serving)."""
    loop = asyncio.get_running_loop()
    servers = []
    for role, port in (("llm", llm_port), ("proxy", proxy_port)):

        def factory(preamble: bytes = PREAMBLES[role]) -> RelaySide:
            return RelaySide(socket_path, preamble)

        servers.append(await loop.create_server(factory, host, port, reuse_address=True))
    return servers


def _child_env(token_file: str) -> dict[str, str]:
    env = dict(os.environ)
    token = env.get("OPENAI_API_KEY", "")
    if not token and os.path.exists(token_file):
        with open(token_file) as f:
            token = f.read().strip()
    for key, value in agent_env(token).items():
        env.setdefault(key, value)
    if not env.get("OPENAI_API_KEY"):
        env["OPENAI_API_KEY"] = token
    return env


async def _run(args: argparse.Namespace) -> int:
    servers = await serve(args.socket, llm_port=args.llm_port, proxy_port=args.proxy_port)
    try:
        if not args.argv:
            await asyncio.Event().wait()  # serve until killed
            return 0
        proc = await asyncio.create_subprocess_exec(*args.argv, env=_child_env(args.token_file))
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, _forward, proc, sig)
        code = await proc.wait()
        return code if code >= 0 else 128 - code
    finally:
        for server in servers:
            server.close()


def _forward(proc: asyncio.subprocess.Process, sig: int) -> None:
    if proc.returncode is None:
        proc.send_signal(sig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Relay sandbox ports to the gateway socket.")
    parser.add_argument("--socket", default=DEFAULT_SOCKET, help="the gateway's unix socket")
    parser.add_argument("--token-file", default=DEFAULT_TOKEN_FILE, help="the task token file")
    parser.add_argument("--llm-port", type=int, default=LLM_PORT)
    parser.add_argument("--proxy-port", type=int, default=PROXY_PORT)
    parser.add_argument("argv", nargs=argparse.REMAINDER, help="-- the agent's command")
    args = parser.parse_args(argv)
    if args.argv and args.argv[0] == "--":
        args.argv = args.argv[1:]
    try:
        return asyncio.run(_run(args))
    except FileNotFoundError as e:
        sys.stderr.write(f"sandfleet-forwarder: cannot start the agent: {e}\n")
        return 127
    except OSError as e:
        sys.stderr.write(f"sandfleet-forwarder: {e}\n")
        return 70


if __name__ == "__main__":
    sys.exit(main())
