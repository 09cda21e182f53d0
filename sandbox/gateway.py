"""The node's gateway: one unix socket per attempt, an LLM endpoint and an egress proxy.

`Gateway.open_attempt(grant)` mints the attempt's task token (scopes: `llm:invoke` when
it may use models, `egress:HOST[:PORT]` per allowlist entry), creates
`<root>/<attempt>-<nonce>/` (0700) holding `gw.sock` (0600) and `token` (0400), all
owned by the sandbox uid (10001), and serves that socket. The directory is mounted
read-only at `/run/sandfleet` in the sandbox, where `sandbox/forwarder.py` relays
`127.0.0.1:8080` (LLM) and `127.0.0.1:3128` (proxy) to the socket; each connection
starts with a one-line preamble, `SANDFLEET/1 llm` or `SANDFLEET/1 proxy`.

The socket a connection arrives on IS the attempt it speaks for (channel binding): a
token of another attempt is refused there. `close_attempt(ref)` revokes the token,
drops the socket's connections and removes the directory.

Everything the gateway does is recorded through a `LedgerSink` (events + charges); when
the sink fails, calls are refused with 503 until it recovers (fail closed).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import secrets
import shutil
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from accounting.errors import BudgetError, SandboxError
from accounting.pricing import PriceList, load_pricing
from sandbox.credentials import SCOPE_LLM, AttemptRef, TaskCredentials, egress_scope
from sandbox.egress import EgressProxy, Resolver
from sandbox.llm_api import LlmApi
from sandbox.providers import Provider
from sandbox.recorder import LedgerSink, Recorder

__all__ = [
    "MOUNT_POINT",
    "SOCKET_NAME",
    "AttemptChannel",
    "AttemptGrant",
    "Budget",
    "Gateway",
    "Reserved",
]

log = logging.getLogger(__name__)

SOCKET_NAME = "gw.sock"
TOKEN_NAME = "token"  # noqa: S105 -- a file name
MOUNT_POINT = "/run/sandfleet"
PREAMBLE_LLM = b"SANDFLEET/1 llm\r\n"
PREAMBLE_PROXY = b"SANDFLEET/1 proxy\r\n"
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")
_DRAIN_S = 30.0  # how long closing an attempt waits for its calls in flight to be metered


class Reserved(Protocol):
    """What a reservation must carry back to the gateway."""

    id: str
    amount_nusd: int


class Budget(Protocol):
    """The gateway's view of the BudgetKeeper (`scheduler.budget.BudgetClient`).

    Every method fails closed: an unreachable keeper raises `BudgetError`.
    """

    async def reserve(
        self, ref: AttemptRef, want_nusd: int, *, min_nusd: int, kind: str = "llm"
    ) -> Reserved: ...

    async def settle(self, reservation_id: str, actual_nusd: int) -> None: ...

    async def release(self, reservation_id: str) -> None: ...

    async def record_spend(self, ref: AttemptRef, amount_nusd: int, *, kind: str) -> None: ...


@dataclass(frozen=True)
class AttemptGrant:
    """What one attempt may do through the gateway."""

    ref: AttemptRef
    deadline: float  # UNIX seconds; the token expires then
    models: tuple[str, ...] = ()  # models it may call (empty: no LLM access)
    egress: tuple[str, ...] = ()  # the template's + the task's allowlist
    task_type: str = ""


@dataclass(frozen=True)
class AttemptChannel:
    """An attempt's open socket, and what its sandbox needs to use it."""

    ref: AttemptRef
    directory: Path
    socket: Path
    token: str = field(repr=False)

    def volumes(self) -> dict[str, dict[str, str]]:
        """docker SDK `volumes` entry: the socket directory, read-only, at /run/sandfleet."""
        return {str(self.directory): {"bind": MOUNT_POINT, "mode": "ro"}}

    def env(self) -> dict[str, str]:
        """The agent's environment (also set by the forwarder from the token file)."""
        from sandbox.forwarder import agent_env

        return agent_env(self.token)


@dataclass
class _Attempt:
    grant: AttemptGrant
    channel: AttemptChannel
    server: asyncio.AbstractServer
    writers: set[asyncio.StreamWriter] = field(default_factory=set)
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)  # its connections' handlers


