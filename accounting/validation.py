"""Turning rows into a validated Arrow table for one ledger table, or refusing the batch.

`to_table(table, rows)` accepts records (`Event`, `Charge`, `TaskSummary`), mappings with
exactly the table's data columns, or an Arrow table / record batch with those columns.
It checks every row before returning; on any problem it raises one `SchemaError` that
names the table, the row, the field and the fix, and nothing of the batch is kept.

Checks: every field present and of its type (no float where an integer or a decimal
belongs: money is integer nano-USD), no nulls outside the nullable columns, enum columns
hold a known value (`kind`, `usage_bucket`, `unit` for that bucket, `cost_status`,
`service_category`, `outcome`), a cost exactly when `cost_status` is final or estimated
(null when unknown, never 0 in its place), `period_start <= time`, payloads that are
JSON objects. The audit columns are assigned by the writer and refused here.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from datetime import datetime
from decimal import Decimal, InvalidOperation
from enum import Enum
from typing import Any, Final, TypeAlias

import pyarrow as pa
import pyarrow.compute as pc

from accounting.errors import SchemaError
from accounting.schemas import (
    AUDIT_COLUMNS,
    DATA_SCHEMAS,
    RECORD_TYPES,
    TABLES,
    UNIT_OF_BUCKET,
    CostStatus,
    EventKind,
    ServiceCategory,
    TaskState,
    UsageBucket,
    canonical_json,
)

__all__ = ["Rows", "to_table"]

Rows: TypeAlias = Sequence[Any] | pa.Table | pa.RecordBatch

_MAX_REPORTED: Final = 5
_NANO: Final = Decimal("1e-9")
_ENUMS: Final[Mapping[str, Mapping[str, type[Enum]]]] = {
    "events": {"kind": EventKind},
    "charges": {
        "usage_bucket": UsageBucket,
        "cost_status": CostStatus,
        "service_category": ServiceCategory,
    },
    "tasks": {"outcome": TaskState},
}


def _refuse(table: str, problems: list[str]) -> SchemaError:
    shown = problems[:_MAX_REPORTED]
    more = len(problems) - len(shown)
    tail = f"\n... and {more} more" if more > 0 else ""
    head = f"{table}: batch refused, nothing written:\n"
    return SchemaError(head + "\n".join(shown) + tail)


def _check_table_name(table: str) -> None:
    if table not in TABLES:
        raise SchemaError(f"unknown ledger table {table!r} (fix: use one of {', '.join(TABLES)})")


def to_table(table: str, rows: Rows) -> pa.Table:
    """`rows` as an Arrow table with `DATA_SCHEMAS[table]`, every row checked."""
    _check_table_name(table)
    if isinstance(rows, pa.RecordBatch):
        rows = pa.Table.from_batches([rows])
    result = _conform(table, rows) if isinstance(rows, pa.Table) else _from_rows(table, rows)
    problems = _check_values(table, result)
    if problems:
        raise _refuse(table, problems)
    return result


# -- rows (records or mappings) -> columns, checking each value's Python type


def _as_mapping(table: str, i: int, row: Any) -> Mapping[str, Any]:
    record_type = RECORD_TYPES[table]
    if isinstance(row, record_type):
        return {f.name: getattr(row, f.name) for f in dataclasses.fields(record_type)}
    if dataclasses.is_dataclass(row):
        raise _refuse(
            table,
            [
                f"row {i}: is a {type(row).__name__}, not a {record_type.__name__} "
                f"(fix: append it to the table it belongs to)"
            ],
        )
    if not isinstance(row, Mapping):
        raise _refuse(
            table,
            [f"row {i}: is a {type(row).__name__} (fix: pass {record_type.__name__} or a dict)"],
        )
    return row


def _value(field: pa.Field, value: Any) -> tuple[Any, str | None]:
    """The Arrow-ready value of one field, or a problem (`what is wrong (fix: ...)`)."""
    if isinstance(value, Enum):
        value = value.value
    if value is None:
        return None, None if field.nullable else "is missing (null) (fix: give it a value)"
    t = field.type
    if pa.types.is_timestamp(t):
        if not isinstance(value, datetime):
            return None, f"is a {type(value).__name__} (fix: use a timezone-aware datetime)"
        if value.tzinfo is None or value.utcoffset() is None:
            return None, "is a naive datetime (fix: use datetime.now(timezone.utc) or set tzinfo)"
        return value, None
    if pa.types.is_string(t):
        if not isinstance(value, str):
            return None, f"is a {type(value).__name__} (fix: use a string)"
        return value, None
    if pa.types.is_boolean(t):
        if not isinstance(value, bool):
            return None, f"is a {type(value).__name__} (fix: use True or False)"
        return value, None
    if pa.types.is_integer(t):
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and field.name.endswith("_nusd"):
                return None, (
                    f"is a float ({value!r}); money is integer nano-USD "
                    f"(fix: pass an int, e.g. round(usd * 1_000_000_000))"
                )
            return None, f"is a {type(value).__name__} ({value!r}) (fix: use a whole number)"
        bits = t.bit_width
        if not -(2 ** (bits - 1)) <= value < 2 ** (bits - 1):
            return None, f"{value} does not fit in int{bits} (fix: check the value)"
        return value, None
    if pa.types.is_decimal(t):
        if isinstance(value, bool) or not isinstance(value, int | Decimal):
            return None, (
                f"is a {type(value).__name__} ({value!r}); floats are not exact "
                f"(fix: pass decimal.Decimal('...') or an int)"
            )
        dec = Decimal(value)
        try:
            exact = dec.is_finite() and dec == dec.quantize(_NANO)
        except InvalidOperation:
            exact = False
        if not exact:
            return None, f"{value} is not a finite decimal with at most 9 places (fix: round it)"
        return dec, None
    raise AssertionError(f"unhandled column type {t}")  # the schemas use only the types above


def _from_rows(table: str, rows: Sequence[Any]) -> pa.Table:
    schema = DATA_SCHEMAS[table]
    names = schema.names
    columns: list[list[Any]] = [[] for _ in names]
    problems: list[str] = []
    for i, row in enumerate(rows):
        values = _as_mapping(table, i, row)
        extra = [k for k in values if k not in names]
        for k in extra:
            if k in AUDIT_COLUMNS:
                problems.append(f"row {i}: {k}: is assigned by the writer (fix: leave it out)")
            else:
                problems.append(f"row {i}: {k}: unknown field (fix: remove it or check spelling)")
        for col, field in zip(columns, schema, strict=True):
            if field.name not in values:
                problems.append(f"row {i}: {field.name}: is missing (fix: add it)")
                col.append(None)
                continue
            raw = values[field.name]
            if field.name == "payload" and raw is not None:
                try:
                    raw = canonical_json(raw)
                except (TypeError, ValueError) as e:
                    problems.append(f"row {i}: payload: {e} (fix: pass a JSON-able dict)")
                    raw = None
            value, problem = _value(field, raw)
            if problem:
                problems.append(f"row {i}: {field.name}: {problem}")
            col.append(value)
        if len(problems) > _MAX_REPORTED:
            break
    if problems:
        raise _refuse(table, problems)
    arrays = [pa.array(col, type=f.type) for col, f in zip(columns, schema, strict=True)]
    return pa.Table.from_arrays(arrays, schema=schema)


# -- Arrow tables: names and types


def _conform(table: str, data: pa.Table) -> pa.Table:
    schema = DATA_SCHEMAS[table]
    problems: list[str] = []
    for name in data.column_names:
        if name in AUDIT_COLUMNS:
            problems.append(f"column {name}: is assigned by the writer (fix: drop it)")
        elif name not in schema.names:
            problems.append(f"column {name}: unknown column (fix: drop it or check spelling)")
    arrays = []
    for field in schema:
        if field.name not in data.column_names:
            problems.append(f"column {field.name}: is missing (fix: add it)")
            continue
        column = data[field.name]
        src = column.type
        if pa.types.is_floating(src) and not pa.types.is_floating(field.type):
            what = "money is integer nano-USD" if field.name.endswith("_nusd") else "not exact"
            problems.append(
                f"column {field.name}: is {src} ({what}) (fix: use {field.type}, "
                f"e.g. integer nano-USD or decimal)"
            )
            continue
        if pa.types.is_timestamp(src) and src.tz is None:
            problems.append(
                f"column {field.name}: naive timestamps (fix: use pa.timestamp('us', tz='UTC'))"
            )
            continue
        try:
            arrays.append(column.cast(field.type) if src != field.type else column)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as e:
            problems.append(f"column {field.name}: cannot be {field.type}: {e} (fix: convert it)")
    if problems:
        raise _refuse(table, problems)
    return pa.Table.from_arrays(arrays, schema=schema)


# -- values: vectorised checks shared by both paths


def _first_rows(mask: pa.ChunkedArray | pa.Array) -> list[int]:
    idx = pc.indices_nonzero(pc.fill_null(mask, True))
    return idx.slice(0, _MAX_REPORTED).to_pylist()


def _rows_where(t: pa.Table, mask: Any, message: str, column: str | None = None) -> list[str]:
    rows = _first_rows(mask)
    out = []
    for i in rows:
        shown = f" (got {t[column][i].as_py()!r})" if column else ""
        out.append(f"row {i}: {message.format(shown=shown)}")
    return out


@functools.cache
def _allowed(enum: type[Enum]) -> pa.Array:
    """An enum's values as an Arrow array, made once. Each conversion of untyped Python
    values makes pyarrow look for `dateutil` on the import path, in vain here (~0.1 ms,
    on every append): values on the hot path are typed, or made once."""
    return pa.array([m.value for m in enum], pa.string())


def _check_values(table: str, t: pa.Table) -> list[str]:
    if t.num_rows == 0:
        return []
    problems: list[str] = []
    for field in t.schema:
        if not field.nullable and t[field.name].null_count:
            problems += _rows_where(
                t, pc.is_null(t[field.name]), f"{field.name}: is null (fix: give it a value)"
            )
    if problems:
        return problems
    for name, enum in _ENUMS[table].items():
        allowed = _allowed(enum)
        bad = pc.invert(pc.is_in(t[name], value_set=allowed))
        problems += _rows_where(
            t,
            bad,
            f"{name}: unknown value{{shown}} (fix: use one of {', '.join(allowed.to_pylist())})",
            name,
        )
    negative = pc.less(t["attempt"], pa.scalar(0, t["attempt"].type))  # typed: see _allowed
    if pc.any(negative).as_py():
        problems += _rows_where(t, negative, "attempt: is negative (fix: >= 0)")
    if table == "events":
        payload = t["payload"]
        bad = pc.invert(pc.and_(pc.starts_with(payload, "{"), pc.ends_with(payload, "}")))
        problems += _rows_where(t, bad, "payload: is not a JSON object (fix: pass a dict)")
    elif table == "charges":
        problems += _charge_problems(t)
    return problems


@functools.cache
def _bucket_units() -> tuple[pa.Array, pa.Array]:
    """The usage buckets and the unit of each, as Arrow arrays (made once)."""
    buckets = list(UNIT_OF_BUCKET)
    units = [UNIT_OF_BUCKET[b] for b in buckets]
    return pa.array(buckets, pa.string()), pa.array(units, pa.string())


def _charge_problems(t: pa.Table) -> list[str]:
    problems: list[str] = []
    buckets, units = _bucket_units()
    idx = pc.index_in(t["usage_bucket"], value_set=buckets)
    want = pc.take(units, idx)
    problems += _rows_where(
        t,
        pc.not_equal(t["unit"], want),
        "unit: does not match its usage_bucket{shown} (fix: tokens for token buckets, "
        "core-seconds for cpu, GiB-seconds for memory, GiB-hours for storage, bytes for egress)",
        "unit",
    )
    unknown = pc.equal(t["cost_status"], pa.scalar("unknown", pa.string()))
    has_cost = pc.is_valid(t["cost_nusd"])
    problems += _rows_where(
        t,
        pc.and_(unknown, has_cost),
        "cost_nusd: is set but cost_status is unknown{shown} "
        "(fix: leave cost_nusd null when unknown, or set cost_status final/estimated)",
        "cost_nusd",
    )
    problems += _rows_where(
        t,
        pc.and_(pc.invert(unknown), pc.invert(has_cost)),
        "cost_nusd: is null but cost_status is final or estimated "
        "(fix: give the cost in integer nano-USD, or set cost_status unknown)",
    )
    problems += _rows_where(
        t,
        pc.greater(t["period_start"], t["time"]),
        "period_start: is after time (the period end) (fix: swap them)",
    )
    problems += _rows_where(
        t,
        pc.equal(t["charge_id"], pa.scalar("", pa.string())),
        "charge_id: is empty (fix: give a deterministic id)",
    )
    return problems
