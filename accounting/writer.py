"""`LedgerWriter`: rows in, zstd Parquet segments and signed checkpoints out.

One writer is one audit chain: it gives every row it accepts, in any of the three
tables, the next gap-free `event_seq` of its own `chain_id`, and computes `row_hash`.
Rows wait in memory until a flush (by size: `flush_rows`; by time: `flush_interval_s`,
from a background thread; or `flush()` / `close()`), which writes one segment per
table and day under `DATA/ledger/<table>/day=YYYY-MM-DD/`, each published atomically by
the store (temporary name, fsync, rename, fsync the directory). Checkpoints follow every
`checkpoint_interval_s`, also when idle, and on `close()` (marked final).

A flush is two stages: the caller hashes the rows and extends the Merkle tree (Python,
holds the GIL); an I/O thread encodes the Parquet and writes it (C++ and syscalls, no
GIL), so hashing the next batch overlaps writing this one. At most `_IN_FLIGHT`
batches wait for the I/O thread (back-pressure). `flush()` returns only when every row
given before it is durable.

Charges are deduplicated by `charge_id` (`accounting.dedupe`): a retried charge,
appended again to this writer or already in the ledger from a recent writer, is dropped,
never counted twice.

Thread-safe: `append` from any thread. Several writers, in several processes, may
share one data directory: each has its own chain and file names. A failed write keeps
the unwritten segments; the next `flush()` retries them; the error reaches the caller
(from `flush`, `close`, `checkpoint` or the next `append`), never swallowed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from types import TracebackType
from typing import Final

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from accounting.audit import (
    CHECKPOINT_DIR,
    Checkpoint,
    SegmentRef,
    checkpoint_path,
    document_hash,
    key_id,
    load_signing_key,
    sign_document,
)
from accounting.canonical import row_hashes
from accounting.dedupe import RecentChargeIds
from accounting.errors import LedgerError
from accounting.merkle import MerkleTree
from accounting.schemas import SCHEMAS, TABLES
from accounting.store import LedgerStore, open_store
from accounting.validation import Rows, to_table

__all__ = ["LedgerWriter", "segment_bytes"]

log = logging.getLogger(__name__)

_CHAIN_ID: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.]{0,63}$")
_US_PER_DAY: Final = 86_400_000_000
_IN_FLIGHT: Final = 2
_ONE: Final = pa.scalar(1, pa.int64())  # typed: an untyped Python value costs ~0.1 ms
# to convert (pyarrow looks for dateutil each time; see accounting.validation._allowed)


def segment_bytes(table: pa.Table) -> bytes:
    """A table as the bytes of one zstd Parquet segment (row groups of 128Ki rows)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd", row_group_size=1 << 17)
    return sink.getvalue().to_pybytes()


def _seq_array(first: int, n: int) -> pa.Array:
    """first, first + 1, ..., first + n - 1 as int64, without a Python loop."""
    ones = pc.fill_null(pa.nulls(n, pa.int64()), _ONE)
    return pc.add(pc.cumulative_sum(ones), pa.scalar(first - 1, pa.int64()))


@dataclass
class _Chunk:
    table: str
    data: pa.Table
    first_seq: int


@dataclass
class _Part:
    """One segment to write: rows of one table and one day, with their audit columns."""

    table: str
    path: str
    rows: pa.Table
    first_seq: int
    last_seq: int


@dataclass
class _Batch:
    """One flush's segments, written in order; kept until all of them are written."""

    parts: list[_Part]
    rows: int
    written: list[SegmentRef] = field(default_factory=list)


