"""LedgerWriter: segments, flushing, checkpoints, concurrency, failures, filesystems."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from accounting.audit import load_signing_key
from accounting.errors import ConfigError, LedgerError
from accounting.schemas import SCHEMAS, Charge, Event, TaskSummary
from accounting.store import ArrowFsStore, LocalStore
from accounting.verify import verify
from accounting.writer import LedgerWriter

DAY = datetime(2026, 5, 1, 23, 59, 59, tzinfo=UTC)


@pytest.fixture(autouse=True)
def _audit_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SANDFLEET_AUDIT_KEY", str(tmp_path / "keys" / "audit.pem"))


def events(n: int, start: datetime = DAY, tag: str = "") -> list[Event]:
    return [
        Event(
            start + timedelta(microseconds=i),
            "team",
            "batch",
            f"task-{tag}{i % 7}",
            1,
            "node",
            "command_started",
            {"argv": ["echo", tag, str(i)], "pid": i, "ppid": 1},
        )
        for i in range(n)
    ]


def events_table(n: int, tag: str) -> pa.Table:
    base = int(DAY.timestamp() * 1_000_000)
    return pa.table(
        {
            "time": pa.array(range(base, base + n), pa.timestamp("us", tz="UTC")),
            "team": [tag] * n,
            "batch": ["b"] * n,
            "task": [f"{tag}-{i}" for i in range(n)],
            "attempt": pa.array([1] * n, pa.int32()),
            "node": ["n"] * n,
            "kind": ["command_started"] * n,
            "payload": [json.dumps({"i": i}) for i in range(n)],
        }
    )


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def segments(data_dir: Path, table: str = "*") -> list[Path]:
    return sorted(data_dir.glob(f"ledger/{table}/day=*/*.parquet"))


def test_rows_land_in_day_partitions_as_zstd_parquet_with_the_full_schema(data_dir: Path) -> None:
    with LedgerWriter(data_dir, node="n1") as w:
        w.append("events", events(3))  # the last microseconds of May 1st ...
        w.append("events", events(2, start=DAY + timedelta(seconds=1)))  # ... and May 2nd
    days = sorted(p.parent.name for p in segments(data_dir, "events"))
    assert days == ["day=2026-05-01", "day=2026-05-02"]
    for path in segments(data_dir):
        meta = pq.ParquetFile(path).metadata
        assert meta.row_group(0).column(0).compression == "ZSTD"
        assert pq.read_schema(path).remove_metadata() == SCHEMAS["events"]
    assert not list(data_dir.rglob(".*.tmp"))


def a_charge(i: int) -> Charge:
    return Charge(
        DAY, "team", "batch", "task-0", 1, "node", f"c{i}", DAY, "fix",
        "Compute", "Sandbox Compute", "sandfleet", "", "cpu", Decimal(i), "core-seconds",
        None, None, "unknown", "p1",
    )  # fmt: skip


def a_summary() -> TaskSummary:
    return TaskSummary(
        DAY, "team", "batch", "task-0", 1, "node", "fix", "py", "failed", None, True, False,
        None, 10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, "",
    )  # fmt: skip


def test_event_seq_is_gap_free_across_the_three_tables(data_dir: Path) -> None:
    with LedgerWriter(data_dir) as w:
        assert w.append("events", events(3)) == range(0, 3)
        assert w.append("charges", [a_charge(1), a_charge(2)]) == range(3, 5)
        assert w.append("tasks", [a_summary()]) == range(5, 6)
        w.flush()
        assert w.append("events", events(2)) == range(6, 8)
    seqs = duckdb.sql(
        f"SELECT table_name, event_seq FROM ("
        f" SELECT 'events' AS table_name, event_seq FROM '{data_dir}/ledger/events/*/*.parquet'"
        f" UNION ALL SELECT 'charges', event_seq FROM '{data_dir}/ledger/charges/*/*.parquet'"
        f" UNION ALL SELECT 'tasks', event_seq FROM '{data_dir}/ledger/tasks/*/*.parquet'"
        f") ORDER BY event_seq"
    ).fetchall()
    assert [s for _, s in seqs] == list(range(8))
    assert [t for t, _ in seqs][3:6] == ["charges", "charges", "tasks"]


def test_flush_by_size_writes_without_being_asked(data_dir: Path) -> None:
    with LedgerWriter(data_dir, flush_rows=100, flush_interval_s=3600) as w:
        w.append("events", events(150))
        wait_for(lambda: w.rows_durable == 150, "the size-triggered flush")
        assert segments(data_dir, "events")


def test_flush_by_time_happens_in_the_background(data_dir: Path) -> None:
    with LedgerWriter(data_dir, flush_rows=10**6, flush_interval_s=0.05) as w:
        w.append("events", events(5))
        # the file appears on rename, the count just after: wait for both
        wait_for(
            lambda: len(segments(data_dir, "events")) == 1 and w.rows_durable == 5,
            "the timed flush",
        )


def test_checkpoints_are_written_also_when_idle(data_dir: Path) -> None:
    with LedgerWriter(data_dir, checkpoint_interval_s=0.05) as w:
        w.append("events", events(5))
        w.flush()
        cps = data_dir / "ledger" / "_checkpoints" / w.chain_id
        wait_for(lambda: len(list(cps.glob("*.json"))) >= 4, "idle checkpoints")
    report = verify(data_dir)
    assert report.ok, report.summary()
    assert report.chains[0].final and report.chains[0].checkpoints >= 5


def test_threads_and_a_duckdb_reader_never_fail_and_every_row_lands_once(data_dir: Path) -> None:
    writer = LedgerWriter(data_dir, flush_rows=500, flush_interval_s=0.02)
    per_thread, threads = 3_000, 4
    reads, errors = [0], []
    done = threading.Event()
    deadline = time.monotonic() + 120

    def produce(tag: str) -> None:
        for k in range(0, per_thread, 100):
            writer.append("events", events(100, tag=f"{tag}-{k}"))

    def read() -> None:
        con = duckdb.connect()
        glob = f"{data_dir}/ledger/events/*/*.parquet"
        while not done.is_set() and time.monotonic() < deadline:
            try:
                con.sql(f"SELECT count(*), sum(event_seq) FROM read_parquet('{glob}')").fetchall()
                reads[0] += 1
            except duckdb.IOException as e:
                if "No files found" not in str(e):
                    errors.append(e)
            except duckdb.Error as e:
                errors.append(e)

    reader = threading.Thread(target=read)
    reader.start()
    workers = [threading.Thread(target=produce, args=(f"w{i}",)) for i in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    writer.close()
    wait_for(lambda: reads[0] >= 3, "a few reads of the final files")
    done.set()
    reader.join()
    assert errors == []
    total, distinct, max_seq = duckdb.sql(
        f"SELECT count(*), count(DISTINCT event_seq), max(event_seq) "
        f"FROM read_parquet('{data_dir}/ledger/events/*/*.parquet')"
    ).fetchall()[0]
    assert total == distinct == per_thread * threads == max_seq + 1
    assert verify(data_dir).ok


PROCESS_WRITER = """
import json, sys
import pyarrow as pa
from accounting.writer import LedgerWriter
data_dir, tag, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
base = 1_777_680_000_000_000
with LedgerWriter(data_dir, flush_rows=400, flush_interval_s=0.02) as w:
    for k in range(0, n, 200):
        w.append("events", pa.table({
            "time": pa.array(range(base, base + 200), pa.timestamp("us", tz="UTC")),
            "team": [tag] * 200, "batch": ["b"] * 200, "task": [f"{tag}-{k}"] * 200,
            "attempt": pa.array([1] * 200, pa.int32()), "node": ["n"] * 200,
            "kind": ["command_started"] * 200,
            "payload": [json.dumps({"i": i}) for i in range(200)],
        }))
