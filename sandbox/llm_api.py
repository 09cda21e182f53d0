"""The gateway's OpenAI-compatible endpoint: `POST /v1/chat/completions`, `GET /v1/models`.

One chat call, in order: the task token (Bearer) is verified on the attempt's own
socket with scope `llm:invoke`; the model must be one the attempt may use; the budget
reserves the worst case — counted input + output cap, at the model's prices — clamped
to what the caps can pay, and the call's output cap is cut to what was reserved (402
with an OpenAI-style error naming the cap when not even one output token fits); the
body goes upstream with the task token redacted; the answer comes back with the real
key redacted; the reservation settles to the actual cost. Each call is one `llm_call`
event and one charge per non-zero token bucket, also when it failed (zero tokens, the
error recorded).

Usage is counted exactly once: the upstream's `usage` (a stream's last usage chunk,
which is stripped when the agent did not ask for it). An answer without usage is
priced on the gateway's own count (`cost_status` estimated).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from accounting.charging import TokenCounts
from accounting.errors import BudgetError, CredentialError
from accounting.pricing import PriceList
from accounting.schemas import EventKind
from sandbox.credentials import SCOPE_LLM, AttemptRef, TaskCredentials
from sandbox.http1 import BadRequest, Head, read_body, read_head, response_head, write_chunk
from sandbox.http1 import write_json as _write_json
from sandbox.llm_metering import CallMeter, CallPrices, call_prices
from sandbox.providers import ChatRequest, Provider, UpstreamError, buckets_from_usage, count_tokens
from sandbox.recorder import Recorder, event_for

if TYPE_CHECKING:
    from sandbox.gateway import AttemptGrant, Budget

__all__ = ["LlmApi", "openai_error"]

log = logging.getLogger(__name__)
_SSE_HEAD = response_head(
    200,
    [
        ("Content-Type", "text/event-stream"),
        ("Cache-Control", "no-cache"),
        ("Transfer-Encoding", "chunked"),
    ],
)


def openai_error(message: str, type_: str, code: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


class _Refuse(Exception):
    """Answer the agent with this OpenAI-style error (and record it)."""

    def __init__(self, status: int, message: str, code: str, type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.code, self.type = status, code, type_


def _check_body(body: Any) -> None:
    if not isinstance(body, dict):
        raise _Refuse(400, "the request body must be a JSON object", "invalid_request")
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise _Refuse(400, "`model` is required (a string)", "invalid_request")
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) for m in msgs):
        raise _Refuse(400, "`messages` must be a non-empty list of objects", "invalid_request")
    for key in ("max_tokens", "max_completion_tokens"):
        v = body.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise _Refuse(400, f"`{key}` must be a whole number >= 1", "invalid_request")


def _choice_text(choice: Any, key: str) -> str:
    part = choice.get(key) if isinstance(choice, dict) else None
    content = part.get("content") if isinstance(part, dict) else None
    return content if isinstance(content, str) else ""


class LlmApi:
    """Serves LLM requests on one connection (keep-alive) for one attempt."""

    def __init__(
        self,
        *,
        credentials: TaskCredentials,
        providers: Mapping[str, Provider],
        budget: Budget,
        prices: PriceList,
        recorder: Recorder,
        node: str = "",
        default_max_tokens: int = 4096,
        on_budget_refused: Callable[[AttemptRef, BudgetError], Awaitable[None] | None]
        | None = None,
    ):
        self.credentials = credentials
        self.providers = providers
        self.budget = budget
        self.prices = prices
        self.recorder = recorder
        self.node = node
        self.default_max_tokens = default_max_tokens
        self.on_budget_refused = on_budget_refused
        self._secrets = tuple(s for p in providers.values() for s in p.secrets())
        self._prices: dict[str, CallPrices | None] = {}

    def _json(self, writer: Any, status: int, obj: Any, keep_alive: bool = True) -> None:
        _write_json(writer, status, obj, keep_alive=keep_alive, redact=self._secrets)

    async def serve(
        self, grant: AttemptGrant, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        while True:
            try:
                head = await read_head(reader)
                if head is None:
                    return
                body = await read_body(reader, head)
            except BadRequest as e:
                err = openai_error(str(e), "invalid_request_error", "bad_request")
                self._json(writer, e.status, err, keep_alive=False)
                await writer.drain()
                return
            keep = await self._route(grant, head, body, writer)
            await writer.drain()
            if not keep or not head.keep_alive:
                return

    async def _route(self, grant: AttemptGrant, head: Head, body: bytes, writer: Any) -> bool:
        path = head.target.split("?", 1)[0]
        if path == "/v1/chat/completions" and head.method == "POST":
            return await self._chat(grant, head, body, writer)
        try:
            if not (path.startswith("/v1/models") and head.method == "GET"):
                raise _Refuse(
                    404,
                    f"{head.method} {path} is not served here; use POST "
                    "/v1/chat/completions or GET /v1/models",
                    "unknown_url",
                )
            self._token(grant, head)
            self._json(writer, 200, self._models(grant, path))
        except _Refuse as e:
            self._json(writer, e.status, openai_error(str(e), e.type, e.code))
        return True

    def _token(self, grant: AttemptGrant, head: Head) -> str:
        scheme, _, token = (head.get("authorization") or "").partition(" ")
        token = token.strip()
        try:
            if scheme.lower() != "bearer" or not token:
                raise CredentialError(
                    "task token refused: no `Authorization: Bearer <token>` header "
                    "(fix: use OPENAI_API_KEY from the sandbox environment)"
                )
            self.credentials.verify(token, channel=grant.ref, scope=SCOPE_LLM)
        except CredentialError as e:
            raise _Refuse(401, str(e), "invalid_api_key") from None
        return token

    def _models(self, grant: AttemptGrant, path: str) -> dict[str, Any]:
        models = [
            {"id": m, "object": "model", "created": 0, "owned_by": self.providers[m].name}
            for m in grant.models
            if m in self.providers
        ]
        wanted = path.removeprefix("/v1/models").strip("/")
        if not wanted:
            return {"object": "list", "data": models}
        for m in models:
            if m["id"] == wanted:
                return m
        raise _Refuse(404, f"model {wanted!r} is not available to this task", "model_not_found")

    # -- chat ----------------------------------------------------------------------------------

    def _call_prices(self, model: str) -> CallPrices | None:
        if model not in self._prices:
            self._prices[model] = call_prices(self.prices, model)
        return self._prices[model]

    async def _chat(self, grant: AttemptGrant, head: Head, raw: bytes, writer: Any) -> bool:
        meter = CallMeter(uuid.uuid4().hex[:24], time.monotonic(), datetime.now(UTC))
        reservation: Any = None
        try:
            token = self._token(grant, head)
            if not self.recorder.healthy:
                raise _Refuse(
                    503,
                    "the gateway cannot record to the ledger right now; retry later",
                    "metering_unavailable",
                    "api_error",
                )
            try:
                body = json.loads(raw.decode("utf-8").replace(token, "[REDACTED]"))
            except (UnicodeDecodeError, ValueError):
                raise _Refuse(400, "the request body is not JSON", "invalid_json") from None
            _check_body(body)
            meter.model, meter.stream = body["model"], bool(body.get("stream"))
            provider = self.providers.get(meter.model)
            if meter.model not in grant.models or provider is None:
                raise _Refuse(
                    404,
                    f"the model {meter.model!r} does not exist or this task may "
                    f"not use it (allowed: {', '.join(grant.models) or 'none'})",
                    "model_not_found",
                )
            meter.provider = provider.name
            prices = self._call_prices(meter.model)
            if prices is None:
                raise _Refuse(
                    503,
                    f"the model {meter.model!r} has no price in configs/pricing"
                    ".yaml; an operator must add one",
                    "model_not_priced",
                    "api_error",
                )
            cap_key = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
            wanted = body.get(cap_key) or self.default_max_tokens
            request = ChatRequest(
                body, meter.model, body["messages"], wanted, grant.ref.task, meter.call_id
            )
            est_in = provider.estimate_input_tokens(request)
            try:
                reservation = await self.budget.reserve(
                    grant.ref,
                    prices.worst_case(est_in, wanted),
                    min_nusd=prices.worst_case(est_in, 1),
                )
            except BudgetError as e:
                await self._refused(grant.ref, e)
                raise _Refuse(402, str(e), "budget_exceeded", "insufficient_quota") from None
            meter.reserved_nusd = reservation.amount_nusd
            meter.output_cap = prices.output_cap_for(reservation.amount_nusd, est_in, wanted)
            body = {**body, cap_key: meter.output_cap}
            request = ChatRequest(
                body, meter.model, body["messages"], meter.output_cap, grant.ref.task, meter.call_id
            )
            if meter.stream:
                return await self._stream(meter, provider, request, est_in, writer)
            return await self._complete(meter, provider, request, est_in, writer)
        except _Refuse as e:
            meter.fail(e.status, str(e))
            self._json(writer, e.status, openai_error(str(e), e.type, e.code))
            return True
        finally:
            await self._finish(grant, meter, reservation)

    async def _refused(self, ref: AttemptRef, e: BudgetError) -> None:
        if self.on_budget_refused is not None:
            result = self.on_budget_refused(ref, e)
            if asyncio.iscoroutine(result):
                await result

    async def _complete(
        self, meter: CallMeter, provider: Provider, request: ChatRequest, est_in: int, writer: Any
    ) -> bool:
        try:
            obj = await provider.complete(request)
        except UpstreamError as e:
            raise _Refuse(e.status, str(e), e.code, e.type) from None
        try:
            meter.tokens = buckets_from_usage(obj.get("usage"))
        except ValueError as e:
            text = "".join(_choice_text(c, "message") for c in obj.get("choices") or [])
            meter.tokens = TokenCounts(input_uncached=est_in, output=count_tokens(text))
            meter.estimated, meter.error = True, f"usage missing or malformed ({e}); estimated"
        self._json(writer, 200, obj)
        return True

    async def _stream(
        self, meter: CallMeter, provider: Provider, request: ChatRequest, est_in: int, writer: Any
    ) -> bool:
        opts = request.body.get("stream_options")
        wants_usage = isinstance(opts, dict) and opts.get("include_usage") is True
        chunks = provider.stream(request)
        usage: Any = None
        text: list[str] = []
        started = False
        try:
            async for chunk in chunks:
                if chunk.get("usage") is not None:
                    usage = chunk["usage"]  # the last usage wins; never summed
                if not wants_usage:
                    if not chunk.get("choices"):
                        continue
                    chunk = {k: v for k, v in chunk.items() if k != "usage"}
                text += [_choice_text(c, "delta") for c in chunk.get("choices") or []]
                if not started:
                    writer.write(_SSE_HEAD)
                    started = True
                write_chunk(writer, self._sse(chunk))
                await writer.drain()
        except UpstreamError as e:
            if not started:
                raise _Refuse(e.status, str(e), e.code, e.type) from None
            meter.fail(e.status, str(e))
            write_chunk(writer, self._sse(e.body()))
        except (ConnectionError, asyncio.CancelledError) as e:
            meter.fail(499, f"the agent closed the connection ({type(e).__name__})")
            await chunks.aclose()  # type: ignore[attr-defined]
            self._count_stream(meter, usage, est_in, text)
            if isinstance(e, asyncio.CancelledError):
                raise
            return False
        if not started:
            writer.write(_SSE_HEAD)
        if meter.status == 200:
            write_chunk(writer, b"data: [DONE]\n\n")
        write_chunk(writer, b"")
        self._count_stream(meter, usage, est_in, text)
        return True

    def _count_stream(self, meter: CallMeter, usage: Any, est_in: int, text: list[str]) -> None:
        if usage is not None:
            try:
                meter.tokens = buckets_from_usage(usage)
                return
            except ValueError as e:
                meter.error = meter.error or f"usage malformed ({e})"
        if meter.status == 200 or text:
            meter.tokens = TokenCounts(input_uncached=est_in, output=count_tokens("".join(text)))
            meter.estimated = True
            meter.error = meter.error or "the stream carried no usage; estimated"

    def _sse(self, obj: Any) -> bytes:
        data = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
        for secret in self._secrets:
            data = data.replace(secret, "[REDACTED]")
        return b"data: " + data.encode("utf-8") + b"\n\n"

    async def _finish(self, grant: AttemptGrant, meter: CallMeter, reservation: Any) -> None:
        """Settle the reservation and record the call's event and charges."""
        end = datetime.now(UTC)
        charges = meter.charges(
            self.prices, end=end, ref=grant.ref, node=self.node, task_type=grant.task_type
        )
        cost = sum(c.cost_nusd or 0 for c in charges)
        if reservation is not None:
            try:
                await self.budget.settle(reservation.id, cost)
            except BudgetError as e:
                meter.extra["settle_error"] = str(e)
                log.error("attempt %s: settling call %s failed: %s", grant.ref, meter.call_id, e)
        latency = round((time.monotonic() - meter.started) * 1000, 3)
        payload = meter.payload(
            cost_nusd=cost, latency_ms=latency, price_version=self.prices.price_version
        )
        event = event_for(grant.ref, self.node, EventKind.LLM_CALL, payload)
        self.recorder.record("events", [event])
        self.recorder.record("charges", charges)
