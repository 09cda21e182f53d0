"""The `openai` provider: any OpenAI-compatible `/chat/completions` upstream (aiohttp).

The real key comes from the host environment variable named by `api_key_env`; only the
gateway process ever holds it. Requests carry only that key and a JSON body (never an
agent's headers). Streams ask for `stream_options.include_usage` so usage arrives once,
in the last chunk. Everything that goes wrong becomes an `UpstreamError`:

| upstream | agent gets |
|---|---|
| cannot connect | 502 `bad_gateway` |
| no answer within `timeout_s` (or a stream idle that long) | 504 `timeout` |
| 401 / 403 (the gateway's own key is bad) | 502, naming `api_key_env` |
| 400, 404, 409, 413, 422, 429 | the same status and the upstream's message |
| other 4xx / any 5xx | 502 with the upstream's status and message |
| 200 with a body that is not a completion (or an SSE line that is not JSON) | 502 |
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp

from sandbox.providers import ChatRequest, ProviderConfig, UpstreamError, count_input_tokens

__all__ = ["OpenAIProvider"]

_PASS_THROUGH = {400, 404, 409, 413, 422, 429}
_SHOWN = 200  # characters of a bad upstream body quoted in an error


class OpenAIProvider:
    """See the module doc."""

    kind = "openai"

    def __init__(self, config: ProviderConfig, *, env: Mapping[str, str] | None = None):
        assert config.base_url and config.api_key_env
        self.config = config
        self.name = config.name
        self.models = config.models
        self._url = config.base_url.rstrip("/") + "/chat/completions"
        self._key = (env if env is not None else os.environ).get(config.api_key_env, "")
        self._session: aiohttp.ClientSession | None = None

    def estimate_input_tokens(self, request: ChatRequest) -> int:
        return count_input_tokens(request.messages)

    def secrets(self) -> tuple[str, ...]:
        return (self._key,) if self._key else ()

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _redact(self, text: str) -> str:
        return text.replace(self._key, "[REDACTED]") if self._key else text

    def _client(self) -> aiohttp.ClientSession:
        if not self._key:
            raise UpstreamError(
                503,
                f"provider {self.name!r} has no key: the gateway's environment lacks "
                f"{self.config.api_key_env} (an operator must set it and restart the gateway)",
                code="provider_not_configured",
            )
        if self._session is None or self._session.closed:
            timeout = aiohttp.ClientTimeout(
                total=None, connect=self.config.connect_timeout_s, sock_read=self.config.timeout_s
            )
            self._session = aiohttp.ClientSession(timeout=timeout, trust_env=False)
        return self._session

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._key}", "Content-Type": "application/json"}

    def _error_for(self, status: int, text: str) -> UpstreamError:
        message, type_ = text[:_SHOWN], "api_error"
        try:
            err = json.loads(text).get("error")
            if isinstance(err, dict):
                message = str(err.get("message", message))
                type_ = str(err.get("type") or type_)
            elif isinstance(err, str):
                message = err
        except (ValueError, AttributeError):
            pass  # not JSON: quote the raw text
        message = self._redact(message)
        if status in (401, 403):
            return UpstreamError(
                502,
                f"upstream {self.name!r} refused the gateway's key (HTTP {status}: {message}); "
                f"an operator must fix {self.config.api_key_env}",
            )
        if status in _PASS_THROUGH:
            return UpstreamError(status, f"upstream {self.name!r}: {message}", type_=type_)
        return UpstreamError(502, f"upstream {self.name!r} returned HTTP {status}: {message}")

    def _transport_error(self, e: BaseException) -> UpstreamError:
        if isinstance(e, TimeoutError | aiohttp.ServerTimeoutError):
            return UpstreamError(
                504, f"upstream {self.name!r} did not answer within {self.config.timeout_s}s"
            )
        return UpstreamError(
            502, f"cannot reach upstream {self.name!r}: {self._redact(f'{type(e).__name__}: {e}')}"
        )

    def _malformed(self, what: str, text: str) -> UpstreamError:
        quoted = self._redact(text[:_SHOWN])
        return UpstreamError(502, f"upstream {self.name!r} sent a malformed {what}: {quoted!r}")

    async def complete(self, request: ChatRequest) -> dict[str, Any]:
        body = {k: v for k, v in request.body.items() if k != "stream_options"}
        body["stream"] = False
        try:
            async with asyncio.timeout(self.config.timeout_s):
                async with self._client().post(
                    self._url, data=json.dumps(body), headers=self._headers()
                ) as resp:
                    text = await resp.text(errors="replace")
                    status = resp.status
        except (TimeoutError, aiohttp.ClientError) as e:
            raise self._transport_error(e) from None
        if status != 200:
            raise self._error_for(status, text)
        try:
            obj = json.loads(text)
        except ValueError:
            raise self._malformed("response (not JSON)", text) from None
        if not isinstance(obj, dict) or not isinstance(obj.get("choices"), list):
            raise self._malformed("response (no choices)", text)
        return obj

    async def stream(self, request: ChatRequest) -> AsyncIterator[dict[str, Any]]:
        body = dict(request.body)
        body["stream"] = True
        options = body.get("stream_options")
        body["stream_options"] = {**(options if isinstance(options, dict) else {})}
        body["stream_options"]["include_usage"] = True
        try:
            async with self._client().post(
                self._url, data=json.dumps(body), headers=self._headers()
            ) as resp:
                if resp.status != 200:
                    raise self._error_for(resp.status, await resp.text(errors="replace"))
                async for raw in resp.content:
                    line = raw.decode("utf-8", errors="replace").strip()
                    if not line or line.startswith((":", "event:", "id:", "retry:")):
                        continue
                    if not line.startswith("data:"):
                        raise self._malformed("stream line", line)
                    data = line[5:].strip()
                    if data == "[DONE]":
                        return
                    try:
                        obj = json.loads(data)
                    except ValueError:
                        raise self._malformed("stream chunk (not JSON)", data) from None
                    if not isinstance(obj, dict):
                        raise self._malformed("stream chunk", data)
                    if "error" in obj:
                        raise self._error_for(500, data)
                    yield obj
        except (TimeoutError, aiohttp.ClientError) as e:
            raise self._transport_error(e) from None
        raise UpstreamError(502, f"upstream {self.name!r} ended the stream without [DONE]")
