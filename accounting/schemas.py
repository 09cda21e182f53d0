"""The ledger's three tables: Arrow schemas, record types and the states they name.

The column contract is `accounting/README.md`; this module is its code. Each table has
one Arrow schema (`SCHEMAS`), the same schema without the audit columns the writer adds
(`DATA_SCHEMAS`), and one frozen record type (`Event`, `Charge`, `TaskSummary`).
Rows reach the writer as records, as mappings or as an Arrow table; `to_table` turns
any of them into a validated Arrow table (see `accounting.validation`), or refuses the
whole batch with one `SchemaError` naming the row, the field and the fix.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from enum import Enum
from typing import Any, ClassVar, Final

import pyarrow as pa

__all__ = [
    "AUDIT_COLUMNS",
    "DATA_SCHEMAS",
    "RECORD_TYPES",
    "SCHEMAS",
    "TABLES",
    "UNIT_OF_BUCKET",
    "Charge",
    "CostStatus",
    "Event",
    "EventKind",
    "ServiceCategory",
    "TaskState",
    "TaskSummary",
    "UsageBucket",
    "canonical_json",
]

TABLES: Final = ("events", "charges", "tasks")
AUDIT_COLUMNS: Final = ("chain_id", "event_seq", "row_hash")


class EventKind(str, Enum):  # noqa: UP042 - the style guide's `str, Enum`
    """What an `events` row records; its `payload` keys are listed in accounting/README.md."""

    BATCH_SUBMITTED = "batch_submitted"
    TASK_STATE = "task_state"
    COMMAND_STARTED = "command_started"
    COMMAND_FINISHED = "command_finished"
    FILE_CHANGED = "file_changed"
    RESOURCE_SAMPLE = "resource_sample"
    LLM_CALL = "llm_call"
    EGRESS_DECISION = "egress_decision"
    BUDGET_RESERVED = "budget_reserved"
    BUDGET_SETTLED = "budget_settled"
    BUDGET_REFUSED = "budget_refused"
    GATE_RESULT = "gate_result"
    ANOMALY_FINDING = "anomaly_finding"


class TaskState(str, Enum):  # noqa: UP042 - the style guide's `str, Enum`
    """The life of one task attempt; the final ones are a `tasks` row's `outcome`."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    OOM = "oom"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"
    BUDGET_EXCEEDED = "budget_exceeded"
    STOPPED_BY_RULE = "stopped_by_rule"
    AWAITING_REVIEW = "awaiting_review"
    REJECTED = "rejected"


class UsageBucket(str, Enum):  # noqa: UP042 - the style guide's `str, Enum`
    """Exclusive usage buckets: every token or resource unit is counted in exactly one."""

    INPUT_UNCACHED = "input_uncached"
    INPUT_CACHE_READ = "input_cache_read"
    INPUT_CACHE_WRITE = "input_cache_write"
    OUTPUT = "output"
    REASONING = "reasoning"
    CPU = "cpu"
    MEMORY = "memory"
    STORAGE = "storage"
    EGRESS = "egress"


class CostStatus(str, Enum):  # noqa: UP042 - the style guide's `str, Enum`
    """How sure a charge's cost is. `unknown` always has a null cost, never 0."""

    FINAL = "final"
    ESTIMATED = "estimated"
    UNKNOWN = "unknown"


class ServiceCategory(str, Enum):  # noqa: UP042 - the style guide's `str, Enum`
    """FOCUS 1.2 ServiceCategory values a sandfleet charge can have."""

    AI = "AI and Machine Learning"
    COMPUTE = "Compute"
    STORAGE = "Storage"
    NETWORKING = "Networking"


UNIT_OF_BUCKET: Final[Mapping[str, str]] = {
    "input_uncached": "tokens",
    "input_cache_read": "tokens",
    "input_cache_write": "tokens",
    "output": "tokens",
    "reasoning": "tokens",
    "cpu": "core-seconds",
    "memory": "GiB-seconds",
    "storage": "GiB-hours",
    "egress": "bytes",
}

TS = pa.timestamp("us", tz="UTC")
DEC = pa.decimal128(38, 9)


def _f(name: str, type_: pa.DataType, nullable: bool = False) -> pa.Field:
    return pa.field(name, type_, nullable=nullable)


_COMMON = [
    _f("time", TS),
    _f("team", pa.string()),
    _f("batch", pa.string()),
    _f("task", pa.string()),
    _f("attempt", pa.int32()),
    _f("node", pa.string()),
]
_AUDIT = [_f("chain_id", pa.string()), _f("event_seq", pa.int64()), _f("row_hash", pa.binary(32))]

