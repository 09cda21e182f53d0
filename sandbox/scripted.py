"""The `scripted` provider: a deterministic model answering from a script file.

For offline demos and tests. A script is YAML (`rules: [...]`, optional
`cache_system_prompt: true`) or JSONL (one rule per line). The first rule whose match
keys all hold answers; a rule without match keys matches everything::

    - task: "fix-*"          # fnmatch on the task id
      prompt: "(?i)failing"  # regex searched in the last user message
      turn: 1                # 1 + the number of assistant messages in the request
      reply: "Run pytest -q"
      delay_ms: 0            # wait before answering (streams: before the first chunk)
      error: {status: 500, message: "boom"}   # answer with this error instead

Token rule (exact, so tests can predict cost): `count_tokens(s) = ceil(utf8 bytes / 4)`;
input = sum over messages of (1 + count_tokens(text)); output = count_tokens(reply),
where a reply longer than the call's output cap is cut to cap x 4 bytes (on a character
boundary, finish_reason `length`). With `cache_system_prompt`, from turn 2 on the leading
system messages' tokens are `input_cache_read`, the rest `input_uncached`.
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
import re
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from accounting.config import describe_validation_error, read_yaml
from accounting.errors import ConfigError
from sandbox.providers import (
    MESSAGE_OVERHEAD_TOKENS,
    ChatRequest,
    UpstreamError,
    count_input_tokens,
    count_tokens,
    message_text,
    openai_usage,
)

__all__ = ["Script", "ScriptRule", "ScriptedProvider", "load_script"]

_CHUNK_BYTES = 16


class ScriptError(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    status: int = Field(500, ge=400, le=599, description="HTTP status the agent receives.")
    message: str = Field("scripted upstream error", description="The error's message.")
    type: str = Field("api_error", description="OpenAI error type.")


class ScriptRule(BaseModel):
    """One scripted answer and when it applies."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    task: str | None = Field(None, description="fnmatch pattern on the task id.")
    prompt: str | None = Field(None, description="Regex searched in the last user message.")
    turn: int | None = Field(None, ge=1, description="1 + assistant messages in the request.")
    reply: str = Field("", description="The assistant's answer.")
    delay_ms: int = Field(0, ge=0, le=600_000, description="Wait before answering.")
    error: ScriptError | None = Field(None, description="Answer with this error instead.")

    @field_validator("prompt")
    @classmethod
    def _regex(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as e:
                raise ValueError(f"prompt {v!r} is not a valid regex: {e}") from None
        return v


class Script(BaseModel):
    """A whole script file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cache_system_prompt: bool = Field(
        False, description="From turn 2, leading system messages count as cache reads."
    )
    rules: tuple[ScriptRule, ...] = Field(description="Answers, first match wins.")


def load_script(path: Path) -> Script:
    """Read a YAML or JSONL script, with errors naming the file, line or field."""
    try:
        if path.suffix == ".jsonl":
            lines = path.read_text().splitlines()
            rules = []
            for n, line in enumerate(lines, 1):
                if line.strip():
                    try:
                        rules.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        msg = f"{path}:{n}: not JSON: {e} (fix: one object per line)"
                        raise ConfigError(msg) from None
            data: Any = {"rules": rules}
        else:
            data = read_yaml(path)
    except OSError as e:
        msg = f"{path}: cannot read the script: {e.strerror} (fix: check the path)"
        raise ConfigError(msg) from None
    try:
        return Script.model_validate(data)
    except ValidationError as e:
        raise ConfigError(describe_validation_error(e, where=str(path))) from None


def turn_of(messages: Sequence[Any]) -> int:
    return 1 + sum(1 for m in messages if isinstance(m, dict) and m.get("role") == "assistant")


def _truncate(text: str, max_tokens: int) -> tuple[str, bool]:
    data = text.encode("utf-8")
    if count_tokens(text) <= max_tokens:
        return text, False
    return data[: max_tokens * 4].decode("utf-8", errors="ignore"), True


class ScriptedProvider:
    """See the module doc. Stateless: the answer depends only on the request."""

    kind = "scripted"

    def __init__(self, script: Script, *, name: str = "scripted", models: Sequence[str] = ()):
        self.script = script
        self.name = name
        self.models = tuple(models) or ("scripted",)

    @classmethod
    def from_file(cls, path: Path, *, name: str, models: Sequence[str]) -> ScriptedProvider:
        return cls(load_script(path), name=name, models=models)

    def estimate_input_tokens(self, request: ChatRequest) -> int:
        return count_input_tokens(request.messages)

    def secrets(self) -> tuple[str, ...]:
        return ()

    async def aclose(self) -> None:
        return None

    def _rule(self, request: ChatRequest) -> ScriptRule:
        turn = turn_of(request.messages)
        users = [m for m in request.messages if m.get("role") == "user"]
        last_user = message_text(users[-1]) if users else ""
        for rule in self.script.rules:
            if rule.task is not None and not fnmatch.fnmatchcase(request.task, rule.task):
                continue
            if rule.prompt is not None and not re.search(rule.prompt, last_user):
                continue
            if rule.turn is not None and rule.turn != turn:
                continue
            return rule
        raise UpstreamError(
            500,
            f"scripted: no rule matches task {request.task!r} turn {turn}; add a rule "
            "(or a catch-all rule without match keys) to the script",
        )

    def _input_split(self, request: ChatRequest) -> tuple[int, int]:
        total = count_input_tokens(request.messages)
        if not self.script.cache_system_prompt or turn_of(request.messages) < 2:
            return total, 0
        cached = 0
        for m in request.messages:
            if m.get("role") != "system":
                break
            cached += MESSAGE_OVERHEAD_TOKENS + count_tokens(message_text(m))
        return total - cached, cached

    async def _answer(self, request: ChatRequest) -> tuple[str, str, dict[str, Any]]:
        rule = self._rule(request)
        if rule.delay_ms:
            await asyncio.sleep(rule.delay_ms / 1000)
        if rule.error is not None:
            raise UpstreamError(rule.error.status, rule.error.message, type_=rule.error.type)
        text, cut = _truncate(rule.reply, request.max_output)
        uncached, cached = self._input_split(request)
        return text, "length" if cut else "stop", openai_usage(uncached, cached, count_tokens(text))

    def _base(self, request: ChatRequest, obj: str) -> dict[str, Any]:
        return {
            "id": f"chatcmpl-{request.call_id}",
            "object": obj,
            "created": int(time.time()),
            "model": request.model,
            "system_fingerprint": "scripted",
        }

    async def complete(self, request: ChatRequest) -> dict[str, Any]:
        text, finish, usage = await self._answer(request)
        message = {"role": "assistant", "content": text, "refusal": None}
        choice = {"index": 0, "message": message, "finish_reason": finish, "logprobs": None}
        return {**self._base(request, "chat.completion"), "choices": [choice], "usage": usage}

    async def stream(self, request: ChatRequest) -> AsyncIterator[dict[str, Any]]:
        text, finish, usage = await self._answer(request)
        base = self._base(request, "chat.completion.chunk")

        def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
            return {**base, "choices": [choice], "usage": None}

        yield chunk({"role": "assistant", "content": ""})
        pieces = re.findall(r"\S*\s*", text) if text else []
        buf = ""
        for piece in pieces:
            buf += piece
            if len(buf.encode()) >= _CHUNK_BYTES:
                yield chunk({"content": buf})
                buf = ""
        if buf:
            yield chunk({"content": buf})
        yield chunk({}, finish)
        yield {**base, "choices": [], "usage": usage}
