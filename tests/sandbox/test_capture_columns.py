"""The columnar capture path: the readers' command records made ledger `events` rows in
C (one Arrow batch per run), byte for byte the rows the Python path makes, reaching the
ledger, the node's tally and the Monitor's rules as tables."""

from __future__ import annotations

import struct
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from helpers import fake_reader
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from accounting.schemas import DATA_SCHEMAS, Event
from accounting.validation import to_table
from accounting.writer import LedgerWriter
from sandbox import native
from sandbox.capture_records import (
    CaptureIdentity,
    as_events,
    capture_events,
    event_rows,
    ledger_sink,
)
from sandbox.event_rows import CommandRows, EventDecoder
from sandbox.proc_hub import NetlinkProcHub
from sandbox.proc_table import (
    REC_ACK,
    REC_END,
    REC_START,
    CaptureMode,
    CommandFinished,
    CommandStarted,
    ContainerEmpty,
    pack_control,
    pack_record,
    unpack_records,
)
from scheduler.node_channel import Tally

MODE = CaptureMode.NETLINK
OFFSET_NS = 1_700_000_000 * 10**9 + 123_456  # (not whole microseconds)
IDENTITIES = {
    "a" * 64: CaptureIdentity("team-a", "batch-1", "task-7", 2, "node-x"),
    "b" * 64: CaptureIdentity("tëam-b", "", "task-8", 0, "node-x"),
}
IDENTITY = IDENTITIES["a" * 64]
HEAD = struct.Struct("=IBBBxiiiqq64s")
I32 = st.integers(-(2**31), 2**31 - 1)
NS = st.integers(0, 2**62)
# argv bytes that stress the decoder: invalid and truncated UTF-8, controls, quotes
TRICKY = (b'"', b"\\", b"\x7f", b"\xe2\x82", b"\xf0\x9f\x98", b"\xed\xa0\x80", b"\xf4\x90\x80\x80",
          b"\xc0\xaf", b"\xe0\x80\xaf", "é€😀".encode())  # fmt: skip
PIECE = st.one_of(
    st.binary(max_size=12),
    st.sampled_from(TRICKY),
    st.text(max_size=6).map(lambda s: s.encode("utf-8", "surrogatepass")),
)
ARG = st.lists(PIECE, max_size=3).map(b"".join)


def raw_record(cid: str, kind: int, argv: list[bytes], pid: int, ppid: int, has_exit: int,
               code: int, start: int, ns: int, flags: int) -> bytes:  # fmt: skip
    """A record as a reader writes it, from raw argv bytes (any bytes but NUL)."""
    blob = b"\0".join(a.replace(b"\0", b"") for a in argv)
    return HEAD.pack(HEAD.size + len(blob), kind, has_exit, flags, pid, ppid, code, start, ns,
                     cid.encode()) + blob  # fmt: skip


RECORD = st.builds(
    raw_record,
    st.sampled_from(["a" * 64, "b" * 64, "c" * 64]),  # (c: not watched, skipped)
    st.sampled_from([REC_START, REC_END]),
    st.lists(ARG, max_size=4),
    I32, I32, st.sampled_from([0, 1, 7]), I32, NS, NS, st.integers(0, 255),
)  # fmt: skip


def decoder(*cids: str) -> EventDecoder:
    d = EventDecoder()
    for cid in cids or tuple(IDENTITIES):
        d.set(cid, event_rows(IDENTITIES[cid], OFFSET_NS))
    return d


def by_python(data: bytes) -> dict[str, pa.Table]:
    """What the record path makes of `data`: per watched container, its events table."""
    events: dict[str, list[Any]] = {}
    for _, cid, rec in unpack_records(data)[0]:
        if cid in IDENTITIES:
            capture_events([rec], IDENTITIES[cid], OFFSET_NS, events.setdefault(cid, []))
    return {cid: to_table("events", evs) for cid, evs in events.items()}


def tables(runs: list[tuple[str, CommandRows]]) -> dict[str, pa.Table]:
    return {cid: pa.Table.from_batches([r.rows]) for cid, r in runs}


@pytest.fixture(scope="module")
def compiled() -> None:
    if native.records_library() is None:
        pytest.skip("no C compiler: the native records decoder cannot be built")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(RECORD, max_size=12))
