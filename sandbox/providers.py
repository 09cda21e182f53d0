"""LLM upstreams behind one `Provider` protocol, configured in `configs/providers.yaml`.

A provider speaks OpenAI's chat-completions shapes: `complete()` returns a
`chat.completion` object, `stream()` yields `chat.completion.chunk` objects ending with
a usage chunk (`choices: []`, `usage: {...}`). The gateway turns `usage` into exclusive
token buckets with `buckets_from_usage` (exactly once per call: the LAST non-null usage of
a stream wins, usages are never summed).

- `scripted` (sandbox/scripted.py): a deterministic model answering from a script file;
  its token counts follow `count_tokens` / `count_input_tokens` exactly.
- `openai` (sandbox/openai_provider.py): any OpenAI-compatible base URL; the real key is
  read from the host environment variable named in providers.yaml.

Upstream failures raise `UpstreamError` (a `SandboxError`) carrying the HTTP status and an
OpenAI-style error body for the agent.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field, model_validator

from accounting.charging import TokenCounts
from accounting.config import configs_dir, load_model
from accounting.errors import ConfigError, SandboxError

__all__ = [
    "ChatRequest",
    "Provider",
    "ProviderConfig",
    "ProvidersConfig",
    "UpstreamError",
    "buckets_from_usage",
    "count_input_tokens",
    "count_tokens",
    "load_providers",
    "load_providers_config",
    "message_text",
    "openai_usage",
]

MESSAGE_OVERHEAD_TOKENS = 1


class UpstreamError(SandboxError):
    """An LLM upstream failed; `status` and `body()` are what the agent receives."""

    def __init__(self, status: int, message: str, *, type_: str = "api_error", code: str = ""):
        super().__init__(message)
        self.status = status
        self.type = type_
        self.code = code or {502: "bad_gateway", 503: "unavailable", 504: "timeout"}.get(
            status, "upstream_error"
        )

    def body(self) -> dict[str, Any]:
        err = {"message": str(self), "type": self.type, "param": None, "code": self.code}
        return {"error": err}


# --- the token-counting rule (exact for `scripted`, an estimate for real upstreams) -------


def count_tokens(text: str) -> int:
    """ceil(UTF-8 bytes / 4): the scripted model's tokens, and the gateway's estimate."""
    return math.ceil(len(text.encode("utf-8")) / 4)


def message_text(message: Mapping[str, Any]) -> str:
    """A message's text: its string content, or the `text` of its content parts, joined."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [p.get("text") for p in content if isinstance(p, dict)]
        return "".join(t for t in texts if isinstance(t, str))
    return ""


def count_input_tokens(messages: Sequence[Mapping[str, Any]]) -> int:
    """Sum over messages of (1 + count_tokens(message_text)): the documented input rule."""
    return sum(MESSAGE_OVERHEAD_TOKENS + count_tokens(message_text(m)) for m in messages)


def openai_usage(input_uncached: int, cache_read: int, output: int, reasoning: int = 0) -> dict:
    """An OpenAI `usage` object for these buckets (prompt tokens include cached ones)."""
    prompt, completion = input_uncached + cache_read, output + reasoning
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cache_read},
        "completion_tokens_details": {"reasoning_tokens": reasoning},
    }


def _int(obj: Mapping[str, Any], key: str) -> int:
    v = obj.get(key, 0)
    if v is None:
        return 0
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"usage.{key} is {v!r}, not a whole number >= 0")
    return v


def buckets_from_usage(usage: object) -> TokenCounts:
    """OpenAI `usage` -> exclusive buckets; raises ValueError when it is malformed.

    prompt_tokens = input_uncached + input_cache_read (prompt_tokens_details.cached_tokens);
    completion_tokens = output + reasoning (completion_tokens_details.reasoning_tokens).
    """
    if not isinstance(usage, dict):
        raise ValueError(f"usage is {type(usage).__name__}, not an object")
    prompt, completion = _int(usage, "prompt_tokens"), _int(usage, "completion_tokens")
    pdet = usage.get("prompt_tokens_details") or {}
    cdet = usage.get("completion_tokens_details") or {}
    if not isinstance(pdet, dict) or not isinstance(cdet, dict):
        raise ValueError("usage details are not objects")
    cached, reasoning = _int(pdet, "cached_tokens"), _int(cdet, "reasoning_tokens")
    if cached > prompt or reasoning > completion:
        raise ValueError("usage details exceed their totals")
    return TokenCounts(
        input_uncached=prompt - cached,
        input_cache_read=cached,
        output=completion - reasoning,
        reasoning=reasoning,
    )


