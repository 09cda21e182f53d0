"""What a capture hands its sink, and how its raw records become ledger events.

`capture_events` is the per-command hot path of `sandbox.activity`: it turns a list of
raw records (`CommandStarted`, `CommandFinished`, `FileChange`, `ContainerEmpty`) into
`Event`s in one pass, with the identity's columns bound once, not per record.

The columnar path: the hub's `CommandRows` (a read's command records of the container,
already `events` rows in one Arrow batch, made in C with the identity's columns and
canonical JSON payloads) become one `pa.Table` per run of them (one Arrow call, none per
row), for a sink that takes tables (`takes_tables`: `ledger_sink`'s does). Such a sink
receives `Event`s, `Charge`s and tables, in order; `as_events` turns a table back into
`Event`s.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar, Final

import pyarrow as pa

from accounting.schemas import Charge, Event, EventKind
from accounting.validation import to_table
from sandbox.cgroup_stats import ResourceTotals
from sandbox.event_rows import CommandRows, EventRows
from sandbox.file_watch import FileChange
from sandbox.proc_table import (
    CaptureMode,
    CommandFinished,
    CommandStarted,
    ContainerEmpty,
)

__all__ = [
    "CaptureIdentity",
    "CaptureReport",
    "Converted",
    "LedgerSink",
    "Record",
    "Sink",
    "as_events",
    "capture_events",
    "event_rows",
    "event_time",
    "ledger_sink",
    "takes_tables",
]

Record = Event | Charge
Sink = Callable[[list[Record | pa.Table]], None]  # tables only for a sink that takes_tables
_NETLINK = CaptureMode.NETLINK
_STARTED, _FINISHED = EventKind.COMMAND_STARTED, EventKind.COMMAND_FINISHED
_FILE = EventKind.FILE_CHANGED
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


def event_rows(identity: CaptureIdentity, offset_ns: int) -> EventRows:
    """What the hub's decoder needs to make a capture's command records its rows."""
    i = identity
    return EventRows(i.team, i.batch, i.task, i.attempt, i.node, offset_ns)


def event_time(mono_ns: int, offset_ns: int) -> datetime:
    """A record's CLOCK_MONOTONIC time as the ledger's (whole microseconds, rounded down,
    as `sandbox/native/records.c` makes it: both paths give the same rows)."""
    return _EPOCH + timedelta(microseconds=(mono_ns + offset_ns) // 1000)


@dataclass(frozen=True)
class CaptureIdentity:
    """Who and what the captured sandbox runs for (the ledger's common columns)."""

    team: str
    batch: str
    task: str
    attempt: int
    node: str
    task_type: str = ""


@dataclass(frozen=True)
class CaptureReport:
    """What a capture saw, and the compute charges made from its totals."""

    mode: CaptureMode
    commands: int
    file_changes: int
    samples: int
    totals: ResourceTotals
    charges: tuple[Charge, ...]  # empty when no sample was taken (the container never ran)
    lost_commands: int  # connector overruns while it ran (node-wide: each may hide commands)
    lost_file_changes: int  # inotify queue overflows


def takes_tables(sink: Sink) -> bool:
    """Whether `sink` takes Arrow tables of events (its `accepts_tables` is true, as
    `ledger_sink`'s is); any other sink receives `Event`s and `Charge`s only."""
    return bool(getattr(sink, "accepts_tables", False))


class LedgerSink:
    """Appends each batch to a `LedgerWriter` (or anything with its `append`), one call
    per ledger table: the records alone as a list, or, when the batch holds Arrow tables,
    everything as one table, in the batch's order."""

    accepts_tables: ClassVar[bool] = True

    def __init__(self, writer: Any) -> None:
        self.writer = writer

    def __call__(self, batch: list[Record | pa.Table]) -> None:
        by_table: dict[str, list[Record | pa.Table]] = {}
        for rec in batch:
            name = "events" if isinstance(rec, pa.Table) else rec.TABLE
            by_table.setdefault(name, []).append(rec)
        for table, rows in by_table.items():
            self.writer.append(table, _as_rows(table, rows))


def ledger_sink(writer: Any) -> LedgerSink:
    """A sink that appends each batch to a `LedgerWriter` (see `LedgerSink`)."""
    return LedgerSink(writer)


def _as_rows(table: str, rows: list[Record | pa.Table]) -> list[Record | pa.Table] | pa.Table:
    """`rows` as they are when they hold no Arrow table; else as one table, in order."""
    if not any(isinstance(r, pa.Table) for r in rows):
        return rows
    parts: list[pa.Table] = []
    run: list[Record] = []
    for r in rows:
        if isinstance(r, pa.Table):
            if run:
                parts.append(to_table(table, run))
                run = []
            parts.append(r)
        else:
            run.append(r)
    if run:
        parts.append(to_table(table, run))
    return parts[0] if len(parts) == 1 else pa.concat_tables(parts)


def as_events(table: pa.Table) -> list[Event]:
    """An `events` table's rows as `Event`s (payloads parsed): for a sink that wants
    records, or a test."""
    rows = table.to_pylist()
    return [Event(**{**r, "payload": json.loads(r["payload"])}) for r in rows]


@dataclass
class Converted:
    """What one `capture_events` pass found besides the events."""

    commands: int = 0
    files: int = 0
    sample_now: bool = False  # the container emptied: take the last reading now
    started_pids: list[int] = field(default_factory=list)  # of the commands that started


def capture_events(
    items: list[object],
    identity: CaptureIdentity,
    offset_ns: int,
    batch: list[Record | pa.Table],
    *,
    want_pids: bool = True,
) -> Converted:
    """`items` as events appended to `batch`, in one pass (this runs per command); each
    run of `CommandRows` as one table. `offset_ns` turns the records' CLOCK_MONOTONIC
    times into Unix times; `want_pids`: report started pids."""
    i = identity
    team, batch_id, task, attempt, node = i.team, i.batch, i.task, i.attempt, i.node
    epoch, us, off = _EPOCH, timedelta, offset_ns
    append = batch.append
    out = Converted()
    runs: list[CommandRows] = []
    for item in items:
        kind = type(item)
        if kind is CommandRows:
            assert isinstance(item, CommandRows)
            runs.append(item)
            continue
        if runs:
            append(_rows_table(runs, out, want_pids))
            runs = []
        if kind is CommandStarted:
            assert isinstance(item, CommandStarted)
            out.commands += 1
            out.started_pids.append(item.pid)
            mode = "netlink" if item.mode is _NETLINK else item.mode.value
            payload: dict[str, Any] = {"argv": list(item.argv), "pid": item.pid,
                                       "ppid": item.ppid, "mode": mode}  # fmt: skip
            append(Event(epoch + us(microseconds=(item.mono_ns + off) // 1000), team,
                         batch_id, task, attempt, node, _STARTED, payload))  # fmt: skip
        elif kind is CommandFinished:
            assert isinstance(item, CommandFinished)
            mode = "netlink" if item.mode is _NETLINK else item.mode.value
            payload = {"argv": list(item.argv), "pid": item.pid, "ppid": item.ppid,
                       "duration_ms": max(0, item.mono_ns - item.start_mono_ns) // 1_000_000,
                       "mode": mode}  # fmt: skip
            if item.exit is not None:
                payload["exit"] = item.exit
            append(Event(epoch + us(microseconds=(item.mono_ns + off) // 1000), team,
                         batch_id, task, attempt, node, _FINISHED, payload))  # fmt: skip
        elif kind is FileChange:
            assert isinstance(item, FileChange)
            out.files += 1
            payload = {"path": item.path, "op": item.op, "bytes": item.bytes}
            if item.src is not None:
                payload["from"] = item.src
            append(Event(epoch + us(microseconds=(item.mono_ns + off) // 1000), team,
                         batch_id, task, attempt, node, _FILE, payload))  # fmt: skip
        elif kind is ContainerEmpty:  # the last reading before the cgroup goes
            out.sample_now = True
        else:
            raise TypeError(f"unexpected capture record {item!r}")
    if runs:
        append(_rows_table(runs, out, want_pids))
    return out


def _rows_table(runs: list[CommandRows], out: Converted, want_pids: bool) -> pa.Table:
    """A run of `CommandRows` as one table (one Arrow call), counting its commands (and
    a few started pids) into `out`."""
    for r in runs:
        out.commands += r.started
        if want_pids:
            out.started_pids += r.started_pids
    return pa.Table.from_batches([r.rows for r in runs])