def test_the_native_decoder_makes_the_python_paths_rows_byte_for_byte(
    compiled: None, records: list[bytes]
) -> None:
    data = b"".join(records)
    runs, end = decoder().decode(data)
    assert end == len(data)
    made, want = tables(runs), by_python(data)
    assert made.keys() == want.keys()
    for cid, table in made.items():
        assert table.equals(want[cid]), (table.to_pylist(), want[cid].to_pylist())
    py_runs, py_end = decoder()._decode_in_python(data, 0, list(IDENTITIES))
    assert py_end == end and tables(py_runs).keys() == made.keys()
    assert all(tables(py_runs)[cid].equals(t) for cid, t in made.items())
    for cid, rows in runs:
        starts = [r for r in unpack_records(data)[0] if r[1] == cid and r[0] == REC_START]
        assert rows.started == len(starts)
        assert list(rows.started_pids) == [r[2].pid for r in starts[:4]]  # type: ignore[union-attr]


def test_a_run_stops_at_an_ack_an_empty_and_an_incomplete_record(compiled: None) -> None:
    cid = "a" * 64
    start = pack_record(cid, CommandStarted(5, 1, ("ls",), 10, MODE))
    data = start + pack_control(REC_ACK, cid) + start + pack_record(cid, ContainerEmpty(9))
    d = decoder()
    runs, end = d.decode(data)
    assert end == len(start) and [r.rows.num_rows for _, r in runs] == [1]
    assert d.decode(data, end) == ([], end)  # an ack first: no run
    second = end + len(pack_control(REC_ACK, cid))
    assert d.decode(data, second)[1] == second + len(start)
    assert d.decode(start[:-1]) == ([], 0)  # half a record waits for the rest
    assert decoder("b" * 64).decode(data) == ([], len(start))  # not watched: skipped


