"""The gateway's egress proxy: default deny, an allowlist per attempt, every decision metered.

A sandbox has no network; its HTTP(S)_PROXY leads here. `CONNECT host:port` (HTTPS,
any TCP) and absolute-URI plain HTTP (`GET http://host[:port]/path`) are accepted.
Order: the attempt must be live and its token must grant `egress:host:port` (the
template's + the task's allowlist, see `sandbox.credentials.scope_granted`); only then
does the gateway resolve the name itself (`Resolver`) and connect to the address it
found. Anything else is answered 403 and never contacted.

Each connection is one `egress_decision` event (host, port, allowed, reason, bytes up
and down) and, when bytes left the sandbox, one `egress` charge for the bytes sent
upstream (`configs/pricing.yaml`: "per GiB leaving a sandbox"), also counted as spend.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from accounting.charging import charge_id
from accounting.errors import BudgetError, CredentialError
from accounting.pricing import PriceList, price_usage
from accounting.schemas import Charge, EventKind, UsageBucket
from sandbox.credentials import AttemptRef, TaskCredentials, split_host_port
from sandbox.forwarder import RelaySide
from sandbox.http1 import BadRequest, Head, read_head, response_head
from sandbox.recorder import Recorder, event_for

if TYPE_CHECKING:
    from sandbox.gateway import AttemptGrant, Budget

__all__ = ["Denied", "EgressProxy", "Resolver", "parse_target"]

log = logging.getLogger(__name__)

_HOP_HEADERS = {"proxy-authorization", "proxy-connection", "connection", "keep-alive"}


class Denied(Exception):
    """An egress request that must not go out: (status, reason, message)."""

    def __init__(self, status: int, reason: str, message: str):
        super().__init__(message)
        self.status = status
        self.reason = reason


def parse_target(head: Head) -> tuple[str, int, bytes]:
    """(host, port, head to send upstream) of a proxy request; raises Denied(400)."""
    if head.method == "CONNECT":
        try:
            host, port = split_host_port(head.target)
        except ValueError:
            raise Denied(400, "bad_request", f"bad CONNECT target {head.target[:100]!r}") from None
        if port is None or not host:
            raise Denied(400, "bad_request", "CONNECT needs host:port")
        return host, port, b""
    url = urlsplit(head.target)
    if url.scheme != "http" or not url.hostname:
        raise Denied(
            400,
            "bad_request",
            "send absolute http:// URLs (plain HTTP) or CONNECT host:port (HTTPS) to the proxy",
        )
    try:
        port = url.port or 80
    except ValueError:
        raise Denied(400, "bad_request", f"bad port in {head.target[:100]!r}") from None
    path = (url.path or "/") + (f"?{url.query}" if url.query else "")
    lines = [f"{head.method} {path} {head.version}"]
    lines += [f"{k}: {v}" for k, v in head.headers if k not in _HOP_HEADERS]
    lines.append("Connection: close")
    upstream_head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return url.hostname.lower().rstrip("."), port, upstream_head


class Resolver:
    """The gateway's own name resolution (the sandbox has no DNS).

    A `static` entry (name -> address, written by an operator) is used as is. Anything
    else goes to the host's resolver, and an address that is loopback, private,
    link-local (cloud metadata), multicast, reserved or unspecified is refused unless
    `allow_private`: an allowlisted name must not lead into the host's own network.
    """

    def __init__(self, static: Mapping[str, str] | None = None, *, allow_private: bool = False):
        self.static = {k.lower(): v for k, v in (static or {}).items()}
        self.allow_private = allow_private

    async def resolve(self, host: str, port: int) -> str:
        if host in self.static:
            return self.static[host]
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=1)
        except OSError as e:
            raise Denied(502, "unresolvable", f"cannot resolve {host}: {e}") from None
        for *_, sockaddr in infos:
            ip = ipaddress.ip_address(sockaddr[0])
            if self.allow_private or ip.is_global:
                return str(ip)
        raise Denied(403, "blocked_address", f"{host} resolves only to non-public addresses")


class EgressProxy:
    """Serves one proxy connection for one attempt."""

    def __init__(
        self,
        *,
        credentials: TaskCredentials,
        budget: Budget,
        prices: PriceList,
        recorder: Recorder,
        resolver: Resolver,
        node: str = "",
        connect_timeout_s: float = 10.0,
    ):
        self.credentials = credentials
        self.budget = budget
        self.prices = prices
        self.recorder = recorder
        self.resolver = resolver
        self.node = node
        self.connect_timeout_s = connect_timeout_s

    async def serve(
        self, grant: AttemptGrant, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        started = time.monotonic()
        start_time = datetime.now(UTC)
        host, port, up, down = "", 0, 0, 0
        allowed, reason, method = False, "", ""
        try:
            head = await read_head(reader)
            if head is None:
                return
            method = head.method
            host, port, upstream_head = parse_target(head)
            upstream = await self._open(grant.ref, host, port)
            allowed, reason = True, "allowlisted"
            if head.method == "CONNECT":
                writer.write(b"HTTP/1.1 200 Connection Established\r\n\r\n")
            up, down = await _splice(reader, writer, upstream, upstream_head)
        except BadRequest as e:
            reason, method = "bad_request", method or "?"
            self._deny(writer, e.status, str(e))
        except Denied as e:
            reason = e.reason
            self._deny(writer, e.status, str(e))
        finally:
            if method or host:
                await self._record(
                    grant, start_time, started, host, port, allowed, reason, up, down, method
                )

    def _deny(self, writer: asyncio.StreamWriter, status: int, message: str) -> None:
        body = f"sandfleet gateway: {message}\n".encode()
        headers = [
            ("Content-Type", "text/plain; charset=utf-8"),
            ("Content-Length", str(len(body))),
            ("Connection", "close"),
        ]
        with contextlib.suppress(ConnectionError):
            writer.write(response_head(status, headers) + body)

    async def _open(self, ref: AttemptRef, host: str, port: int) -> RelaySide:
        try:
            self.credentials.check_channel(ref, f"egress:{host}:{port}")
        except CredentialError as e:
            reason = "attempt_not_live" if "not live" in str(e) else "not_allowlisted"
            raise Denied(
                403,
                reason,
                f"egress to {host}:{port} is not allowed for this task "
                "(ask for it in the task's or template's network_allowlist)",
            ) from None
        address = await self.resolver.resolve(host, port)
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _, side = await loop.create_connection(RelaySide, address, port)
        except (OSError, TimeoutError) as e:
            raise Denied(502, "connect_failed", f"cannot connect to {host}:{port}: {e}") from None
        return side

    async def _record(
        self,
        grant: AttemptGrant,
        start_time: datetime,
        started: float,
        host: str,
        port: int,
        allowed: bool,
        reason: str,
        up: int,
        down: int,
        method: str,
    ) -> None:
        ref = grant.ref
        charges: list[Charge] = []
        budget_error = ""
        if up > 0 and allowed:
            priced = price_usage(self.prices, UsageBucket.EGRESS, up)
            cid = charge_id("egress", ref.task, ref.attempt, uuid.uuid4().hex)
            charges.append(_charge(ref, self.node, grant.task_type, cid, start_time, priced))
            try:
                await self.budget.record_spend(ref, priced.cost_nusd or 0, kind="egress")
            except BudgetError as e:
                budget_error = str(e)
                log.error("attempt %s: egress spend not recorded in the budget: %s", ref, e)
        payload: dict[str, Any] = {
            "host": host,
            "port": port,
            "allowed": allowed,
            "reason": reason,
            "bytes_up": up,
            "bytes_down": down,
            "method": method,
            "duration_ms": round((time.monotonic() - started) * 1000, 3),
            "cost_nusd": sum(c.cost_nusd or 0 for c in charges),
            "budget_error": budget_error,
        }
        self.recorder.record(
            "events", [event_for(ref, self.node, EventKind.EGRESS_DECISION, payload)]
        )
        self.recorder.record("charges", charges)


def _charge(
    ref: AttemptRef, node: str, task_type: str, cid: str, start: datetime, p: Any
) -> Charge:
    return Charge(
        time=datetime.now(UTC),
        team=ref.team,
        batch=ref.batch,
        task=ref.task,
        attempt=ref.attempt,
        node=node,
        charge_id=cid,
        period_start=start,
        task_type=task_type,
        service_category=p.service_category,
        service_name=p.service_name,
        provider="sandfleet",
        model="",
        usage_bucket=p.bucket.value,
        quantity=p.quantity,
        unit=p.unit,
        unit_price_nusd=p.unit_price_nusd,
        cost_nusd=p.cost_nusd,
        cost_status=p.cost_status.value,
        price_version=p.price_version,
    )


async def _splice(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upstream: RelaySide, head: bytes
) -> tuple[int, int]:
    """Relay the agent's connection and `upstream` at the protocol level until both end.

    The agent's transport leaves its StreamReader for a `RelaySide`; bytes the reader had
    already buffered (sent right after the request head) go upstream first, after `head`.
    Returns (bytes up, bytes down).
    """
    transport = writer.transport
    assert isinstance(transport, asyncio.Transport) and upstream.transport is not None
    if transport.is_closing():  # the agent is already gone: nothing to relay
        upstream.transport.close()
        return 0, 0
    agent = RelaySide()
    agent.transport = transport
    # asyncio has no public way to take over what a StreamReader already buffered
    pending: bytearray = reader._buffer  # type: ignore[attr-defined]
    buffered = bytes(pending)
    pending.clear()
    agent.eof = reader.at_eof() or bool(reader._eof)  # type: ignore[attr-defined]
    transport.set_protocol(agent)
    if head:
        upstream.transport.write(head)
    if buffered:
        agent.data_received(buffered)  # queued in `pending` until linked
    upstream.link(agent)
    agent.link(upstream)
    transport.resume_reading()
    try:
        await asyncio.wait({agent.closed, upstream.closed}, return_when=asyncio.ALL_COMPLETED)
    finally:
        upstream.transport.close()
        transport.close()
    return len(head) + agent.received, upstream.received
