"""Byte sizes as people write them: `512m`, `2g`, `1GiB`, `1048576`."""

from __future__ import annotations

import re

__all__ = ["format_bytes", "parse_bytes"]

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kb": 1024,
    "kib": 1024,
    "m": 1024**2,
    "mb": 1024**2,
    "mib": 1024**2,
    "g": 1024**3,
    "gb": 1024**3,
    "gib": 1024**3,
    "t": 1024**4,
    "tb": 1024**4,
    "tib": 1024**4,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_bytes(value: int | str) -> int:
    """`"512m"` -> 536870912. Binary units (k = 1024). Raises ValueError with the fix."""
    if isinstance(value, bool):
        raise ValueError("a size must be a number of bytes or a string like '512m' or '2g'")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError("a size must be positive")
        return value
    m = _SIZE.match(str(value))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS:
        raise ValueError(f"{value!r} is not a size; write it like '512m', '2g' or '1GiB'")
    size = int(float(m.group(1)) * _UNITS[unit])
    if size <= 0:
        raise ValueError("a size must be positive")
    return size


def format_bytes(n: int) -> str:
    """536870912 -> `512m` (the largest exact binary unit)."""
    for suffix, mult in (("t", 1024**4), ("g", 1024**3), ("m", 1024**2), ("k", 1024)):
        if n % mult == 0:
            return f"{n // mult}{suffix}"
    return str(n)
