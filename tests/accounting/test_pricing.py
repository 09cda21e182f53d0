"""Pricing: the shipped price list, the exact rounding rule, unknown models, LLM charges."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from accounting.charging import TokenCounts, llm_call_charges, resource_charges
from accounting.config import configs_dir
from accounting.errors import ConfigError, SchemaError
from accounting.pricing import (
    LLM_BUCKETS,
    PriceList,
    load_pricing,
    price_usage,
    unit_price_nusd,
)
from accounting.schemas import CostStatus, UsageBucket
from accounting.validation import to_table

PRICES = load_pricing()
T1 = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
T0 = T1 - timedelta(seconds=4)


def _prices(**token_prices: str) -> PriceList:
    tp = {b.value: "1" for b in LLM_BUCKETS} | token_prices
    return PriceList.model_validate(
        {
            "models": [{"provider": "p", "name": "m", "usd_per_1m_tokens": tp}],
            "compute": {"usd_per_vcpu_hour": "0.036", "usd_per_gib_hour": "0.0036"},
            "storage": {"usd_per_gib_month": "0.073", "hours_per_month": 730},
            "network": {"usd_per_egress_gib": "0.09"},
        }
    )


def test_shipped_price_list_names_current_models_of_both_providers() -> None:
    names = {m.name for m in PRICES.models}
    expected = {"gpt-4.1", "gpt-4.1-mini", "gpt-4o", "gpt-4o-mini", "o3", "o4-mini"}
    expected |= {"claude-sonnet-4", "claude-opus-4", "claude-3.5-haiku", "scripted"}
    assert expected <= names


def test_price_version_is_a_short_hash_of_the_file_content(tmp_path: Path) -> None:
    shipped = configs_dir() / "pricing.yaml"
    assert PRICES.price_version == hashlib.sha256(shipped.read_bytes()).hexdigest()[:12]
    edited = tmp_path / "pricing.yaml"
    edited.write_text(shipped.read_text().replace('output: "8.00"', 'output: "8.01"', 1))
    assert load_pricing(edited).price_version != PRICES.price_version


def test_price_version_key_in_the_file_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "pricing.yaml"
    f.write_text((configs_dir() / "pricing.yaml").read_text() + "\nprice_version: abc\n")
    with pytest.raises(ConfigError, match=r"price_version.*remove the key"):
        load_pricing(f)


def test_scripted_model_is_priced_like_gpt_4_1_mini() -> None:
    scripted, mini = PRICES.find_model("scripted"), PRICES.find_model("gpt-4.1-mini")
    assert scripted is not None and mini is not None
    assert scripted.usd_per_1m_tokens == mini.usd_per_1m_tokens
    assert "gpt-4.1-mini" in scripted.note


def test_output_tokens_of_a_known_model_cost_list_price_exactly() -> None:
    p = price_usage(PRICES, "output", 1234, model="claude-sonnet-4")
    # $15 per 1M output tokens = 15,000 nUSD per token
    assert p.unit_price_nusd == Decimal(15000)
    assert p.cost_nusd == 1234 * 15000
    assert p.cost_status is CostStatus.FINAL
    assert p.price_version == PRICES.price_version
    assert (p.service_category, p.unit, p.provider) == (
        "AI and Machine Learning",
        "tokens",
        "anthropic",
    )


def test_cached_input_is_cheaper_than_uncached_for_every_model() -> None:
    for m in PRICES.models:
        t = m.usd_per_1m_tokens
        assert t.input_cache_read < t.input_uncached, m.name
        assert t.reasoning == t.output, m.name


def test_aliases_and_provider_prefixed_names_resolve_to_the_canonical_model() -> None:
    for name in ("claude-sonnet-4-20250514", "ANTHROPIC/claude-sonnet-4", "Claude-Sonnet-4-0"):
        p = price_usage(PRICES, "input_uncached", 10, model=name)
        assert p.model == "claude-sonnet-4"
        assert p.cost_nusd == 10 * 3000


def test_unknown_model_has_unknown_cost_never_zero() -> None:
    p = price_usage(PRICES, "output", 500, model="gpt-99-turbo")
    assert p.cost_nusd is None
    assert p.unit_price_nusd is None
    assert p.cost_status is CostStatus.UNKNOWN
    assert p.model == "gpt-99-turbo"


def test_one_vcpu_hour_costs_the_listed_hourly_price() -> None:
    p = price_usage(PRICES, UsageBucket.CPU, 3600)
    assert p.cost_nusd == 40_480_000  # $0.04048
    assert p.unit == "core-seconds"
    assert p.unit_price_nusd == Decimal("11244.444444444")  # quantized to 9 places


def test_memory_storage_and_egress_use_their_units() -> None:
    assert price_usage(PRICES, "memory", 3600).cost_nusd == 4_445_000
    assert price_usage(PRICES, "storage", 730).cost_nusd == 80_000_000  # one GiB-month
    assert price_usage(PRICES, "egress", 2**30).cost_nusd == 90_000_000  # one GiB


def test_half_nano_usd_rounds_half_to_even() -> None:
    prices = _prices(output="0.0005")  # 0.5 nUSD per token
    costs = [price_usage(prices, "output", n, model="m").cost_nusd for n in (1, 3, 5, 7)]
    assert costs == [0, 2, 2, 4]  # 0.5->0, 1.5->2, 2.5->2, 3.5->4


@given(
    quantity=st.decimals(min_value=0, max_value=10**12, places=9, allow_nan=False),
    bucket=st.sampled_from(list(UsageBucket)),
)
def test_cost_is_quantity_times_unit_price_rounded_half_even(
    quantity: Decimal, bucket: UsageBucket
) -> None:
    p = price_usage(PRICES, bucket, quantity, model="gpt-4o")
    assert p.unit_price_nusd is not None and p.cost_nusd is not None
    exact = (p.quantity * p.unit_price_nusd).quantize(Decimal(1), rounding=ROUND_HALF_EVEN)
    assert p.cost_nusd == int(exact)
    assert p.quantity == quantity


def test_float_negative_or_unknown_usage_is_refused() -> None:
    with pytest.raises(SchemaError, match=r"float.*int or a Decimal"):
        price_usage(PRICES, "cpu", 1.5)  # type: ignore[arg-type]
    with pytest.raises(SchemaError, match=">= 0"):
        price_usage(PRICES, "cpu", -1)
    with pytest.raises(SchemaError, match="bucket 'gpu' is unknown; use one of"):
        price_usage(PRICES, "gpu", 1)


def test_estimated_usage_is_marked_estimated() -> None:
    p = price_usage(PRICES, "input_uncached", 100, model="o3", estimated=True)
    assert p.cost_status is CostStatus.ESTIMATED and p.cost_nusd == 100 * 2000


def test_an_llm_call_gives_one_charge_per_nonzero_bucket() -> None:
    tokens = TokenCounts(input_uncached=120, input_cache_read=4000, output=350, reasoning=900)
    charges = llm_call_charges(
        PRICES,
        tokens,
        call_id="req-1",
        model="o4-mini",
        provider="openai",
        time=T1,
        period_start=T0,
        team="t",
        batch="b",
        task="k",
        attempt=2,
        task_type="fix",
    )
    assert [c.usage_bucket for c in charges] == [
        "input_uncached",
        "input_cache_read",
        "output",
        "reasoning",
    ]
    assert sum(int(c.quantity) for c in charges) == 120 + 4000 + 350 + 900
    by = {c.usage_bucket: c.cost_nusd for c in charges}
    assert by == {
        "input_uncached": 120 * 1100,
        "input_cache_read": 4000 * 275,
        "output": 350 * 4400,
        "reasoning": 900 * 4400,
    }
    assert len({c.charge_id for c in charges}) == 4
    table = to_table("charges", charges)  # the ledger's own validation accepts them
    assert table.num_rows == 4


def test_the_same_call_gets_the_same_charge_ids_and_another_call_does_not() -> None:
    kw = dict(
        model="gpt-4o",
        provider="openai",
        time=T1,
        period_start=T0,
        team="t",
        batch="b",
        task="k",
        attempt=1,
    )
    first = llm_call_charges(PRICES, TokenCounts(output=5), call_id="req-1", **kw)  # type: ignore[arg-type]
    retry = llm_call_charges(PRICES, TokenCounts(output=5), call_id="req-1", **kw)  # type: ignore[arg-type]
    other = llm_call_charges(PRICES, TokenCounts(output=5), call_id="req-2", **kw)  # type: ignore[arg-type]
    assert [c.charge_id for c in first] == [c.charge_id for c in retry]
    assert first[0].charge_id != other[0].charge_id


def test_a_call_to_an_unpriced_model_is_recorded_with_unknown_cost() -> None:
    charges = llm_call_charges(
        PRICES,
        TokenCounts(input_uncached=10, output=3),
        call_id="r",
        model="local-llama",
        provider="vllm",
        time=T1,
        period_start=T0,
        team="t",
        batch="b",
        task="k",
        attempt=1,
    )
    assert {(c.cost_nusd, c.cost_status, c.provider) for c in charges} == {
        (None, "unknown", "vllm")
    }
    assert to_table("charges", charges).num_rows == 2


def test_negative_token_counts_and_empty_call_ids_are_refused() -> None:
    with pytest.raises(SchemaError, match="output=-1"):
        TokenCounts(output=-1)
    with pytest.raises(SchemaError, match="call_id is empty"):
        llm_call_charges(
            PRICES,
            TokenCounts(output=1),
            call_id="",
            model="o3",
            provider="openai",
            time=T1,
            period_start=T0,
            team="t",
            batch="b",
            task="k",
            attempt=1,
        )


def test_resource_charges_skip_zero_and_refuse_token_buckets() -> None:
    kw = dict(
        time=T1, period_start=T1 - timedelta(minutes=1), team="t", batch="b", task="k", attempt=1
    )
    charges = resource_charges(PRICES, {"cpu": 120, "memory": Decimal("60.5"), "egress": 0}, **kw)  # type: ignore[arg-type]
    assert [c.usage_bucket for c in charges] == ["cpu", "memory"]
    assert charges[1].unit == "GiB-seconds"
    assert to_table("charges", charges).num_rows == 2
    with pytest.raises(SchemaError, match="token bucket"):
        resource_charges(PRICES, {"output": 1}, **kw)  # type: ignore[arg-type]


def test_unit_price_of_an_unknown_model_is_none_but_resources_always_have_one() -> None:
    assert unit_price_nusd(PRICES, UsageBucket.OUTPUT, "nope") is None
    assert unit_price_nusd(PRICES, UsageBucket.OUTPUT, "") is None
    assert unit_price_nusd(PRICES, UsageBucket.EGRESS) == Decimal("0.083819032")
