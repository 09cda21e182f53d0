"""Prices (`configs/pricing.yaml`) and pricing a usage, as pure functions.

The exact rounding rule — every charge row is reproducible from its own columns:

1. ``unit_price_nusd`` = the USD list price x 10^9 / units per priced unit (1,000,000
   tokens, 3,600 core-seconds per vCPU-hour, 3,600 GiB-seconds per GiB-hour,
   ``hours_per_month`` GiB-hours per GiB-month, 2^30 bytes per GiB), quantized to 9
   decimal places with ROUND_HALF_EVEN (the scale of the ledger's decimal128(38, 9)).
2. ``quantity`` is quantized to 9 decimal places with ROUND_HALF_EVEN.
3. ``cost_nusd`` = quantity x unit_price_nusd, rounded to a whole nano-USD with
   ROUND_HALF_EVEN.

A model that is not in the price list is never priced at 0: its cost is ``None`` with
``cost_status`` ``unknown``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Decimal, localcontext
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from accounting.config import configs_dir, load_model
from accounting.errors import ConfigError, SchemaError
from accounting.schemas import UNIT_OF_BUCKET, CostStatus, ServiceCategory, UsageBucket

__all__ = [
    "LLM_BUCKETS",
    "NUSD_PER_USD",
    "ComputePrices",
    "ModelPrice",
    "NetworkPrices",
    "PriceList",
    "PricedUsage",
    "StoragePrices",
    "TokenPrices",
    "Usd",
    "load_pricing",
    "price_usage",
    "price_version_of",
    "to_decimal",
    "unit_price_nusd",
]

NUSD_PER_USD = 1_000_000_000
_SCALE = Decimal("0.000000001")  # 9 decimal places: the ledger's decimal128(38, 9)
_PREC = 80  # wide enough that no intermediate product is ever rounded
_MAX_DIGITS_FROM_FLOAT = 15  # a float with more significant digits is ambiguous


LLM_BUCKETS: tuple[UsageBucket, ...] = (
    UsageBucket.INPUT_UNCACHED,
    UsageBucket.INPUT_CACHE_READ,
    UsageBucket.INPUT_CACHE_WRITE,
    UsageBucket.OUTPUT,
    UsageBucket.REASONING,
)

# bucket -> (service_category, service_name); units come from schemas.UNIT_OF_BUCKET
_SERVICE: dict[UsageBucket, tuple[ServiceCategory, str]] = {
    **{b: (ServiceCategory.AI, "LLM Inference") for b in LLM_BUCKETS},
    UsageBucket.CPU: (ServiceCategory.COMPUTE, "Sandbox Compute"),
    UsageBucket.MEMORY: (ServiceCategory.COMPUTE, "Sandbox Compute"),
    UsageBucket.STORAGE: (ServiceCategory.STORAGE, "Sandbox Storage"),
    UsageBucket.EGRESS: (ServiceCategory.NETWORKING, "Sandbox Egress"),
}


def to_decimal(value: object, *, what: str = "value") -> Decimal:
    """An exact Decimal from a str, int or Decimal; a float only when unambiguous.

    YAML reads `2.5` as a float. Its shortest repr is what the person typed whenever it
    has at most 15 significant digits, so that is accepted; anything longer must be
    quoted. Raises ValueError with the fix (pydantic turns it into a field error).
    """
    if isinstance(value, bool):
        raise ValueError(f"{what} must be a decimal number, not true/false")
    if isinstance(value, Decimal):
        result = value
    elif isinstance(value, int):
        result = Decimal(value)
    elif isinstance(value, float):
        text = repr(value)
        digits = Decimal(text).as_tuple().digits
        if len(digits) > _MAX_DIGITS_FROM_FLOAT:
            raise ValueError(
                f"{what} {text} has more than {_MAX_DIGITS_FROM_FLOAT} significant digits and "
                f'would lose precision; quote it as a string, e.g. "{text}"'
            )
        result = Decimal(text)
    elif isinstance(value, str):
        try:
            result = Decimal(value.strip())
        except ArithmeticError:
            raise ValueError(
                f'{what} {value!r} is not a decimal number; write it like "2.50"'
            ) from None
    else:
        raise ValueError(f'{what} must be a decimal number written like "2.50"')
    if not result.is_finite():
        raise ValueError(f"{what} must be a finite number, not {value!r}")
    return result


def _usd(value: object) -> Decimal:
    result = to_decimal(value, what="a USD amount")
    if result < 0:
        raise ValueError(f"a USD amount must be >= 0, not {result}")
    return result


Usd = Annotated[Decimal, BeforeValidator(_usd)]
"""A non-negative exact USD amount (str, int or unambiguous float in YAML)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TokenPrices(_Strict):
    """USD per 1,000,000 tokens, one price per exclusive token bucket."""

    input_uncached: Usd = Field(description="Prompt tokens neither read from nor written to cache.")
    input_cache_read: Usd = Field(description="Prompt tokens served from the prompt cache.")
    input_cache_write: Usd = Field(description="Prompt tokens written to the prompt cache.")
    output: Usd = Field(description="Visible completion tokens.")
    reasoning: Usd = Field(description="Hidden reasoning / thinking tokens.")


