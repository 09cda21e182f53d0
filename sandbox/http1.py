"""Just enough HTTP/1.1 for the gateway, on asyncio streams (no framework).

Server side only: read one request head (bounded), read a body (Content-Length or
chunked, bounded), write a response with a fixed length, or a chunked one (SSE). The
sandbox is untrusted, so every read has a limit and a bad request is a `BadRequest`
that the caller answers with its status and then closes the connection.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

from accounting.errors import SandboxError

__all__ = [
    "MAX_BODY",
    "MAX_HEAD",
    "BadRequest",
    "Head",
    "read_body",
    "read_head",
    "response_head",
    "write_chunk",
    "write_json",
]

MAX_HEAD = 64 * 1024
MAX_BODY = 16 * 1024 * 1024
_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    402: "Payment Required",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    413: "Payload Too Large",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


class BadRequest(SandboxError):
    """The sandbox sent something that is not acceptable HTTP; answer `status` and close."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Head:
    """A parsed request line and headers (names lowercased, in order)."""

    method: str
    target: str
    version: str
    headers: tuple[tuple[str, str], ...]
    raw: bytes  # the head exactly as received (the proxy forwards plain HTTP from it)

    def get(self, name: str, default: str | None = None) -> str | None:
        name = name.lower()
        for k, v in self.headers:
            if k == name:
                return v
        return default

    @property
    def keep_alive(self) -> bool:
        conn = (self.get("connection") or "").lower()
        if self.version == "HTTP/1.0":
            return "keep-alive" in conn
        return "close" not in conn


async def read_head(reader: asyncio.StreamReader) -> Head | None:
    """The next request head, or None at a clean end of stream."""
    try:
        raw = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as e:
        if not e.partial.strip():
            return None
        raise BadRequest(400, "the connection ended inside a request head") from None
    except asyncio.LimitOverrunError:
        raise BadRequest(431, f"request head larger than {MAX_HEAD} bytes") from None
    if len(raw) > MAX_HEAD:
        raise BadRequest(431, f"request head larger than {MAX_HEAD} bytes")
    try:
        text = raw.decode("latin-1")
        line, *rest = text[:-4].split("\r\n")
        method, target, version = line.split(" ")
    except ValueError:
        raise BadRequest(400, "malformed request line") from None
    if version not in ("HTTP/1.1", "HTTP/1.0") or not method.isalpha():
        raise BadRequest(400, f"unsupported request line {line[:80]!r}")
    headers = []
    for h in rest:
        name, sep, value = h.partition(":")
        if not sep or not name or name != name.strip():
            raise BadRequest(400, f"malformed header line {h[:80]!r}")
        headers.append((name.lower(), value.strip()))
    return Head(method.upper(), target, version, tuple(headers), raw)


async def read_body(reader: asyncio.StreamReader, head: Head, limit: int = MAX_BODY) -> bytes:
    """The request body (Content-Length or chunked), at most `limit` bytes."""
    te = (head.get("transfer-encoding") or "").lower()
    if te:
        if te != "chunked":
            raise BadRequest(400, f"unsupported transfer-encoding {te!r}")
        return await _read_chunked(reader, limit)
    length_text = head.get("content-length")
    if length_text is None:
        return b""
    if not length_text.isdigit():
        raise BadRequest(400, "bad content-length")
    length = int(length_text)
    if length > limit:
        raise BadRequest(413, f"request body larger than {limit} bytes")
    try:
        return await reader.readexactly(length)
    except asyncio.IncompleteReadError:
        raise BadRequest(400, "the connection ended inside the body") from None


async def _read_chunked(reader: asyncio.StreamReader, limit: int) -> bytes:
    out = bytearray()
    try:
        while True:
            size_line = await reader.readuntil(b"\r\n")
            try:
                size = int(size_line.split(b";")[0].strip(), 16)
            except ValueError:
                raise BadRequest(400, "bad chunk size") from None
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":
                    pass  # trailers are read and dropped
                return bytes(out)
            if len(out) + size > limit:
                raise BadRequest(413, f"request body larger than {limit} bytes")
            out += await reader.readexactly(size)
            if await reader.readexactly(2) != b"\r\n":
                raise BadRequest(400, "bad chunk terminator")
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        raise BadRequest(400, "the connection ended inside a chunked body") from None


def response_head(status: int, headers: list[tuple[str, str]]) -> bytes:
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}"]
    lines += [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def write_json(
    writer: asyncio.StreamWriter,
    status: int,
    obj: Any,
    *,
    keep_alive: bool = True,
    redact: tuple[str, ...] = (),
) -> int:
    """Write a complete JSON response; returns the body's length."""
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    for secret in redact:
        text = text.replace(secret, "[REDACTED]")
    body = text.encode("utf-8")
    headers = [
        ("Content-Type", "application/json"),
        ("Content-Length", str(len(body))),
        ("Connection", "keep-alive" if keep_alive else "close"),
    ]
    writer.write(response_head(status, headers) + body)
    return len(body)


def write_chunk(writer: asyncio.StreamWriter, data: bytes) -> None:
    """One chunk of a chunked response; empty data ends the response."""
    if data:
        writer.write(b"%x\r\n%b\r\n" % (len(data), data))
    else:
        writer.write(b"0\r\n\r\n")
