"""`GatewayThread`: a `Gateway` on its own event loop in a thread, driven by sync calls.

For callers that are not asyncio code (the attempt runner, tests, the benchmark): the
gateway keeps serving sockets while the caller blocks on Docker or a subprocess.
"""

from __future__ import annotations

import asyncio
import http.client
import socket
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from sandbox.credentials import AttemptRef
from sandbox.gateway import PREAMBLE_LLM, PREAMBLE_PROXY, AttemptChannel, AttemptGrant, Gateway

__all__ = ["GatewayThread", "UnixHTTPConnection"]

T = TypeVar("T")


class GatewayThread:
    """Builds the gateway with `factory()` inside its loop, then serves until `stop()`."""

    def __init__(self, factory: Callable[[], Gateway], *, timeout_s: float = 60.0):
        self._factory = factory
        self.timeout_s = timeout_s
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="gateway", daemon=True)
        self.gateway: Gateway | None = None

    def start(self) -> GatewayThread:
        self._thread.start()
        self.gateway = self.run(self._build())
        return self

    async def _build(self) -> Gateway:
        gateway = self._factory()
        await gateway.start()
        return gateway

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run `coro` on the gateway's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(self.timeout_s)

    def _gw(self) -> Gateway:
        if self.gateway is None:
            raise RuntimeError("GatewayThread is not started; call start() first")
        return self.gateway

    def open_attempt(self, grant: AttemptGrant) -> AttemptChannel:
        return self.run(self._gw().open_attempt(grant))

    def close_attempt(self, ref: AttemptRef) -> None:
        self.run(self._gw().close_attempt(ref))

    def flush(self) -> None:
        self.run(self._gw().flush())

    def stop(self) -> None:
        """Close every attempt, flush the recorder, stop the loop and join the thread."""
        if not self._thread.is_alive():
            return
        try:
            if self.gateway is not None:
                self.run(self.gateway.aclose())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(self.timeout_s)
            self.loop.close()

    def __enter__(self) -> GatewayThread:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class UnixHTTPConnection(http.client.HTTPConnection):
    """`http.client` over an attempt's socket, as the forwarder would open it (tests, probes)."""

    def __init__(self, socket_path: str | Path, role: str = "llm", *, timeout: float = 30.0):
        super().__init__("127.0.0.1", timeout=timeout)
        self.socket_path = str(socket_path)
        self.preamble = PREAMBLE_LLM if role == "llm" else PREAMBLE_PROXY

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.socket_path)
        sock.sendall(self.preamble)
        self.sock = sock
