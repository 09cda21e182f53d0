"""Money amounts: Decimal, rounded half-up to cents."""

from decimal import ROUND_DOWN, Decimal

CENT = Decimal("0.01")


def to_money(value):
    """`value` (a str, int or Decimal) rounded half-up to cents: "2.675" -> 2.68."""
    return Decimal(round(float(value), 2)).quantize(CENT)


def split(total, parts):
    """Split `total` into `parts` amounts that add up to it exactly; the first ones take
    the leftover cents: split("100.00", 3) -> [33.34, 33.33, 33.33]."""
    total = to_money(total)
    share = (total / parts).quantize(CENT, rounding=ROUND_DOWN)
    return [share] * parts
