"""The canonical encoding of a ledger row and its `row_hash`.

A row's canonical encoding is a byte string any language can rebuild from the
Parquet file alone::

    0x00 "sandfleet.ledger.v1/" <table>  (0xFF <field>)*

with one `<field>` per column in schema order, every column but `row_hash` (so
`chain_id` and `event_seq` are bound into the hash, and two rows cannot trade places):

- a string: its UTF-8 bytes;
- an integer (int32, int64), a timestamp (microseconds since the Unix epoch, UTC), a
  bool (1 or 0), a decimal (its unscaled integer at the column's scale, e.g. 1.5 at
  scale 9 is 1500000000): base-10 ASCII digits, `-` for negatives. No floats anywhere;
- null: the single byte 0xFE.

0xFE and 0xFF never occur in UTF-8 or in digits, so the encoding is unambiguous.
`row_hash = SHA-256(encoding)`. The leading 0x00 makes `row_hash` exactly the RFC 6962
leaf hash of the row (`accounting.merkle`), so the audit tree's leaves are the stored
row hashes themselves.

`canonical_rows` / `row_hashes` are vectorised (Arrow kernels build the bytes;
`accounting.hashing` hashes them in one native call); `canonical_row` / `row_hash` are
the plain reference, row by row.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Final

import pyarrow as pa
import pyarrow.compute as pc

from accounting.hashing import sha256_each
from accounting.schemas import SCHEMAS

__all__ = [
    "HASHED_COLUMNS",
    "canonical_row",
    "canonical_rows",
    "prefix",
    "row_hash",
    "row_hashes",
]

SEP: Final = b"\xff"
NULL: Final = b"\xfe"
_CHUNK: Final = 1 << 18  # rows per kernel call: keeps int32 offsets far from overflow
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)

HASHED_COLUMNS: Final[Mapping[str, tuple[str, ...]]] = {
    name: tuple(n for n in schema.names if n != "row_hash") for name, schema in SCHEMAS.items()
}


def prefix(table: str) -> bytes:
    """The bytes every canonical row of `table` starts with."""
    return b"\x00sandfleet.ledger.v1/" + table.encode()


def _field_bytes(column: pa.Array) -> pa.Array:
    """One column's fields as binary, nulls kept null (joined as 0xFE)."""
    t = column.type
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return column.cast(pa.binary())
    if pa.types.is_timestamp(t):
        column = column.cast(pa.int64())
    elif pa.types.is_boolean(t):
        column = column.cast(pa.int8())
    elif pa.types.is_decimal(t):
        column = pa.Array.from_buffers(
            pa.decimal128(t.precision, 0), len(column), column.buffers(), offset=column.offset
        )
    return column.cast(pa.string()).cast(pa.binary())


def _batches(table: str, data: pa.Table | pa.RecordBatch) -> Iterator[pa.RecordBatch]:
    columns = HASHED_COLUMNS[table]
    if isinstance(data, pa.RecordBatch):
        data = pa.Table.from_batches([data])
    data = data.select(list(columns))
    yield from data.to_batches(max_chunksize=_CHUNK)


def canonical_rows(table: str, data: pa.Table | pa.RecordBatch) -> pa.ChunkedArray:
    """The canonical encoding of every row of `data` (which has `table`'s columns)."""
    head = pa.scalar(prefix(table), pa.binary())
    sep = pa.scalar(SEP, pa.binary())
    chunks = []
    for batch in _batches(table, data):
        fields = [_field_bytes(c) for c in batch.columns]
        chunks.append(
            pc.binary_join_element_wise(
                head, *fields, sep, null_handling="replace", null_replacement=NULL
            )
        )
    return pa.chunked_array(chunks, type=pa.binary())


def row_hashes(table: str, data: pa.Table | pa.RecordBatch) -> pa.Array:
    """`row_hash` of every row of `data`, as a fixed_size_binary(32) array."""
    encoded = canonical_rows(table, data)
    digests = b"".join(sha256_each(chunk) for chunk in encoded.chunks)
    n = len(digests) // 32
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(32), n, [None, pa.py_buffer(digests)])


# -- the reference encoder, one row at a time (tests prove both agree)


def _field(value: Any, type_: pa.DataType) -> bytes:
    if value is None:
        return NULL
    if pa.types.is_string(type_):
        return str(value).encode()
    if pa.types.is_timestamp(type_):
        if isinstance(value, datetime):
            micros = (value - _EPOCH) // _ONE_US
            return str(micros).encode()
        return str(int(value)).encode()
    if pa.types.is_boolean(type_):
        return b"1" if value else b"0"
    if pa.types.is_decimal(type_):
        unscaled = Decimal(value).scaleb(type_.scale)
        if unscaled != unscaled.to_integral_value():
            raise ValueError(f"{value} has more than {type_.scale} decimal places")
        return str(int(unscaled)).encode()
    if pa.types.is_integer(type_):
        return str(int(value)).encode()
    raise TypeError(f"no canonical encoding for {type_}")


def canonical_row(table: str, row: Mapping[str, Any]) -> bytes:
    """The canonical encoding of one row given as a mapping (column -> Python value)."""
    schema = SCHEMAS[table]
    parts = [prefix(table)]
    for name in HASHED_COLUMNS[table]:
        parts.append(_field(row[name], schema.field(name).type))
    return SEP.join(parts)


def row_hash(table: str, row: Mapping[str, Any]) -> bytes:
    """`row_hash` of one row given as a mapping: the reference implementation."""
    return hashlib.sha256(canonical_row(table, row)).digest()


_ONE_US: Final = datetime(1970, 1, 1, 0, 0, 0, 1, tzinfo=UTC) - _EPOCH
