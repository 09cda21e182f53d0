"""Charge records from priced usage: one LLM call's tokens, or a sandbox's resources.

Pure functions over a `PriceList`; each returns `accounting.schemas.Charge` records with
deterministic charge ids, so writing the same usage twice (a retry) gives the same ids.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from accounting.errors import SchemaError
from accounting.pricing import LLM_BUCKETS, PricedUsage, PriceList, price_usage
from accounting.schemas import Charge, UsageBucket

__all__ = ["TokenCounts", "charge_id", "llm_call_charges", "resource_charges"]


@dataclass(frozen=True)
class TokenCounts:
    """One LLM call's tokens in exclusive buckets (normalised per provider by the gateway)."""

    input_uncached: int = 0
    input_cache_read: int = 0
    input_cache_write: int = 0
    output: int = 0
    reasoning: int = 0

    def __post_init__(self) -> None:
        for b in LLM_BUCKETS:
            v = getattr(self, b.value)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise SchemaError(f"token count {b.value}={v!r} must be a whole number >= 0")


def charge_id(*parts: object) -> str:
    """A deterministic charge id: the same usage always gets the same id (retries dedupe)."""
    text = "\x1f".join("" if p is None else str(p) for p in parts)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _charge(
    priced: PricedUsage,
    *,
    cid: str,
    time: datetime,
    period_start: datetime,
    team: str,
    batch: str,
    task: str,
    attempt: int,
    node: str,
    task_type: str,
    provider: str,
) -> Charge:
    return Charge(
        time=time,
        team=team,
        batch=batch,
        task=task,
        attempt=attempt,
        node=node,
        charge_id=cid,
        period_start=period_start,
        task_type=task_type,
        service_category=priced.service_category,
        service_name=priced.service_name,
        provider=priced.provider or provider,
        model=priced.model,
        usage_bucket=priced.bucket.value,
        quantity=priced.quantity,
        unit=priced.unit,
        unit_price_nusd=priced.unit_price_nusd,
        cost_nusd=priced.cost_nusd,
        cost_status=priced.cost_status.value,
        price_version=priced.price_version,
    )


def llm_call_charges(
    prices: PriceList,
    tokens: TokenCounts,
    *,
    call_id: str,
    model: str,
    provider: str,
    time: datetime,
    period_start: datetime,
    team: str,
    batch: str,
    task: str,
    attempt: int,
    node: str = "",
    task_type: str = "",
    estimated: bool = False,
) -> list[Charge]:
    """One charge per non-zero token bucket of one LLM call (`time` = the call's end).

    The charge id is derived from (task, attempt, call_id, bucket): writing the same
    call twice (a retry) produces the same ids, so the ledger can drop the repeat.
    """
    if not call_id:
        raise SchemaError("call_id is empty; pass the gateway's request id so retries dedupe")
    out = []
    for b in LLM_BUCKETS:
        n = getattr(tokens, b.value)
        if n == 0:
            continue
        priced = price_usage(prices, b, n, model=model, estimated=estimated)
        out.append(
            _charge(
                priced,
                cid=charge_id("llm", task, attempt, call_id, b.value),
                time=time,
                period_start=period_start,
                team=team,
                batch=batch,
                task=task,
                attempt=attempt,
                node=node,
                task_type=task_type,
                provider=provider,
            )
        )
    return out


def resource_charges(
    prices: PriceList,
    usage: dict[UsageBucket | str, int | Decimal],
    *,
    time: datetime,
    period_start: datetime,
    team: str,
    batch: str,
    task: str,
    attempt: int,
    node: str = "",
    task_type: str = "",
    provider: str = "sandfleet",
) -> list[Charge]:
    """Charges for a sandbox's cpu / memory / storage / egress over [period_start, time).

    `usage` maps a resource bucket to its quantity (core-seconds, GiB-seconds, GiB-hours,
    bytes); zero quantities are skipped. Ids derive from (task, attempt, period, bucket).
    """
    out = []
    for key, quantity in usage.items():
        priced = price_usage(prices, key, quantity)
        if priced.bucket in LLM_BUCKETS:
            raise SchemaError(
                f"usage bucket {priced.bucket.value!r} is a token bucket; price LLM calls "
                "with llm_call_charges"
            )
        if priced.quantity == 0:
            continue
        cid = charge_id(
            "res", task, attempt, period_start.isoformat(), time.isoformat(), priced.bucket.value
        )
        out.append(
            _charge(
                priced,
                cid=cid,
                time=time,
                period_start=period_start,
                team=team,
                batch=batch,
                task=task,
                attempt=attempt,
                node=node,
                task_type=task_type,
                provider=provider,
            )
        )
    return out
