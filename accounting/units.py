"""Byte sizes as people write them: `512m`, `8g`, `1GiB`, `1048576` (binary units)."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import BeforeValidator

__all__ = ["Bytes", "format_bytes", "parse_bytes"]

_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)


def parse_bytes(value: object) -> int:
    """`8g` / `512m` / `1GiB` / `1048576` -> bytes; ValueError saying how to write it."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError("a size must be a number of bytes or a string like '512m' or '8g'")
    if isinstance(value, int):
        size = value
    else:
        m = _SIZE.match(value)
        if m is None:
            raise ValueError(f"{value!r} is not a size; write it like '512m', '8g' or '1GiB'")
        number, unit = m.group(1), m.group(2).lower()
        whole, _, frac = number.partition(".")
        mult = _UNITS[unit]
        size = int(whole) * mult
        if frac:
            size += (int(frac) * mult) // (10 ** len(frac))
    if size <= 0:
        raise ValueError(f"a size must be positive, not {value!r}")
    return size


def format_bytes(n: int) -> str:
    """536870912 -> `512m` (the largest exact binary unit)."""
    for suffix, mult in (("t", 1024**4), ("g", 1024**3), ("m", 1024**2), ("k", 1024)):
        if n % mult == 0:
            return f"{n // mult}{suffix}"
    return str(n)


Bytes = Annotated[int, BeforeValidator(parse_bytes)]
