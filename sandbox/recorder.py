"""Where the gateway's events and charges go: a `LedgerSink`, written off the event loop.

`LedgerSink` is the seam (`accounting.writer.LedgerWriter` satisfies it; so does a
`LedgerWriter` actor wrapped in a small adapter). `MemorySink` is a faithful in-memory
one: it validates every batch exactly as the writer does (`accounting.validation`).

`Recorder` queues rows from the event loop and hands them to the sink in a worker
thread, batched per table, so a slow disk never stalls a call. A sink that fails keeps
its rows queued; `flush()` retries once and then raises `LedgerError`, and
`healthy` turns False so the gateway stops serving calls it cannot record (fail closed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol, runtime_checkable

from accounting.errors import LedgerError
from accounting.schemas import Event, EventKind
from accounting.validation import to_table
from sandbox.credentials import AttemptRef

__all__ = ["LedgerSink", "MemorySink", "Recorder", "event_for"]

log = logging.getLogger(__name__)


@runtime_checkable
class LedgerSink(Protocol):
    """Accepts rows (`Event`, `Charge` records) for one ledger table."""

    def append(self, table: str, rows: Sequence[Any]) -> Any: ...


class MemorySink:
    """Rows kept in lists, validated like the real writer would. Thread-safe."""

    def __init__(self) -> None:
        self.rows: dict[str, list[Any]] = {"events": [], "charges": [], "tasks": []}
        self._lock = threading.Lock()

    def append(self, table: str, rows: Sequence[Any]) -> None:
        to_table(table, list(rows))  # raises SchemaError like LedgerWriter.append
        with self._lock:
            self.rows[table].extend(rows)

    def events(self, kind: str | None = None) -> list[Any]:
        with self._lock:
            return [e for e in self.rows["events"] if kind is None or str(_v(e.kind)) == kind]

    def charges(self) -> list[Any]:
        with self._lock:
            return list(self.rows["charges"])


def event_for(ref: AttemptRef, node: str, kind: EventKind, payload: Mapping[str, Any]) -> Event:
    """An `events` row about one attempt, stamped now (UTC)."""
    return Event(
        time=datetime.now(UTC),
        team=ref.team,
        batch=ref.batch,
        task=ref.task,
        attempt=ref.attempt,
        node=node,
        kind=kind,
        payload=dict(payload),
    )


def _v(x: Any) -> Any:
    return getattr(x, "value", x)


class Recorder:
    """An asyncio-side queue in front of a (blocking) `LedgerSink`.

    Rows wait up to `linger_s` (or until `max_batch` are queued, or a `flush()`) so the
    sink validates them in batches: one row costs the writer about as much as fifty.
    """

    def __init__(self, sink: LedgerSink, *, linger_s: float = 0.1, max_batch: int = 2000):
        self.sink = sink
        self.linger_s = linger_s
        self.max_batch = max_batch
        self._pending: list[tuple[str, Any]] = []
        self._urgent = asyncio.Event()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._error: BaseException | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def healthy(self) -> bool:
        return self._error is None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="recorder")

    def record(self, table: str, rows: Sequence[Any]) -> None:
        """Queue rows; returns at once."""
        if not rows:
            return
        self._pending.extend((table, r) for r in rows)
        self._idle.clear()
        self._wake.set()
        if len(self._pending) >= self.max_batch:
            self._urgent.set()

    async def _write_pending(self) -> None:
        batch, self._pending = self._pending, []
        by_table: dict[str, list[Any]] = {}
        for table, row in batch:
            by_table.setdefault(table, []).append(row)
        done: list[str] = []
        try:
            for table, rows in by_table.items():
                await asyncio.to_thread(self.sink.append, table, rows)
                done.append(table)
        except Exception as e:  # the sink's own error, kept and re-raised by flush()
            log.error("the ledger sink refused %d rows: %s", len(batch), e)
            self._error = e
            kept = [(t, r) for t, r in batch if t not in done]
            self._pending = kept + self._pending
            raise

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self.linger_s > 0 and not self._urgent.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.linger_s):
                        await self._urgent.wait()
            self._urgent.clear()
            if self._error is None and self._pending:
                try:
                    await self._write_pending()
                except Exception as e:  # kept in self._error; flush() raises it
                    log.debug("recorder paused after a sink error: %s", e)
            if not self._pending or self._error is not None:
                self._idle.set()

    async def flush(self) -> None:
        """Wait until every queued row reached the sink; raise `LedgerError` if it cannot."""
        if self._task is None:
            self.start()
        self._urgent.set()
        self._wake.set()
        await self._idle.wait()
        if self._error is None:
            return
        self._error = None  # retry once, here, so the caller sees the outcome
        try:
            await self._write_pending()
        except Exception as e:
            raise LedgerError(
                f"the gateway cannot record to the ledger ({type(e).__name__}: {e}); "
                f"{len(self._pending)} rows are kept in memory. Fix the ledger writer, "
                "then flush again"
            ) from e

    async def aclose(self) -> None:
        await self.flush()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
