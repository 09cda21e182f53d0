"""Providers, scripts and metering arithmetic: pure rules, tested without a gateway."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from accounting.charging import TokenCounts
from accounting.config import configs_dir
from accounting.errors import ConfigError
from accounting.pricing import load_pricing
from sandbox.llm_metering import CallPrices, call_prices
from sandbox.openai_provider import OpenAIProvider
from sandbox.providers import (
    ChatRequest,
    ProviderConfig,
    ProvidersConfig,
    UpstreamError,
    buckets_from_usage,
    count_input_tokens,
    count_tokens,
    load_providers,
    load_providers_config,
)
from sandbox.scripted import ScriptedProvider, load_script


def request(*messages: dict[str, Any], task: str = "t1", cap: int = 100) -> ChatRequest:
    body = {"model": "scripted", "messages": list(messages)}
    return ChatRequest(body, "scripted", list(messages), cap, task, "call1")


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def test_every_shipped_provider_config_and_script_loads() -> None:
    config = load_providers_config()
    assert {p.kind for p in config.providers} == {"scripted", "openai"}
    providers = load_providers(config, env={})
    assert providers["scripted"].kind == "scripted"
    for script in sorted((configs_dir() / "scripts").glob("*.yaml")):
        assert load_script(script).rules


def test_every_served_model_has_a_price() -> None:
    prices = load_pricing()
    for provider in load_providers_config().providers:
        for model in provider.models:
            assert call_prices(prices, model) is not None, model


def test_the_token_rule_is_utf8_bytes_over_four_rounded_up() -> None:
    assert [count_tokens(s) for s in ("", "a", "abcd", "abcde", "é", "日本語")] == [
        0,
        1,
        1,
        2,
        1,
        3,
    ]
    parts = {"role": "user", "content": [{"type": "text", "text": "abcd"}, {"type": "image"}]}
    assert count_input_tokens([user("abcdefgh"), parts]) == (1 + 2) + (1 + 1)


def test_openai_usage_maps_to_exclusive_buckets() -> None:
    usage = {
        "prompt_tokens": 100,
        "completion_tokens": 40,
        "prompt_tokens_details": {"cached_tokens": 30},
        "completion_tokens_details": {"reasoning_tokens": 25},
    }
    assert buckets_from_usage(usage) == TokenCounts(
        input_uncached=70, input_cache_read=30, output=15, reasoning=25
    )
    assert buckets_from_usage({"prompt_tokens": 5, "completion_tokens": 2}).input_uncached == 5


@pytest.mark.parametrize(
    "usage",
    [
        None,
        [],
        {"prompt_tokens": -1},
        {"prompt_tokens": "9"},
        {"prompt_tokens": 1.5},
        {"prompt_tokens": 1, "prompt_tokens_details": {"cached_tokens": 2}},
    ],
)
def test_malformed_usage_is_refused(usage: object) -> None:
    with pytest.raises(ValueError):
        buckets_from_usage(usage)


def test_scripted_rules_match_task_prompt_and_turn_in_order(tmp_path: Path) -> None:
    script = tmp_path / "s.yaml"
    script.write_text(
        "rules:\n"
        "  - {task: 'fix-*', turn: 2, reply: second}\n"
        "  - {task: 'fix-*', prompt: '(?i)hello', reply: greeting}\n"
        "  - {reply: fallback}\n"
    )
    p = ScriptedProvider(load_script(script))
    answer = lambda r: asyncio.run(p.complete(r))["choices"][0]["message"]["content"]  # noqa: E731
    assert answer(request(user("Hello"), task="fix-1")) == "greeting"
    assert answer(request(user("Hello"), task="other")) == "fallback"
    turn2 = request(user("a"), {"role": "assistant", "content": "b"}, user("HELLO"), task="fix-9")
    assert answer(turn2) == "second"


def test_scripted_jsonl_scripts_and_forced_errors(tmp_path: Path) -> None:
    script = tmp_path / "s.jsonl"
    script.write_text('{"prompt": "boom", "error": {"status": 429, "message": "slow down"}}\n')
    p = ScriptedProvider(load_script(script))
    with pytest.raises(UpstreamError) as e:
        asyncio.run(p.complete(request(user("boom"))))
    assert e.value.status == 429 and e.value.body()["error"]["message"] == "slow down"
    with pytest.raises(UpstreamError, match="no rule matches"):
        asyncio.run(p.complete(request(user("other"))))


def test_scripted_reply_is_cut_at_the_output_cap_on_a_character_boundary(tmp_path: Path) -> None:
    script = tmp_path / "s.yaml"
    script.write_text("rules:\n  - reply: 'ééééééé'\n")  # 14 bytes = 4 tokens
    p = ScriptedProvider(load_script(script))
    out = asyncio.run(p.complete(request(user("x"), cap=2)))
    text = out["choices"][0]["message"]["content"]
    assert text == "éééé" and out["choices"][0]["finish_reason"] == "length"
    assert out["usage"]["completion_tokens"] == count_tokens(text) == 2


def test_a_bad_script_names_the_file_and_the_fix(tmp_path: Path) -> None:
    script = tmp_path / "s.yaml"
    script.write_text("rules:\n  - {prompt: '(', reply: x}\n")
    with pytest.raises(ConfigError, match=r"s\.yaml.*not a valid regex"):
        load_script(script)
    bad = tmp_path / "s.jsonl"
    bad.write_text("{not json}\n")
    with pytest.raises(ConfigError, match=r"s\.jsonl:1: not JSON"):
        load_script(bad)


def test_providers_config_refuses_incomplete_or_overlapping_providers(tmp_path: Path) -> None:
    f = tmp_path / "providers.yaml"
    f.write_text("providers:\n  - {name: x, kind: openai, models: [m]}\n")
    with pytest.raises(ConfigError, match="base_url"):
        load_providers_config(f)
    two = ProvidersConfig(
        providers=(
            ProviderConfig(name="a", kind="scripted", models=("m",), script="scripts/test.yaml"),
            ProviderConfig(name="b", kind="scripted", models=("m",), script="scripts/test.yaml"),
        )
    )
    with pytest.raises(ConfigError, match="served by both"):
        load_providers(two)


def test_an_openai_provider_without_its_key_answers_503_naming_the_variable() -> None:
    cfg = ProviderConfig(
        name="o",
        kind="openai",
        models=("gpt-4o",),
        base_url="http://127.0.0.1:9/v1",
        api_key_env="NO_SUCH_KEY",
    )
    with pytest.raises(UpstreamError) as e:
        asyncio.run(OpenAIProvider(cfg, env={}).complete(request(user("x"))))
    assert e.value.status == 503 and "NO_SUCH_KEY" in str(e.value)


def test_reservations_and_output_caps_follow_the_model_prices() -> None:
    prices = CallPrices(input=Decimal("0.4"), output=Decimal("1.6"))
    assert prices.worst_case(10, 100) == 4 + 160
    assert prices.output_cap_for(4 + 160, 10, 100) == 100
    assert prices.output_cap_for(4 + 16, 10, 100) == 10
    assert prices.output_cap_for(5, 10, 100) == 1
    gpt = call_prices(load_pricing(), "gpt-4.1-mini")
    assert gpt == CallPrices(input=Decimal("400"), output=Decimal("1600"))
    assert call_prices(load_pricing(), "no-such-model") is None
