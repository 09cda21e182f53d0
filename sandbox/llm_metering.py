"""Metering one LLM call: what to reserve, how far to cap output, what to record.

Pure functions of prices and counts, so the budget arithmetic is tested without a
gateway. Reservations use per-token prices rounded UP (a reservation is a worst case);
the settled cost is the sum of the call's charges (`accounting.charging`, exact
half-even rounding per bucket), which is never above the reservation when the counts
stay within the reserved input and output cap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

from accounting.charging import TokenCounts, llm_call_charges
from accounting.pricing import PriceList, unit_price_nusd
from accounting.schemas import Charge, UsageBucket

__all__ = ["CallMeter", "CallPrices", "call_prices"]


@dataclass(frozen=True)
class CallPrices:
    """Nano-USD per token of one model: input (uncached) and output (the dearer of
    output and reasoning, since reasoning tokens count against the output cap)."""

    input: Decimal
    output: Decimal

    def input_cost(self, input_tokens: int) -> int:
        return math.ceil(input_tokens * self.input)

    def worst_case(self, input_tokens: int, output_cap: int) -> int:
        """What a call may cost at most: its counted input and its whole output cap."""
        return self.input_cost(input_tokens) + math.ceil(output_cap * self.output)

    def output_cap_for(self, amount_nusd: int, input_tokens: int, wanted: int) -> int:
        """The largest output cap (<= wanted) that `amount_nusd` pays for, at least 1."""
        if self.output <= 0:
            return wanted
        affordable = int((amount_nusd - self.input_cost(input_tokens)) / self.output)
        return max(1, min(wanted, affordable))


def call_prices(prices: PriceList, model: str) -> CallPrices | None:
    """The model's per-token prices, or None when the price list does not know it."""
    inp = unit_price_nusd(prices, UsageBucket.INPUT_UNCACHED, model)
    out = unit_price_nusd(prices, UsageBucket.OUTPUT, model)
    rsn = unit_price_nusd(prices, UsageBucket.REASONING, model)
    if inp is None or out is None or rsn is None:
        return None
    return CallPrices(input=inp, output=max(out, rsn))


@dataclass
class CallMeter:
    """What one chat call did, turned into its charges and its `llm_call` payload."""

    call_id: str
    started: float  # time.monotonic() at the start
    start_time: datetime
    model: str = ""
    provider: str = ""
    stream: bool = False
    status: int = 200
    error: str = ""
    tokens: TokenCounts | None = None
    estimated: bool = False
    reserved_nusd: int = 0
    output_cap: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def fail(self, status: int, error: str) -> None:
        self.status, self.error = status, error

    def charges(
        self, prices: PriceList, *, end: datetime, ref: Any, node: str, task_type: str
    ) -> list[Charge]:
        """One charge per non-zero bucket; none when nothing was counted."""
        if self.tokens is None or not self.model:
            return []
        return llm_call_charges(
            prices,
            self.tokens,
            call_id=self.call_id,
            model=self.model,
            provider=self.provider,
            time=end,
            period_start=self.start_time,
            team=ref.team,
            batch=ref.batch,
            task=ref.task,
            attempt=ref.attempt,
            node=node,
            task_type=task_type,
            estimated=self.estimated,
        )

    def payload(self, *, cost_nusd: int, latency_ms: float, price_version: str) -> dict[str, Any]:
        """The `llm_call` event payload (accounting/README.md keys, then extras)."""
        t = self.tokens or TokenCounts()
        return {
            "model": self.model,
            "provider": self.provider,
            "input_uncached": t.input_uncached,
            "input_cache_read": t.input_cache_read,
            "input_cache_write": t.input_cache_write,
            "output": t.output,
            "reasoning": t.reasoning,
            "cost_nusd": cost_nusd,
            "latency_ms": latency_ms,
            "status": self.status,
            "stream": self.stream,
            "call_id": self.call_id,
            "error": self.error,
            "estimated": self.estimated,
            "reserved_nusd": self.reserved_nusd,
            "output_cap": self.output_cap,
            "price_version": price_version,
            **self.extra,
        }