# --- the seam -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ChatRequest:
    """One chat call as the gateway forwards it.

    `body` is the agent's JSON body with the task token redacted and the output cap set;
    `max_output` is that cap; `call_id` names the call in the ledger.
    """

    body: Mapping[str, Any]
    model: str
    messages: Sequence[Mapping[str, Any]]
    max_output: int
    task: str
    call_id: str


@runtime_checkable
class Provider(Protocol):
    """An LLM upstream speaking OpenAI chat-completion shapes."""

    name: str
    kind: str
    models: tuple[str, ...]

    def estimate_input_tokens(self, request: ChatRequest) -> int:
        """Input tokens to reserve budget for (exact for scripted)."""
        ...

    async def complete(self, request: ChatRequest) -> dict[str, Any]:
        """A `chat.completion` object with `usage`; raises UpstreamError."""
        ...

    def stream(self, request: ChatRequest) -> AsyncIterator[dict[str, Any]]:
        """`chat.completion.chunk` objects, the last carrying `usage`; raises UpstreamError."""
        ...

    def secrets(self) -> tuple[str, ...]:
        """Strings that must never reach a sandbox (the real key)."""
        ...

    async def aclose(self) -> None: ...


# --- configuration --------------------------------------------------------------------------


class ProviderConfig(BaseModel):
    """One upstream in `configs/providers.yaml`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, description="Name used in events (`provider`).")
    kind: Literal["scripted", "openai"] = Field(description="scripted or openai.")
    models: tuple[str, ...] = Field(min_length=1, description="Model names it serves.")
    script: str | None = Field(
        None, description="scripted: script file (YAML or JSONL), relative to configs/."
    )
    base_url: str | None = Field(None, description="openai: base URL, e.g. https://host/v1.")
    api_key_env: str | None = Field(
        None, description="openai: the HOST environment variable holding the real key."
    )
    timeout_s: float = Field(120.0, gt=0, description="Longest wait for an upstream answer.")
    connect_timeout_s: float = Field(10.0, gt=0, description="Longest wait to connect.")

    @model_validator(mode="after")
    def _kind_fields(self) -> ProviderConfig:
        if self.kind == "scripted" and not self.script:
            raise ValueError("a scripted provider needs `script:` (a file under configs/)")
        if self.kind == "openai" and not (self.base_url and self.api_key_env):
            raise ValueError("an openai provider needs `base_url:` and `api_key_env:`")
        return self


class ProvidersConfig(BaseModel):
    """`configs/providers.yaml`: the LLM upstreams the gateway may call."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    default_max_tokens: int = Field(
        4096, gt=0, description="Output cap of a call that sets no max_tokens (budgets use it)."
    )
    providers: tuple[ProviderConfig, ...] = Field(description="Upstreams, first match wins.")

    @model_validator(mode="after")
    def _unique(self) -> ProvidersConfig:
        names = [p.name for p in self.providers]
        if len(set(names)) != len(names):
            raise ValueError("provider names must be unique")
        return self


def load_providers_config(path: Path | str | None = None) -> ProvidersConfig:
    p = Path(path) if path is not None else configs_dir() / "providers.yaml"
    return load_model(p, ProvidersConfig)


def load_providers(
    config: ProvidersConfig, *, base_dir: Path | None = None, env: Mapping[str, str] | None = None
) -> dict[str, Provider]:
    """Build every configured provider, keyed by model name (first provider wins)."""
    from sandbox.openai_provider import OpenAIProvider
    from sandbox.scripted import ScriptedProvider

    by_model: dict[str, Provider] = {}
    root = base_dir if base_dir is not None else configs_dir()
    for pc in config.providers:
        provider: Provider
        if pc.kind == "scripted":
            assert pc.script is not None
            provider = ScriptedProvider.from_file(root / pc.script, name=pc.name, models=pc.models)
        else:
            provider = OpenAIProvider(pc, env=env)
        for m in pc.models:
            if m in by_model:
                raise ConfigError(
                    f"providers.yaml: model {m!r} is served by both {by_model[m].name!r} and "
                    f"{pc.name!r} (fix: list it under one provider)"
                )
            by_model[m] = provider
    return by_model
