"""What a capture hands its sink, and how its raw records become ledger events.

`capture_events` is the per-command hot path of `sandbox.activity`: it turns a list of
raw records (`CommandStarted`, `CommandFinished`, `FileChange`, `ContainerEmpty`) into
`Event`s in one pass, with the identity's columns bound once, not per record.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from accounting.schemas import Charge, Event, EventKind
from sandbox.cgroup_stats import ResourceTotals
from sandbox.file_watch import FileChange
from sandbox.proc_table import CaptureMode, CommandFinished, CommandStarted, ContainerEmpty

__all__ = [
    "CaptureIdentity",
    "CaptureReport",
    "Converted",
    "Record",
    "Sink",
    "capture_events",
    "ledger_sink",
]

Record = Event | Charge
Sink = Callable[[list[Record]], None]
_NETLINK = CaptureMode.NETLINK
_STARTED, _FINISHED = EventKind.COMMAND_STARTED, EventKind.COMMAND_FINISHED
_FILE = EventKind.FILE_CHANGED


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


def ledger_sink(writer: Any) -> Sink:
    """A sink that appends each batch to a `LedgerWriter`, one call per table."""

    def sink(batch: list[Record]) -> None:
        by_table: dict[str, list[Record]] = {}
        for rec in batch:
            by_table.setdefault(rec.TABLE, []).append(rec)
        for table, rows in by_table.items():
            writer.append(table, rows)

    return sink


@dataclass
class Converted:
    """What one `capture_events` pass found besides the events."""

    commands: int = 0
    files: int = 0
    sample_now: bool = False  # the container emptied: take the last reading now
    started_pids: list[int] = field(default_factory=list)  # of the commands that started


def capture_events(
    items: list[object], identity: CaptureIdentity, offset_ns: int, batch: list[Record]
) -> Converted:
    """`items` as events appended to `batch`, in one pass (this runs per command).
    `offset_ns` turns the records' CLOCK_MONOTONIC times into Unix times."""
    i = identity
    team, batch_id, task, attempt, node = i.team, i.batch, i.task, i.attempt, i.node
    when, utc, off = datetime.fromtimestamp, UTC, offset_ns
    append = batch.append
    out = Converted()
    for item in items:
        kind = type(item)
        if kind is CommandStarted:
            assert isinstance(item, CommandStarted)
            out.commands += 1
            out.started_pids.append(item.pid)
            mode = "netlink" if item.mode is _NETLINK else item.mode.value
            payload: dict[str, Any] = {"argv": list(item.argv), "pid": item.pid,
                                       "ppid": item.ppid, "mode": mode}  # fmt: skip
            append(Event(when((item.mono_ns + off) / 1e9, utc), team, batch_id, task,
                         attempt, node, _STARTED, payload))  # fmt: skip
        elif kind is CommandFinished:
            assert isinstance(item, CommandFinished)
            mode = "netlink" if item.mode is _NETLINK else item.mode.value
            payload = {"argv": list(item.argv), "pid": item.pid, "ppid": item.ppid,
                       "duration_ms": max(0, item.mono_ns - item.start_mono_ns) // 1_000_000,
                       "mode": mode}  # fmt: skip
            if item.exit is not None:
                payload["exit"] = item.exit
            append(Event(when((item.mono_ns + off) / 1e9, utc), team, batch_id, task,
                         attempt, node, _FINISHED, payload))  # fmt: skip
        elif kind is FileChange:
            assert isinstance(item, FileChange)
            out.files += 1
            payload = {"path": item.path, "op": item.op, "bytes": item.bytes}
            if item.src is not None:
                payload["from"] = item.src
            append(Event(when((item.mono_ns + off) / 1e9, utc), team, batch_id, task,
                         attempt, node, _FILE, payload))  # fmt: skip
        elif kind is ContainerEmpty:  # the last reading before the cgroup goes
            out.sample_now = True
        else:
            raise TypeError(f"unexpected capture record {item!r}")
    return out