def test_without_the_native_decoder_the_same_rows_are_made_in_python(
    compiled: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = b"".join(pack_record(cid, CommandStarted(p, 1, ("é", "x\ty"), p, MODE))
                    for p in range(5) for cid in IDENTITIES)  # fmt: skip
    made = tables(decoder().decode(data)[0])
    monkeypatch.setattr(native, "records_library", lambda: None)
    by_python_path = tables(decoder().decode(data)[0])
    assert made.keys() == by_python_path.keys() == set(IDENTITIES)
    assert all(by_python_path[cid].equals(t) for cid, t in made.items())


def test_the_rows_keep_their_memory_after_the_decoders_buffers_are_gone(compiled: None) -> None:
    data = b"".join(pack_record("a" * 64, CommandStarted(p, 1, ("x" * 100,), p, MODE))
                    for p in range(200))  # fmt: skip
    [(_, rows)] = decoder().decode(data)[0]
    del data
    table = pa.Table.from_batches([rows.rows])
    assert table.schema == DATA_SCHEMAS["events"] and table.num_rows == 200
    assert [e.payload["pid"] for e in as_events(table)] == list(range(200))


def test_capture_events_counts_rows_and_keeps_their_place_among_records() -> None:
    data = b"".join(pack_record("a" * 64, CommandStarted(p, 1, ("x",), p, MODE)) for p in (7, 8))
    [(_, rows)] = decoder().decode(data)[0]
    batch: list[Any] = []
    done = capture_events([rows, ContainerEmpty(3), rows, rows], IDENTITY, OFFSET_NS, batch)
    assert done.commands == 6 and done.sample_now and done.started_pids[:2] == [7, 8]
    assert [t.num_rows for t in batch] == [2, 4]


def sample(team: str = "team-a") -> Event:
    return Event(datetime.now(UTC), team, "batch-1", "task-7", 2, "node-x", "resource_sample",
                 {"cpu_ns": 1})  # fmt: skip


def commands_table(*pids: int) -> pa.Table:
    data = b"".join(pack_record("a" * 64, CommandStarted(p, 1, ("x",), p, MODE)) for p in pids)
    [(_, rows)] = decoder().decode(data)[0]
    return pa.Table.from_batches([rows.rows])


class Writer:
    """A `LedgerWriter` stand-in keeping what each `append` got."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def append(self, table: str, rows: Any) -> None:
        self.calls.append((table, rows))


def test_the_ledger_sink_appends_records_and_tables_as_one_table_in_order(tmp_path: Path) -> None:
    writer = Writer()
    ledger_sink(writer)([sample(), commands_table(5), sample()])
    [(name, rows)] = writer.calls
    assert name == "events" and [e.kind for e in as_events(rows)] == [
        "resource_sample", "command_started", "resource_sample",
    ]  # fmt: skip
    ledger_sink(writer)([sample()])
    assert isinstance(writer.calls[-1][1], list)  # records alone stay records
    real = LedgerWriter(tmp_path, node="node-x")
    ledger_sink(real)([commands_table(5, 6), sample()])
    real.close()
    assert real.rows_durable == 3


def test_the_tally_counts_samples_of_a_table_and_skips_its_commands() -> None:
    table = pa.concat_tables(
        [commands_table(7, 8), to_table("events", [sample(), sample("team-b")])]
    )
    parts = dict((ref.team, part) for ref, part in Tally.by_attempt(table))
    assert {team: part.num_rows for team, part in parts.items()} == {"team-a": 3, "team-b": 1}
    tally = Tally()
    tally.add_table("events", Tally.counted("events", parts["team-a"]))
    assert tally.resource_samples == 1
    [(ref, whole)] = Tally.by_attempt(commands_table(7, 8))
    assert ref.team == "team-a" and whole.num_rows == 2
    assert Tally.counted("events", whole).num_rows == 0
    assert Tally.by_attempt(Tally.counted("events", whole)) == []


def test_the_monitor_stops_a_command_loop_seen_as_tables() -> None:
    from accounting.policies import load_policies
    from scheduler.event_builder import AttemptEvents
    from scheduler.monitor import MonitorCore

    monitor = MonitorCore(load_policies().anomalies)
    scheduler = AttemptEvents(IDENTITY.team, IDENTITY.batch, IDENTITY.task, node="node-x")
    monitor.ingest([scheduler.state(0, "queued"), scheduler.state(0, "running")])
    now_ns = int(datetime.now(UTC).timestamp() * 1e9) - OFFSET_NS
    cid = "c" * 64
    data = b"".join(pack_record(cid, CommandStarted(p, 1, ("sleep", "1"), now_ns + p, MODE))
                    for p in range(20))  # fmt: skip
    d = EventDecoder()
    d.set(cid, event_rows(CaptureIdentity("team-a", "batch-1", "task-7", 0, "x"), OFFSET_NS))
    [(_, rows)] = d.decode(data)[0]
    findings = monitor.ingest(pa.Table.from_batches([rows.rows]))
    assert [f.rule for f in findings] == ["repeated_command"]


def test_a_rows_subscriber_gets_a_reads_commands_before_the_ack_beside_a_records_one() -> None:
    hub = NetlinkProcHub(fake_reader(("a", "b"), 10, 20), columns_from=0)
    cid, other = "a" * 64, "d" * 64
    got: list[list[Any]] = []
    records: list[list[Any]] = []
    hub.subscribe(cid, [], got.append, rows=event_rows(IDENTITY, OFFSET_NS))
    try:
        hub.subscribe(other, [], records.append, batch=True)
        try:
            [[rows]] = got  # (subscribe returned on the ack: delivered before it)
            assert isinstance(rows, CommandRows) and rows.started == 1
            table = pa.Table.from_batches([rows.rows])
            assert table["payload"].to_pylist()[1] == (
                '{"argv":["a","b"],"duration_ms":0,"exit":0,"mode":"netlink","pid":5,"ppid":1}'
            )
            assert [type(r) for r in records[0]] == [CommandStarted, CommandFinished]
        finally:
            hub.unsubscribe(other)
    finally:
        hub.unsubscribe(cid)


def test_a_read_of_a_few_records_reaches_a_rows_subscriber_as_records() -> None:
    hub = NetlinkProcHub(fake_reader(("a", "b"), 10, 20))  # (two records: under 4 KiB)
    got: list[list[Any]] = []
    hub.subscribe("a" * 64, [], got.append, rows=event_rows(IDENTITY, OFFSET_NS))
    hub.unsubscribe("a" * 64)
    assert [[type(r) for r in batch] for batch in got] == [[CommandStarted, CommandFinished]]