DATA_SCHEMAS: Final[Mapping[str, pa.Schema]] = {
    "events": pa.schema([*_COMMON, _f("kind", pa.string()), _f("payload", pa.string())]),
    "charges": pa.schema(
        [
            *_COMMON,
            _f("charge_id", pa.string()),
            _f("period_start", TS),
            _f("task_type", pa.string()),
            _f("service_category", pa.string()),
            _f("service_name", pa.string()),
            _f("provider", pa.string()),
            _f("model", pa.string()),
            _f("usage_bucket", pa.string()),
            _f("quantity", DEC),
            _f("unit", pa.string()),
            _f("unit_price_nusd", DEC, nullable=True),
            _f("cost_nusd", pa.int64(), nullable=True),
            _f("cost_status", pa.string()),
            _f("price_version", pa.string()),
        ]
    ),
    "tasks": pa.schema(
        [
            *_COMMON,
            _f("task_type", pa.string()),
            _f("template", pa.string()),
            _f("outcome", pa.string()),
            _f("exit_code", pa.int32(), nullable=True),
            _f("oom", pa.bool_()),
            _f("timed_out", pa.bool_()),
            _f("started", TS, nullable=True),
            _f("duration_ms", pa.int64()),
            _f("cost_compute_nusd", pa.int64()),
            _f("cost_llm_nusd", pa.int64()),
            _f("cost_storage_nusd", pa.int64()),
            _f("cost_network_nusd", pa.int64()),
            _f("cost_total_nusd", pa.int64()),
            _f("tokens_input", pa.int64()),
            _f("tokens_output", pa.int64()),
            _f("llm_calls", pa.int32()),
            _f("files_changed", pa.int32()),
            _f("lines_added", pa.int32()),
            _f("lines_deleted", pa.int32()),
            _f("diff_sha256", pa.string()),
        ]
    ),
}

SCHEMAS: Final[Mapping[str, pa.Schema]] = {
    name: pa.schema([*schema, *_AUDIT]) for name, schema in DATA_SCHEMAS.items()
}


def canonical_json(value: Mapping[str, Any] | str) -> str:
    """A payload as canonical JSON: an object, sorted keys, no spaces, no NaN.

    A string is parsed first, so an already-encoded payload is re-canonicalised.
    """
    obj = json.loads(value) if isinstance(value, str) else value
    if not isinstance(obj, Mapping):
        raise TypeError(f"payload must be a JSON object, got {type(obj).__name__}")
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


# The record types. Field order is the table's column order; none has a default, so a
# record that leaves out a field fails to build.


@dataclass(frozen=True, slots=True)
class Event:
    """One `events` row: an action or a sample. `payload` keys depend on `kind`."""

    time: datetime
    team: str
    batch: str
    task: str
    attempt: int
    node: str
    kind: EventKind | str
    payload: Mapping[str, Any]

    TABLE: ClassVar[str] = "events"


@dataclass(frozen=True, slots=True)
class Charge:
    """One `charges` row: one priced usage bucket. `time` is the period end (exclusive)."""

    time: datetime
    team: str
    batch: str
    task: str
    attempt: int
    node: str
    charge_id: str
    period_start: datetime
    task_type: str
    service_category: ServiceCategory | str
    service_name: str
    provider: str
    model: str
    usage_bucket: UsageBucket | str
    quantity: Decimal | int
    unit: str
    unit_price_nusd: Decimal | int | None
    cost_nusd: int | None
    cost_status: CostStatus | str
    price_version: str

    TABLE: ClassVar[str] = "charges"


@dataclass(frozen=True, slots=True)
class TaskSummary:
    """One `tasks` row: the summary of one attempt. `time` is when the attempt ended."""

    time: datetime
    team: str
    batch: str
    task: str
    attempt: int
    node: str
    task_type: str
    template: str
    outcome: TaskState | str
    exit_code: int | None
    oom: bool
    timed_out: bool
    started: datetime | None
    duration_ms: int
    cost_compute_nusd: int
    cost_llm_nusd: int
    cost_storage_nusd: int
    cost_network_nusd: int
    cost_total_nusd: int
    tokens_input: int
    tokens_output: int
    llm_calls: int
    files_changed: int
    lines_added: int
    lines_deleted: int
    diff_sha256: str

    TABLE: ClassVar[str] = "tasks"


RECORD_TYPES: Final[Mapping[str, type]] = {
    "events": Event,
    "charges": Charge,
    "tasks": TaskSummary,
}