class LedgerWriter:
    """Appends rows to the ledger under `data_dir` as one signed audit chain."""

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        *,
        chain_id: str | None = None,
        node: str = "",
        signing_key: str | os.PathLike[str] | None = None,
        flush_rows: int = 262_144,
        flush_interval_s: float = 1.0,
        checkpoint_interval_s: float = 60.0,
        store: LedgerStore | None = None,
    ) -> None:
        if flush_rows < 1 or flush_interval_s <= 0 or checkpoint_interval_s <= 0:
            raise LedgerError(
                "flush_rows, flush_interval_s and checkpoint_interval_s must be positive "
                "(fix: pass positive values)"
            )
        self.chain_id = chain_id or uuid.uuid4().hex
        if not _CHAIN_ID.match(self.chain_id):
            raise LedgerError(
                f"chain_id {self.chain_id!r} is not a safe file name "
                f"(fix: letters, digits, '_' and '.', at most 64, or omit it)"
            )
        self.node = node
        self.store = store or open_store(data_dir)
        self._key = load_signing_key(signing_key, data_dir=data_dir)
        self._key_id = key_id(self._key.public_key())
        if self.store.list_files(f"{CHECKPOINT_DIR}/{self.chain_id}"):
            raise LedgerError(
                f"chain {self.chain_id} already exists in {self.store.location} "
                f"(fix: omit chain_id so this writer starts a chain of its own)"
            )
        self.flush_rows = flush_rows
        self.flush_interval_s = flush_interval_s
        self.checkpoint_interval_s = checkpoint_interval_s

        self._lock = threading.Lock()  # the buffer and the next seq
        self._prep_lock = threading.RLock()  # hashing, the tree, checkpoints: in seq order
        self._cond = threading.Condition()  # the I/O queue and its outcome
        self._chunks: list[_Chunk] = []
        self._charge_lock = threading.Lock()  # the dedupe check and the buffering, together
        self._charge_ids = RecentChargeIds(self.store)
        self._buffered = 0
        self._next_seq = 0
        self._tree = MerkleTree()
        self._queue: deque[_Batch] = deque()
        self._io_error: BaseException | None = None
        self._durable = 0
        self._unsigned: list[SegmentRef] = []
        self._checkpoints = 0
        self._prev_hash: str | None = None
        self._closed = False
        self._finished = False
        now = time.monotonic()
        self._last_flush = now
        self._last_checkpoint = now
        self._stop = threading.Event()
        self._io_stop = False
        short = self.chain_id[:8]
        self._io = threading.Thread(target=self._io_loop, name=f"ledger-io-{short}", daemon=True)
        self._timer = threading.Thread(
            target=self._timer_loop, name=f"ledger-timer-{short}", daemon=True
        )
        self._io.start()
        self._timer.start()

    # -- public API

    def append(self, table: str, rows: Rows, *, kept: list[bool] | None = None) -> range:
        """Validate `rows` for `table` and buffer them; returns their `event_seq` range.

        The whole batch is refused (`SchemaError`) if any row is bad; nothing of it is kept.
        A charge whose `charge_id` is already recorded is dropped (a retry), so the range
        can be shorter than `rows`; `duplicate_charges` counts them, and `kept`, when
        given, receives one flag per row (True: it was kept).
        """
        self._raise_io_error()
        data = to_table(table, rows)
        if table == "charges":  # a retried charge is recorded once (`accounting.dedupe`)
            with self._charge_lock:
                return self._buffer(table, self._charge_ids.fresh(data, kept))
        if kept is not None:
            kept[:] = [True] * data.num_rows
        return self._buffer(table, data)

    @property
    def duplicate_charges(self) -> int:
        """Charge rows refused because their `charge_id` was already recorded."""
        return self._charge_ids.dropped

    def _buffer(self, table: str, data: pa.Table) -> range:
        n = data.num_rows
        with self._lock:
            if self._closed:
                raise LedgerError("this LedgerWriter is closed (fix: open a new one)")
            first = self._next_seq
            if n:
                self._chunks.append(_Chunk(table, data, first))
                self._next_seq += n
                self._buffered += n
            full = self._buffered >= self.flush_rows
        if full:
            self._submit(wait_room=True)
        return range(first, first + n)

    def flush(self) -> None:
        """Write every row appended so far as segments, durably, before returning."""
        with self._prep_lock:
            self._submit(wait_room=False)
            self._drain()

    def checkpoint(self) -> Checkpoint | None:
        """Flush, then sign and write a checkpoint of every row so far (None before any row)."""
        with self._prep_lock:
            self.flush()
            if self._checkpoints == 0:
                return None
            return self._write_checkpoint(final=False)

    def close(self) -> None:
        """Flush, write the final checkpoint, and stop the background threads.

        If the last write fails, the error is raised and the rows stay buffered: call
        `close()` again once the cause is fixed.
        """
        with self._lock:
            if self._finished:
                return
            self._closed = True
        self._stop.set()
        if self._timer is not threading.current_thread():
            self._timer.join()
        with self._prep_lock:
            self.flush()
            if self._checkpoints:
                self._write_checkpoint(final=True)
        with self._cond:
            self._io_stop = True
            self._cond.notify_all()
        self._io.join()
        self._finished = True

    def __enter__(self) -> LedgerWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def rows_durable(self) -> int:
        """Rows written to segments so far."""
        return self._durable

    @property
    def next_seq(self) -> int:
        """The `event_seq` the next accepted row will get."""
        return self._next_seq

    # -- stage 1, caller's thread: audit columns, hashes, tree

    def _submit(self, *, wait_room: bool) -> None:
        with self._prep_lock:
            if not self._chunks:
                return
            if self._checkpoints == 0:
                self._write_checkpoint(final=False)  # the genesis, before any segment
            with self._lock:
                chunks, self._chunks, self._buffered = self._chunks, [], 0
                self._last_flush = time.monotonic()
            batch = self._prepare(chunks)
            with self._cond:
                while wait_room and len(self._queue) >= _IN_FLIGHT and self._io_error is None:
                    self._cond.wait()
                self._queue.append(batch)
                self._cond.notify_all()

    def _prepare(self, chunks: list[_Chunk]) -> _Batch:
        leaves: list[tuple[int, bytes]] = []
        parts: list[_Part] = []
        for table in TABLES:
            mine = [c for c in chunks if c.table == table]
            if not mine:
                continue
            data = pa.concat_tables([c.data for c in mine])
            n = data.num_rows
            seqs = pa.concat_arrays([_seq_array(c.first_seq, c.data.num_rows) for c in mine])
            full = data.append_column(
                "chain_id", pc.fill_null(pa.nulls(n, pa.string()), self.chain_id)
            )
            full = full.append_column("event_seq", seqs)
            hashes = row_hashes(table, full)
            full = full.append_column("row_hash", hashes).cast(SCHEMAS[table])
            raw = hashes.buffers()[1].to_pybytes()
            offset = 0
            for c in mine:
                k = c.data.num_rows
                leaves.append((c.first_seq, raw[offset * 32 : (offset + k) * 32]))
                offset += k
            parts.extend(self._parts(table, full))
        leaves.sort(key=lambda x: x[0])
        blob = b"".join(b for _, b in leaves)
        self._tree.extend_blob(blob)
        return _Batch(parts=parts, rows=len(blob) // 32)

    def _parts(self, table: str, full: pa.Table) -> list[_Part]:
        days = pc.divide(full["time"].cast(pa.int64()), pa.scalar(_US_PER_DAY, pa.int64()))
        day_numbers = pc.unique(days).to_pylist()
        out = []
        for day_number in day_numbers:
            part = full if len(day_numbers) == 1 else full.filter(pc.equal(days, day_number))
            day = time.strftime("%Y-%m-%d", time.gmtime(day_number * 86_400))
            first, last = part["event_seq"][0].as_py(), part["event_seq"][-1].as_py()
            name = f"{self.chain_id}-{first:012d}-{uuid.uuid4().hex[:8]}.parquet"
            out.append(_Part(table, f"ledger/{table}/day={day}/{name}", part, first, last))
        return out

    # -- stage 2, I/O thread: Parquet bytes, atomic writes

    def _io_loop(self) -> None:
        while True:
            with self._cond:
                while not self._io_stop and (not self._queue or self._io_error is not None):
                    self._cond.wait()
                if self._io_stop and (not self._queue or self._io_error is not None):
                    return
                batch = self._queue[0]
            try:
                while batch.parts:
                    self._write_part(batch, batch.parts[0])
                    batch.parts.pop(0)
            except Exception as e:  # kept for the caller, who retries with flush()
                log.exception("ledger writer %s: segment write failed", self.chain_id)
                with self._cond:
                    self._io_error = e
                    self._cond.notify_all()
                continue
            with self._cond:
                self._queue.popleft()
                self._unsigned.extend(batch.written)
                self._durable += batch.rows
                self._cond.notify_all()

    def _write_part(self, batch: _Batch, part: _Part) -> None:
        data = segment_bytes(part.rows)
        self.store.write_atomic(part.path, data)
        batch.written.append(
            SegmentRef(
                path=part.path,
                sha256=hashlib.sha256(data).hexdigest(),
                rows=part.rows.num_rows,
                table=part.table,
                first_seq=part.first_seq,
                last_seq=part.last_seq,
            )
        )

    def _drain(self) -> None:
        """Wait until the I/O queue is empty; retry a failed write once; raise its error."""
        with self._cond:
            if self._io_error is not None and self._queue:
                self._io_error = None  # retry what failed
                self._cond.notify_all()
            while self._queue and self._io_error is None:
                self._cond.wait()
        self._raise_io_error()

    def _raise_io_error(self) -> None:
        with self._cond:
            error = self._io_error
        if error is not None:
            raise LedgerError(
                f"ledger writer {self.chain_id}: writing a segment to {self.store.location} "
                f"failed: {error} (the rows are kept; fix the cause, then call flush())"
            ) from error

    # -- checkpoints and the timer

    def _write_checkpoint(self, *, final: bool) -> Checkpoint:
        cp = Checkpoint(
            chain_id=self.chain_id,
            number=self._checkpoints,
            size=self._tree.size,
            root=self._tree.root().hex(),
            prev=self._prev_hash,
            time_us=time.time_ns() // 1000,
            node=self.node,
            final=final,
            segments=tuple(self._unsigned),
            key_id=self._key_id,
        )
        data = sign_document(cp.to_document(), self._key)
        self.store.write_atomic(checkpoint_path(self.chain_id, cp.number), data, exclusive=True)
        self._prev_hash = document_hash(data)
        self._checkpoints += 1
        self._unsigned = []
        self._last_checkpoint = time.monotonic()
        return cp

    def _timer_loop(self) -> None:
        tick = max(0.01, min(self.flush_interval_s, self.checkpoint_interval_s) / 4)
        while not self._stop.wait(tick):
            now = time.monotonic()
            try:
                if self._buffered and now - self._last_flush >= self.flush_interval_s:
                    self._submit(wait_room=False)
                if self._checkpoints and now - self._last_checkpoint >= self.checkpoint_interval_s:
                    self.checkpoint()
            except LedgerError:  # the I/O error stays recorded for the caller; retried later
                log.warning(
                    "ledger writer %s: background flush failed", self.chain_id, exc_info=True
                )

    def __repr__(self) -> str:
        return (
            f"LedgerWriter(chain_id={self.chain_id!r}, store={self.store.location!r}, "
            f"next_seq={self._next_seq})"
        )