class ModelPrice(_Strict):
    """One model's list prices."""

    provider: str = Field(min_length=1, description="Who serves it: openai, anthropic, scripted.")
    name: str = Field(min_length=1, description="Canonical model name written in charges.")
    aliases: list[str] = Field(default_factory=list, description="Other names that resolve here.")
    usd_per_1m_tokens: TokenPrices = Field(description="USD per 1M tokens, per bucket.")
    note: str = Field(default="", description="Free text, e.g. where a price comes from.")


class ComputePrices(_Strict):
    """Sandbox compute, charged on container limits x wall time."""

    usd_per_vcpu_hour: Usd = Field(description="USD for one vCPU (1000 millicores) for one hour.")
    usd_per_gib_hour: Usd = Field(description="USD for one GiB of memory limit for one hour.")


class StoragePrices(_Strict):
    """Workspace and archive storage."""

    usd_per_gib_month: Usd = Field(description="USD for one GiB kept for one month.")
    hours_per_month: int = Field(
        default=730, gt=0, description="Hours in a billing month (GiB-month -> GiB-hours)."
    )


class NetworkPrices(_Strict):
    """Egress through the gateway's proxy."""

    usd_per_egress_gib: Usd = Field(description="USD per GiB (2^30 bytes) leaving a sandbox.")


class PriceList(_Strict):
    """`configs/pricing.yaml`: every price sandfleet charges with."""

    currency: Literal["USD"] = Field(default="USD", description="Billing currency (USD only).")
    models: list[ModelPrice] = Field(description="LLM list prices, one entry per model.")
    compute: ComputePrices = Field(description="Per vCPU-hour and per GiB-hour of memory.")
    storage: StoragePrices = Field(description="Per GiB-month of storage.")
    network: NetworkPrices = Field(description="Per GiB of egress.")
    price_version: str = Field(
        default="", description="Set by load_pricing: first 12 hex digits of the file's sha256."
    )

    @model_validator(mode="after")
    def _names_are_unique(self) -> PriceList:
        seen: dict[str, str] = {}
        for m in self.models:
            for key in (m.name, *m.aliases):
                k = key.lower()
                if k in seen:
                    raise ValueError(
                        f"model name or alias {key!r} is used by both {seen[k]!r} and {m.name!r}; "
                        "remove one of them"
                    )
                seen[k] = m.name
        return self

    def find_model(self, model: str) -> ModelPrice | None:
        """The entry for a name or alias (case-insensitive; `provider/name` accepted)."""
        wanted = model.strip().lower()
        for m in self.models:
            names = {n.lower() for n in (m.name, *m.aliases)}
            if wanted in names or wanted in {f"{m.provider.lower()}/{n}" for n in names}:
                return m
        return None


def price_version_of(data: bytes) -> str:
    """The short content hash that names a price list version."""
    return hashlib.sha256(data).hexdigest()[:12]


def load_pricing(path: Path | str | None = None) -> PriceList:
    """Load and validate the price list (default `configs/pricing.yaml`)."""
    p = Path(path) if path is not None else configs_dir() / "pricing.yaml"
    prices = load_model(p, PriceList)
    if prices.price_version:
        raise ConfigError(
            f"{p}: price_version: is computed from the file's content (fix: remove the key)"
        )
    return prices.model_copy(update={"price_version": price_version_of(p.read_bytes())})


