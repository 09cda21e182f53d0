"""`LedgerActor`: the cluster's one `LedgerWriter`, as a named Ray actor.

Named `ledger` in namespace `sandfleet`, `num_cpus=0`, detached (the scheduler outlives
the driver that started it, and so must its ledger), on the head node when the cluster
offers the head resource. Callers append batches of rows (records, mappings or an Arrow
table) and flush; one actor is one audit chain (a restarted actor starts a new chain).

The tee: every batch the writer accepted is also sent to the Monitor actor (`monitor`
in the same namespace) when one runs, fire and forget (`ingest_many.remote`, never
waited for: the Monitor appends its findings back here). Batches are gathered and sent
at most every `_TEE_EVERY_S` (100 ms) in one call: submitting a Ray call per append
was the ledger actor's largest cost. The Monitor is looked up by the tee's timer thread
(never on an append), again every `_MONITOR_LOOKUP_S` and as soon as a Monitor says it
started (`monitor_started`); while it lags more than `_TEE_MAX_PENDING` calls behind,
batches are not teed (counted in `tee_stats`), so the ledger never waits on it.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any, Final

import pyarrow as pa
import ray

from accounting.errors import ConfigError
from accounting.validation import Rows
from accounting.writer import LedgerWriter

__all__ = ["HEAD_RESOURCE", "LEDGER_NAME", "NAMESPACE", "LedgerActor", "get_ledger", "head_options"]

NAMESPACE: Final = "sandfleet"
LEDGER_NAME: Final = "ledger"
HEAD_RESOURCE: Final = "sandfleet_head"
"""The custom resource cluster.yaml gives the head node; control actors ask for a sliver."""
MONITOR_NAME: Final = "monitor"  # scheduler.monitor_actor's actor
_TEED: Final = frozenset({"events", "charges", "tasks"})
_MONITOR_LOOKUP_S: Final = 2.0
_TEE_MAX_PENDING: Final = 100
_TEE_EVERY_S: Final = 0.1

log = logging.getLogger(__name__)


def head_options() -> dict[str, Any]:
    """Pin a control actor to the head when the cluster has `sandfleet_head`; else nothing."""
    if ray.cluster_resources().get(HEAD_RESOURCE, 0) > 0:
        return {"resources": {HEAD_RESOURCE: 0.001}}
    return {}


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0)
class LedgerActor:
    """Wraps one `LedgerWriter` under `data_dir`."""

    def __init__(self, data_dir: str, flush_interval_s: float = 1.0) -> None:
        self._data_dir = data_dir
        self._writer = LedgerWriter(
            data_dir, node=socket.gethostname(), flush_interval_s=flush_interval_s
        )
        self._monitor: Any = None
        self._monitor_at = -_MONITOR_LOOKUP_S
        self._tee_pending: list[Any] = []  # calls not yet known to have ended
        self._tee_waiting: list[tuple[str, Rows]] = []  # batches gathered for the next call
        self._tee_at = 0.0
        self._tee_lock = threading.Lock()  # the actor's thread and the tee's timer
        self._tee_sent = 0
        self._tee_calls = 0
        self._monitor_lookups = 0
        self._tee_dropped = 0
        threading.Thread(target=self._tee_timer, name="ledger-tee", daemon=True).start()

    def data_dir(self) -> str:
        return self._data_dir

    def chain_id(self) -> str:
        return self._writer.chain_id

    def append(self, table: str, rows: Rows) -> int:
        """Validate and buffer rows of one table; returns how many were accepted."""
        return self.append_many([(table, rows)])

    def append_many(self, batches: list[tuple[str, Rows]]) -> int:
        """Several tables' rows in one call, in order. Only the rows the writer kept (not
        a charge it already had) reach the Monitor."""
        n, accepted = 0, []
        for table, rows in batches:
            kept: list[bool] = []
            k = len(self._writer.append(table, rows, kept=kept))
            n += k
            if k:
                accepted.append((table, rows if k == len(kept) else _only_kept(rows, kept)))
        self._tee(accepted)
        return n

    def tee_stats(self) -> dict[str, Any]:
        """Batches sent to the Monitor (in how many calls), dropped while it lagged, calls
        still in flight, and how many times the Monitor was looked up."""
        with self._tee_lock:
            return {
                "monitor": self._monitor is not None,
                "sent": self._tee_sent,
                "calls": self._tee_calls,
                "lookups": self._monitor_lookups,
                "dropped": self._tee_dropped,
                "pending": len(self._tee_pending),
            }

    # -- the tee -------------------------------------------------------------------------

    def _monitor_handle(self) -> Any:
        """The Monitor actor, looked up again every `_MONITOR_LOOKUP_S` (it may start
        later, or be replaced); None while none runs."""
        now = time.monotonic()
        if now - self._monitor_at >= _MONITOR_LOOKUP_S:
            self._monitor_at = now
            self._monitor_lookups += 1
            try:
                self._monitor = ray.get_actor(MONITOR_NAME, namespace=NAMESPACE)
            except ValueError:
                self._monitor = None
        return self._monitor

    def _tee(self, batches: list[tuple[str, Rows]]) -> None:
        """Gather accepted rows for the Monitor; send them when the last call is
        `_TEE_EVERY_S` old (the timer sends what a quiet spell left)."""
        batches = [(t, rows) for t, rows in batches if t in _TEED]
        if not batches:
            return
        with self._tee_lock:
            self._tee_waiting.extend(batches)
            if self._monitor is not None and time.monotonic() - self._tee_at >= _TEE_EVERY_S:
                self._send_tee(self._monitor)

    def monitor_started(self) -> None:
        """A Monitor started (its constructor says so): look it up at the next tick."""
        self._monitor_at = -_MONITOR_LOOKUP_S

    def _tee_timer(self) -> None:
        while True:
            time.sleep(_TEE_EVERY_S)
            try:
                # Looked up here only, never on an append: the first lookup loads the
                # Monitor's class (~0.3 s of imports), which held up a batch's first
                # durable write.
                monitor = self._monitor_handle()
                with self._tee_lock:
                    if self._tee_waiting:  # sent, or dropped while no Monitor runs
                        self._send_tee(monitor)
            except Exception:  # the next tick tries again; the waiting rows are bounded
                log.exception("teeing ledger rows to the Monitor failed")
                with self._tee_lock:
                    self._tee_dropped += len(self._tee_waiting)
                    self._tee_waiting = []

    def _send_tee(self, monitor: Any) -> None:
        """One fire-and-forget call with every batch gathered (the tee lock held); none
        while no Monitor runs."""
        batches, self._tee_waiting = self._tee_waiting, []
        self._tee_at = time.monotonic()
        if monitor is None:
            return
        if self._tee_pending:
            _, self._tee_pending = ray.wait(
                self._tee_pending, num_returns=len(self._tee_pending), timeout=0
            )
        if len(self._tee_pending) >= _TEE_MAX_PENDING:
            self._tee_dropped += len(batches)
            if self._tee_dropped == len(batches) or self._tee_dropped % 1000 < len(batches):
                log.warning("the Monitor lags: %d batches not teed", self._tee_dropped)
            return
        self._tee_pending.append(monitor.ingest_many.remote(batches))
        self._tee_sent += len(batches)
        self._tee_calls += 1

    def flush(self) -> int:
        """Make every row appended so far durable; returns the rows written so far."""
        self._writer.flush()
        return self._writer.rows_durable

    def close(self) -> None:
        """Flush, write the final checkpoint and stop the writer (the actor stays)."""
        self._writer.close()


def _only_kept(rows: Rows, kept: list[bool]) -> Rows:
    if isinstance(rows, pa.Table | pa.RecordBatch):
        return rows.filter(pa.array(kept, pa.bool_()))
    return [row for row, keep in zip(rows, kept, strict=True) if keep]


def _same_dir(a: str, b: str) -> bool:
    if "://" in a or "://" in b:
        return a.rstrip("/") == b.rstrip("/")
    return os.path.realpath(Path(a).expanduser()) == os.path.realpath(Path(b).expanduser())


def get_ledger(data_dir: str) -> Any:
    """The cluster's ledger actor, created on first use; refuses another data dir."""
    handle = LedgerActor.options(  # type: ignore[attr-defined]
        name=LEDGER_NAME,
        namespace=NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
        **head_options(),
    ).remote(data_dir)
    actual = ray.get(handle.data_dir.remote())
    if not _same_dir(actual, data_dir):
        raise ConfigError(
            f"--data-dir {data_dir}: this Ray cluster's ledger already writes to {actual} "
            f"(fix: pass --data-dir {actual}, or use another cluster)"
        )
    return handle
