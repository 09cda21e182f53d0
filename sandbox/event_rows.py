"""The capture's columnar path: a run of the readers' command records as ledger
`events` rows, one Arrow batch per container, with no Python object per record.

`EventDecoder.decode` is one call to `sandbox/native/records.c` (built by
`sandbox.native`) that writes every row — time, identity columns, kind, and the payload
as canonical JSON — and hands the batch over through Arrow's C data interface; without
a compiler the same rows are made in Python, bit for bit (tests compare both).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, NamedTuple

from sandbox.proc_table import REC_END, REC_START, RECORD, cid_text

if TYPE_CHECKING:
    import pyarrow as pa

__all__ = ["CommandRows", "EventDecoder", "EventRows"]


class EventRows(NamedTuple):
    """What makes a container's command records its ledger `events` rows: the columns
    common to them, and the offset from CLOCK_MONOTONIC to Unix time."""

    team: str
    batch: str
    task: str
    attempt: int
    node: str
    offset_ns: int


@dataclass(frozen=True, slots=True)
class CommandRows:
    """One container's command records from one read, as `events` rows (an Arrow record
    batch with `accounting.schemas.DATA_SCHEMAS["events"]`): no object per record;
    `started` of them are command_started, the first of whose pids are `started_pids`."""

    rows: pa.RecordBatch
    started: int
    started_pids: tuple[int, ...]


class _Target(ctypes.Structure):
    """records.c's `struct sf_target`."""

    _fields_ = [
        ("cid", ctypes.c_char * 64),
        ("text", ctypes.c_char_p * 4),
        ("text_len", ctypes.c_int32 * 4),
        ("attempt", ctypes.c_int32),
        ("offset_ns", ctypes.c_int64),
    ]


_PIDS_KEPT: Final = 4  # records.c: started pids reported per container
_ARROW_ARRAY: Final = 80  # bytes of a C data interface `struct ArrowArray`


class EventDecoder:
    """Runs of command records as `CommandRows` for the containers it is given
    (`sandbox/native/records.c`, one C call and one Arrow import per run; in Python,
    bit for bit the same, without a compiler). `set` and `decode` may run on different
    threads: `decode` reads one snapshot of the containers."""

    def __init__(self) -> None:
        self._rows: dict[str, EventRows] = {}
        self._table: tuple[list[str], Any] = ([], None)  # cids, and their C targets

    def set(self, container_id: str, rows: EventRows | None) -> None:
        """Make rows of `container_id`'s records with `rows` (None: skip its records)."""
        if rows is None:
            self._rows.pop(container_id, None)
        else:
            self._rows[container_id] = rows
        cids = list(self._rows)
        targets = (_Target * max(1, len(cids)))()
        for t, cid in zip(targets, cids, strict=False):
            r = self._rows[cid]
            texts = [v.encode() for v in (r.team, r.batch, r.task, r.node)]
            t.cid = cid.encode()
            for i, v in enumerate(texts):
                t.text[i], t.text_len[i] = v, len(v)
            t.attempt, t.offset_ns = r.attempt, r.offset_ns
        self._table = (cids, targets)  # (the C strings live as long as `targets` does)

    def decode(self, data: bytes, off: int = 0) -> tuple[list[tuple[str, CommandRows]], int]:
        """The run of `REC_START` / `REC_END` records of `data` from `off`, up to a record
        of another kind or an incomplete one: the rows of each container given (in
        order), and where the run ended (`off` when `data[off:]` starts with no command).
        """
        from sandbox.native import records_library

        cids, targets = self._table
        lib = records_library()
        if lib is None:
            return self._decode_in_python(data, off, cids)
        import pyarrow as pa

        from accounting.schemas import DATA_SCHEMAS

        k = len(cids)
        stats = (ctypes.c_int32 * (k * (2 + _PIDS_KEPT) or 1))()
        out = ctypes.create_string_buffer(_ARROW_ARRAY)
        end = ctypes.c_int64()
        at = ctypes.addressof(stats)
        n = lib.sandfleet_decode_events(data, len(data), off, ctypes.byref(end), targets, k, at,
                                        at + 4 * k, at + 8 * k, out)  # fmt: skip
        if n < 0:
            raise MemoryError("the records decoder could not allocate a batch")
        if n == 0:
            return [], end.value
        batch = pa.RecordBatch._import_from_c(ctypes.addressof(out), DATA_SCHEMAS["events"])
        found, first = [], 0
        for t, cid in enumerate(cids):
            count = stats[t]
            if count:
                started = stats[k + t]
                pids = stats[
                    2 * k + _PIDS_KEPT * t : 2 * k + _PIDS_KEPT * t + min(started, _PIDS_KEPT)
                ]
                rows = batch.slice(first, count) if count < n else batch
                found.append((cid, CommandRows(rows, started, tuple(pids))))
                first += count
        return found, end.value

    def _decode_in_python(
        self, data: bytes, off: int, cids: list[str]
    ) -> tuple[list[tuple[str, CommandRows]], int]:
        """`decode` without the native decoder: the rows `capture_events` makes."""
        import pyarrow as pa

        from accounting.schemas import DATA_SCHEMAS, canonical_json

        schema = DATA_SCHEMAS["events"]
        wanted = {cid: self._rows.get(cid) for cid in cids}
        groups: dict[str, tuple[list[Any], list[str], list[int]]] = {}
        head, n = RECORD.size, len(data)
        while off + head <= n:
            size, kind, has_exit, _, pid, ppid, code, start_ns, ns, raw = RECORD.unpack_from(
                data, off
            )
            if size < head or off + size > n or kind not in (REC_START, REC_END):
                break
            cid = cid_text(raw)
            r = wanted.get(cid)
            off += size
            if r is None:
                continue
            blob = data[off - size + head : off]
            argv = blob.decode("utf-8", "replace").split("\0") if blob else []
            payload: dict[str, Any] = {"argv": argv, "pid": pid, "ppid": ppid, "mode": "netlink"}
            if kind == REC_END:
                payload["duration_ms"] = max(0, ns - start_ns) // 1_000_000
                if has_exit:
                    payload["exit"] = code
            rows, kinds, starts = groups.setdefault(cid, ([], [], []))
            rows.append(((ns + r.offset_ns) // 1000, canonical_json(payload)))
            kinds.append("command_started" if kind == REC_START else "command_finished")
            if kind == REC_START:
                starts.append(pid)
        found = []
        for cid, (rows, kinds, starts) in groups.items():
            r, m = wanted[cid], len(rows)
            assert r is not None
            values = ([t for t, _ in rows], [r.team] * m, [r.batch] * m, [r.task] * m,
                      [r.attempt] * m, [r.node] * m, kinds, [p for _, p in rows])  # fmt: skip
            arrays = [pa.array(v, f.type) for v, f in zip(values, schema, strict=True)]
            batch = pa.RecordBatch.from_arrays(arrays, schema=schema)
            found.append((cid, CommandRows(batch, len(starts), tuple(starts[:_PIDS_KEPT]))))
        return found, off