@dataclass(frozen=True)
class PricedUsage:
    """The result of pricing one usage: what goes into a charge row's money columns."""

    bucket: UsageBucket
    quantity: Decimal  # quantized to 9 decimal places
    unit: str
    unit_price_nusd: Decimal | None  # nano-USD per unit; None when unknown
    cost_nusd: int | None  # None exactly when cost_status is UNKNOWN
    cost_status: CostStatus
    price_version: str
    service_category: str
    service_name: str
    model: str  # canonical model name when known, else as given; "" for resources
    provider: str  # the price list's provider when known, else ""


def _quantize(value: Decimal) -> Decimal:
    with localcontext() as ctx:
        ctx.prec = _PREC
        return value.quantize(_SCALE, rounding=ROUND_HALF_EVEN)


def unit_price_nusd(prices: PriceList, bucket: UsageBucket, model: str = "") -> Decimal | None:
    """Nano-USD per unit of `bucket` (per token, core-second, GiB-second, GiB-hour, byte).

    None for a token bucket whose model is not in the price list.
    """
    bucket = UsageBucket(bucket)
    with localcontext() as ctx:
        ctx.prec = _PREC
        if bucket in LLM_BUCKETS:
            entry = prices.find_model(model) if model else None
            if entry is None:
                return None
            usd = getattr(entry.usd_per_1m_tokens, bucket.value)
            raw = usd * NUSD_PER_USD / 1_000_000
        elif bucket is UsageBucket.CPU:
            raw = prices.compute.usd_per_vcpu_hour * NUSD_PER_USD / 3600
        elif bucket is UsageBucket.MEMORY:
            raw = prices.compute.usd_per_gib_hour * NUSD_PER_USD / 3600
        elif bucket is UsageBucket.STORAGE:
            raw = prices.storage.usd_per_gib_month * NUSD_PER_USD / prices.storage.hours_per_month
        else:
            raw = prices.network.usd_per_egress_gib * NUSD_PER_USD / 2**30
    return _quantize(raw)


def _check_quantity(quantity: object) -> Decimal:
    if isinstance(quantity, float | bool):
        raise SchemaError(
            f"quantity {quantity!r} is a {type(quantity).__name__}; pass an int or a Decimal "
            "so no precision is lost"
        )
    if not isinstance(quantity, int | Decimal):
        raise SchemaError(f"quantity {quantity!r} must be an int or a Decimal")
    q = Decimal(quantity)
    if not q.is_finite() or q < 0:
        raise SchemaError(f"quantity {quantity!r} must be a finite number >= 0")
    return _quantize(q)


def price_usage(
    prices: PriceList,
    bucket: UsageBucket | str,
    quantity: int | Decimal,
    *,
    model: str = "",
    estimated: bool = False,
) -> PricedUsage:
    """Price `quantity` units of `bucket` (for token buckets, of `model`).

    Pure: the same price list and arguments always give the same result. `estimated`
    marks a quantity that was not reported by the provider (e.g. counted locally).
    """
    try:
        b = UsageBucket(bucket)
    except ValueError:
        allowed = ", ".join(x.value for x in UsageBucket)
        raise SchemaError(f"usage bucket {bucket!r} is unknown; use one of: {allowed}") from None
    q = _check_quantity(quantity)
    unit = UNIT_OF_BUCKET[b.value]
    category, service = _SERVICE[b]
    price = unit_price_nusd(prices, b, model)
    entry = prices.find_model(model) if (b in LLM_BUCKETS and model) else None
    if price is None:
        cost, status = None, CostStatus.UNKNOWN
    else:
        with localcontext() as ctx:
            ctx.prec = _PREC
            cost = int((q * price).quantize(Decimal(1), rounding=ROUND_HALF_EVEN))
        status = CostStatus.ESTIMATED if estimated else CostStatus.FINAL
    return PricedUsage(
        bucket=b,
        quantity=q,
        unit=unit,
        unit_price_nusd=price,
        cost_nusd=cost,
        cost_status=status,
        price_version=prices.price_version,
        service_category=category.value,
        service_name=service,
        model=(entry.name if entry else model.strip()) if b in LLM_BUCKETS else "",
        provider=entry.provider if entry else "",
    )