"""


def test_processes_and_a_duckdb_reader_never_fail_and_every_row_lands_once(
    data_dir: Path, tmp_path: Path
) -> None:
    load_signing_key(None)  # one key for all, created before the race
    procs = [
        subprocess.Popen([sys.executable, "-c", PROCESS_WRITER, str(data_dir), f"p{i}", "4000"])
        for i in range(3)
    ]
    con = duckdb.connect()
    glob = f"{data_dir}/ledger/events/*/*.parquet"
    reads, errors = 0, []
    deadline = time.monotonic() + 120
    try:
        while any(p.poll() is None for p in procs) or reads < 3:
            assert time.monotonic() < deadline, "writers or reads did not finish in time"
            try:
                con.sql(f"SELECT count(*), sum(attempt) FROM read_parquet('{glob}')").fetchall()
                reads += 1
            except duckdb.IOException as e:
                if "No files found" not in str(e):
                    errors.append(e)
            except duckdb.Error as e:
                errors.append(e)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    assert [p.returncode for p in procs] == [0, 0, 0]
    assert errors == []
    rows, chains, distinct = con.sql(
        f"SELECT count(*), count(DISTINCT chain_id), count(DISTINCT (chain_id, event_seq)) "
        f"FROM read_parquet('{glob}')"
    ).fetchall()[0]
    assert rows == distinct == 12_000 and chains == 3
    report = verify(data_dir)
    assert report.ok, report.summary()
    assert report.rows == 12_000 and len(report.chains) == 3


def test_each_writer_has_its_own_chain_and_a_reused_chain_id_is_refused(data_dir: Path) -> None:
    with LedgerWriter(data_dir) as a, LedgerWriter(data_dir) as b:
        assert a.chain_id != b.chain_id
        a.append("events", events(1))
        b.append("events", events(1))
        chain = a.chain_id
    with pytest.raises(LedgerError, match=r"already exists.*fix: omit chain_id"):
        LedgerWriter(data_dir, chain_id=chain)


def test_an_unsafe_chain_id_is_refused(data_dir: Path) -> None:
    with pytest.raises(LedgerError, match=r"not a safe file name"):
        LedgerWriter(data_dir, chain_id="../x")


def test_append_after_close_is_refused(data_dir: Path) -> None:
    w = LedgerWriter(data_dir)
    w.close()
    with pytest.raises(LedgerError, match=r"closed"):
        w.append("events", events(1))


class FlakyStore(LocalStore):
    """A local store whose segment writes fail while `failing` is set."""

    failing = True

    def write_atomic(self, path: str, data: bytes | memoryview, *, exclusive: bool = False) -> None:
        if self.failing and path.endswith(".parquet"):
            raise LedgerError(f"{path}: disk full (simulated)")
        super().write_atomic(path, data, exclusive=exclusive)


def test_a_failed_write_keeps_the_rows_and_the_next_flush_writes_them(data_dir: Path) -> None:
    store = FlakyStore(data_dir)
    w = LedgerWriter(data_dir, store=store, flush_interval_s=3600)
    w.append("events", events(10))
    with pytest.raises(LedgerError, match=r"disk full \(simulated\).*rows are kept"):
        w.flush()
    with pytest.raises(LedgerError, match=r"disk full"):
        w.append("events", events(1))  # the error reaches the next caller too
    store.failing = False
    w.flush()
    w.append("events", events(5))
    w.close()
    report = verify(data_dir)
    assert report.ok and report.rows == 15, report.summary()


def test_any_pyarrow_filesystem_works_through_the_store_seam(data_dir: Path) -> None:
    fs = pafs.SubTreeFileSystem(str(data_dir), pafs.LocalFileSystem())
    store = ArrowFsStore(fs, "")
    with LedgerWriter(data_dir, store=store) as w:
        w.append("events", events(20))
    report = verify(store)
    assert report.ok and report.rows == 20, report.summary()
    assert verify(data_dir).ok  # the same files, read as a plain directory


def test_a_file_uri_is_a_data_dir_too(data_dir: Path) -> None:
    with LedgerWriter(f"file://{data_dir}") as w:
        w.append("events", events(3))
    assert verify(f"file://{data_dir}").rows == 3


def test_the_signing_key_is_created_0600_outside_the_data_dir(
    tmp_path: Path, data_dir: Path
) -> None:
    key = tmp_path / "keys" / "audit.pem"
    with LedgerWriter(data_dir) as w:
        w.append("events", events(1))
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert key.with_name("audit.pem.pub").exists()
    with pytest.raises(ConfigError, match=r"inside the data directory"):
        LedgerWriter(data_dir, signing_key=data_dir / "key.pem")
