"""`LedgerOutbox`: the scheduler's rows on their way to the `LedgerActor`.

The scheduler produces a few rows per attempt (its `task_state` events and its `tasks`
row) on every turn of its loop. Each `append` the ledger does costs a fixed amount
(validating a batch is vectorised over its rows), so the outbox gathers rows and ships
them at most every `SEND_EVERY_S` (or once `SEND_ROWS` wait), as one `append_many`
call holding one batch per table: the rows of a table keep their order (and so their
`event_seq` order); only the interleaving of rows of different tables, which nothing
reads, differs. Calls from one caller run in order, so a batch sent later never
overtakes one sent earlier.

`send(settle=True)` ships now and waits until the ledger accepted every row sent so far;
`durable=True` also waits until it is on disk. A refused write raises, there or at the
next wait. Not thread-safe: the scheduler calls it under its lock.

`LedgerSender` is the same outbox sending on a thread of its own, for callers that must
not wait on the ledger at all (the node gateway: its captures' sinks run on the node's
shared capture loop, and a sandbox's last rows must not hold up its removal).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Final

import ray

__all__ = ["SEND_EVERY_S", "SEND_ROWS", "LedgerOutbox", "LedgerSender"]

log = logging.getLogger(__name__)

SEND_EVERY_S: Final = 0.25  # rows reach the ledger actor at most this late
SEND_ROWS: Final = 4096  # ... or once this many rows wait
_IN_FLIGHT: Final = 16  # calls not yet known to have succeeded, before checking them


class LedgerOutbox:
    """Rows gathered per table, sent in few large calls (see the module doc)."""

    def __init__(
        self, ledger: Any, *, every_s: float = SEND_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:  # fmt: skip
        self._ledger = ledger
        self._every_s = every_s
        self._clock = clock
        self._batches: list[tuple[str, Any]] = []  # (table, rows), in the order added
        self._open: dict[str, list[Any]] = {}  # per table: the last batch, a list still growing
        self._rows = 0
        self._sent_at = -every_s  # the first rows go at once
        self._writes: list[Any] = []  # ledger calls not yet known to have succeeded

    def __len__(self) -> int:
        """Rows waiting to be sent."""
        return self._rows

    def add(self, rows: list[tuple[str, Any]]) -> None:
        """Queue batches of rows (lists of records, or Arrow tables) for their tables."""
        for table, batch in rows:
            if isinstance(batch, list):
                if not batch:
                    continue
                growing = self._open.get(table)
                if growing is None:
                    growing = self._open[table] = []
                    self._batches.append((table, growing))
                growing.extend(batch)
            else:  # an Arrow table: its own batch; later rows of its table go after it
                self._open.pop(table, None)
                self._batches.append((table, batch))
            self._rows += len(batch)

    def send(self, *, settle: bool = False, durable: bool = False) -> None:
        """Ship the rows when due (or now, with `settle` or `durable`); see the module doc."""
        now = self._clock()
        due = now - self._sent_at >= self._every_s or self._rows >= SEND_ROWS
        if self._batches and (due or settle or durable):
            self._writes.append(self._ledger.append_many.remote(self._batches))
            self._batches, self._open, self._rows, self._sent_at = [], {}, 0, now
        if durable:
            self._writes.append(self._ledger.flush.remote())
        if settle or durable:
            writes, self._writes = self._writes, []
            ray.get(writes)
        elif len(self._writes) > _IN_FLIGHT:  # back-pressure, and surface errors early
            done, self._writes = ray.wait(self._writes, num_returns=len(self._writes), timeout=0)
            ray.get(done)


class LedgerSender:
    """A `LedgerOutbox` on a thread: `append` queues and returns, rows go out every
    `every_s`; `flush()` sends now and waits until the ledger accepted everything.

    A refused write is logged and raised by the next `append` or `flush`: the node's
    gateway then fails closed, as it did when every append waited. Thread-safe.
    """

    def __init__(self, ledger: Any, *, every_s: float = 0.1) -> None:
        self._outbox = LedgerOutbox(ledger, every_s=every_s)
        self._every_s = every_s
        self._lock = threading.Lock()
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ledger-sender", daemon=True)
        self._thread.start()

    def append(self, table: str, rows: Any) -> int:
        self._raise()
        with self._lock:
            self._outbox.add([(table, rows)])
        return len(rows)

    def flush(self) -> None:
        """Send what waits and wait until the ledger accepted every row so far."""
        with self._lock:
            self._send(settle=True)
        self._raise()

    def close(self) -> None:
        """Stop the thread after a last flush."""
        self._stop.set()
        self._thread.join()
        self.flush()

    def _run(self) -> None:
        while not self._stop.wait(self._every_s):
            with self._lock:
                self._send()

    def _send(self, *, settle: bool = False) -> None:
        try:
            self._outbox.send(settle=settle)
        except Exception as e:  # raised to the next caller
            log.error("the ledger refused the node's rows: %s", e)
            if self._error is None:
                self._error = e

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error