class Gateway:
    """See the module doc. Runs on one event loop; `open_attempt`/`close_attempt` on it."""

    def __init__(
        self,
        root: Path,
        *,
        credentials: TaskCredentials,
        providers: Mapping[str, Provider],
        budget: Budget,
        sink: LedgerSink,
        prices: PriceList | None = None,
        resolver: Resolver | None = None,
        node: str = "",
        default_max_tokens: int = 4096,
        owner_uid: int | None = 10001,
        max_connections: int = 256,
        on_budget_refused: Callable[[AttemptRef, BudgetError], Awaitable[None] | None]
        | None = None,
    ):
        self.root = Path(root)
        self.credentials = credentials
        self.providers = dict(providers)
        self.recorder = Recorder(sink)
        self.owner_uid = owner_uid
        self.max_connections = max_connections
        prices = prices if prices is not None else load_pricing()
        self.llm = LlmApi(
            credentials=credentials,
            providers=self.providers,
            budget=budget,
            prices=prices,
            recorder=self.recorder,
            node=node,
            default_max_tokens=default_max_tokens,
            on_budget_refused=on_budget_refused,
        )
        self.egress = EgressProxy(
            credentials=credentials,
            budget=budget,
            prices=prices,
            recorder=self.recorder,
            resolver=resolver or Resolver(),
            node=node,
        )
        self._attempts: dict[AttemptRef, _Attempt] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o711)  # noqa: S103 -- traversable, not listable: each dir is 0700
        self.recorder.start()

    # -- attempts ----------------------------------------------------------------------------

    async def open_attempt(self, grant: AttemptGrant) -> AttemptChannel:
        """Mint the token, create the socket directory and serve it."""
        ref = grant.ref
        if ref in self._attempts:
            raise SandboxError(f"attempt {ref} already has a gateway socket; close it first")
        unknown = [m for m in grant.models if m not in self.providers]
        if unknown:
            raise SandboxError(
                f"attempt {ref} may use models no provider serves: {', '.join(unknown)} "
                "(fix: add them to configs/providers.yaml or drop them from the task)"
            )
        scopes = ([SCOPE_LLM] if grant.models else []) + [egress_scope(h) for h in grant.egress]
        token = self.credentials.mint(ref, scopes, deadline=grant.deadline)
        name = _UNSAFE.sub("_", f"{ref.task}-a{ref.attempt}")[:80] + "-" + secrets.token_hex(4)
        directory = self.root / name
        directory.mkdir(mode=0o700)
        path = directory / SOCKET_NAME
        if len(str(path).encode()) > 100:
            directory.rmdir()
            self.credentials.revoke(ref)
            raise SandboxError(
                f"socket path {path} is longer than a unix socket allows (~100 bytes); "
                "give the gateway a shorter root directory"
            )
        try:
            server = await asyncio.start_unix_server(
                lambda r, w: self._connection(ref, r, w), path=str(path), limit=64 * 1024
            )
            os.chmod(path, 0o600)
            token_path = directory / TOKEN_NAME
            token_path.write_text(token)
            os.chmod(token_path, 0o400)
            self._own(directory, path, token_path)
        except BaseException:
            self.credentials.revoke(ref)
            shutil.rmtree(directory, ignore_errors=True)
            raise
        channel = AttemptChannel(ref=ref, directory=directory, socket=path, token=token)
        self._attempts[ref] = _Attempt(grant, channel, server)
        return channel

    def _own(self, *paths: Path) -> None:
        if self.owner_uid is None:
            return
        for p in paths:
            try:
                os.chown(p, self.owner_uid, self.owner_uid)
            except PermissionError:
                raise SandboxError(
                    f"cannot give {p} to uid {self.owner_uid}: the gateway must run as root "
                    "(or pass owner_uid=None and run sandboxes as the gateway's own uid)"
                ) from None

    async def close_attempt(self, ref: AttemptRef) -> None:
        """Revoke the token, stop serving the socket, remove the directory. Idempotent."""
        self.credentials.revoke(ref)
        attempt = self._attempts.pop(ref, None)
        if attempt is None:
            return
        attempt.server.close()
        for w in list(attempt.writers):
            w.close()
        if attempt.tasks:  # a call in flight is still paid for: let it be metered
            await asyncio.wait(list(attempt.tasks), timeout=_DRAIN_S)
        await attempt.server.wait_closed()
        shutil.rmtree(attempt.channel.directory, ignore_errors=True)

    def channel(self, ref: AttemptRef) -> AttemptChannel | None:
        attempt = self._attempts.get(ref)
        return attempt.channel if attempt else None

    async def flush(self) -> None:
        """Wait until every event and charge so far reached the sink."""
        await self.recorder.flush()

    async def aclose(self) -> None:
        for ref in list(self._attempts):
            await self.close_attempt(ref)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=10)
        for provider in {id(p): p for p in self.providers.values()}.values():
            await provider.aclose()
        await self.recorder.aclose()

    # -- connections -------------------------------------------------------------------------

    async def _connection(
        self, ref: AttemptRef, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        attempt = self._attempts.get(ref)
        if attempt is None or len(attempt.writers) >= self.max_connections:
            writer.close()
            return
        attempt.writers.add(writer)
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
            attempt.tasks.add(task)
        try:
            try:
                async with asyncio.timeout(10):
                    preamble = await reader.readuntil(b"\n")
            except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as e:
                log.debug("attempt %s: no preamble (%s); closed", ref, type(e).__name__)
                return
            if preamble == PREAMBLE_LLM:
                await self.llm.serve(attempt.grant, reader, writer)
            elif preamble == PREAMBLE_PROXY:
                await self.egress.serve(attempt.grant, reader, writer)
            else:
                log.warning("attempt %s: connection with an unknown preamble; closed", ref)
        except ConnectionError as e:
            log.debug("attempt %s: connection ended: %s", ref, e)
        except Exception:
            log.exception("attempt %s: gateway connection failed", ref)
        finally:
            attempt.writers.discard(writer)
            writer.close()
            if task is not None:
                self._tasks.discard(task)
                attempt.tasks.discard(task)

    def stats(self) -> dict[str, Any]:
        return {
            "attempts": len(self._attempts),
            "connections": sum(len(a.writers) for a in self._attempts.values()),
            "recorder_healthy": self.recorder.healthy,
            "time": time.time(),
        }
