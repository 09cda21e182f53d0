"""Ledger figures: durable ingest, a cost report over many charge rows, `audit verify` time.
Not a test: prints figures against baselines measured in the same run, ends with one JSON line.

- ingest: events/s through `LedgerWriter` (validation, row hashes, Merkle tree, zstd
  Parquet, fsync, rename, signed checkpoints) vs writing the same Arrow rows straight to
  one zstd Parquet file with fsync (the floor). Target >= 500,000 events/s.
- report: `accounting.reports.cost_report_sql(["team", "model"])` over
  `accounting.views.connect(data)` on the compacted ledger vs the same SQL in raw DuckDB on
  one Parquet file holding the same rows (ratio; target <= 1.5). The uncompacted ledger is
  timed too.
- verify: `accounting.verify.verify` over the ingest ledger vs only reading its files and
  hashing them (the floor). Target: 1,000,000 rows <= 5 s.

    .venv/bin/python bench/ledger.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from accounting.compact import compact
from accounting.reports import cost_report_sql
from accounting.verify import verify
from accounting.views import connect
from accounting.writer import LedgerWriter

BASE_US = 1_780_000_000_000_000
BATCH = 100_000


def _col(prefix: str, values: pa.Array) -> pa.Array:
    return pc.binary_join_element_wise(prefix, values.cast(pa.string()), "")


def events_batch(start: int, n: int) -> pa.Table:
    """n command events with realistic payloads, built without a Python loop per row."""
    i = pa.array(range(start, start + n), pa.int64())
    payload = pc.binary_join_element_wise(
        '{"argv":["pytest","-q","tests/test_',
        pc.cast(pc.bit_wise_and(i, 255), pa.string()),
        '.py"],"pid":',
        i.cast(pa.string()),
        ',"ppid":1}',
        "",
    )
    return pa.table(
        {
            "time": pc.add(pc.multiply(i, 1000), BASE_US).cast(pa.timestamp("us", tz="UTC")),
            "team": _col("team-", pc.bit_wise_and(i, 15)),
            "batch": _col("batch-", pc.divide(i, 100_000)),
            "task": _col("task-", pc.divide(i, 200)),
            "attempt": pa.array([1] * n, pa.int32()),
            "node": _col("node-", pc.bit_wise_and(i, 3)),
            "kind": pa.array(["command_started"] * n),
            "payload": payload,
        }
    )


BUCKETS = [
    # bucket, unit, service_category, model, unit price nUSD
    ("input_uncached", "tokens", "AI and Machine Learning", "claude-sonnet-4", 3000),
    ("input_cache_read", "tokens", "AI and Machine Learning", "claude-sonnet-4", 300),
    ("output", "tokens", "AI and Machine Learning", "claude-sonnet-4", 15000),
    ("input_uncached", "tokens", "AI and Machine Learning", "gpt-4.1", 2000),
    ("output", "tokens", "AI and Machine Learning", "gpt-4.1", 8000),
    ("reasoning", "tokens", "AI and Machine Learning", "o3", 8000),
    ("cpu", "core-seconds", "Compute", "", 14),
    ("memory", "GiB-seconds", "Compute", "", 2),
    ("storage", "GiB-hours", "Storage", "", 30),
    ("egress", "bytes", "Networking", "", 0),
]


def charges_batch(start: int, n: int) -> pa.Table:
    """n charge rows over ~3 days, 20 teams, 1 % unknown cost."""
    i = pa.array(range(start, start + n), pa.int64())
    pick = pc.remainder(i, len(BUCKETS))
    col = [pa.array([b[k] for b in BUCKETS]) for k in range(5)]
    end = pc.add(pc.multiply(i, 25_000), BASE_US)
    quantity = pc.add(pc.remainder(pc.multiply(i, 7919), 5000), 1)
    unknown = pc.equal(pc.remainder(i, 100), 0)
    price = pc.take(col[4], pick)
    cost = pc.if_else(unknown, pa.scalar(None, pa.int64()), pc.multiply(quantity, price))
    return pa.table(
        {
            "time": end.cast(pa.timestamp("us", tz="UTC")),
            "team": _col("team-", pc.remainder(i, 20)),
            "batch": _col("batch-", pc.divide(i, 500_000)),
            "task": _col("task-", pc.divide(i, 40)),
            "attempt": pa.array([1] * n, pa.int32()),
            "node": _col("node-", pc.bit_wise_and(i, 3)),
            "charge_id": _col("ch-", i),
            "period_start": pc.subtract(end, 1_000_000).cast(pa.timestamp("us", tz="UTC")),
            "task_type": _col("type-", pc.remainder(i, 4)),
            "service_category": pc.take(col[2], pick),
            "service_name": pa.array(["sandfleet"] * n),
            "provider": pa.array(["bench"] * n),
            "model": pc.take(col[3], pick),
            "usage_bucket": pc.take(col[0], pick),
            "quantity": quantity.cast(pa.decimal128(38, 9)),
            "unit": pc.take(col[1], pick),
            "unit_price_nusd": pc.if_else(unknown, None, price).cast(pa.decimal128(38, 9)),
            "cost_nusd": cost,
            "cost_status": pc.if_else(unknown, "unknown", "final"),
            "price_version": pa.array(["bench-1"] * n),
        }
    )


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def ingest(folder: Path, batches: list[pa.Table], table: str) -> float:
    with LedgerWriter(folder, checkpoint_interval_s=5.0) as w:
        start = time.perf_counter()
        for b in batches:
            w.append(table, b)
        w.flush()
        elapsed = time.perf_counter() - start
    return elapsed


def raw_write(path: Path, batches: list[pa.Table]) -> float:
    start = time.perf_counter()
    with pq.ParquetWriter(path, batches[0].schema, compression="zstd") as out:
        for b in batches:
            out.write_table(b)
    with open(path, "rb+") as f:
        os.fsync(f.fileno())
    return time.perf_counter() - start


def median_ms(con: duckdb.DuckDBPyConnection, sql: str, repeat: int) -> float:
    con.execute(sql).fetchall()  # warm the page cache and the plan
    return 1000 * statistics.median(
        timed(lambda: con.execute(sql).fetchall()) for _ in range(repeat)
    )


def alternate(
    a: duckdb.DuckDBPyConnection, b: duckdb.DuckDBPyConnection, sql: str, repeat: int
) -> tuple[float, float]:
    """Median ms of `sql` on a and on b, run turn about so both see the same machine load."""
    a.execute(sql).fetchall()
    b.execute(sql).fetchall()
    ta, tb = [], []
    for _ in range(repeat):
        ta.append(timed(lambda: a.execute(sql).fetchall()))
        tb.append(timed(lambda: b.execute(sql).fetchall()))
    return 1000 * statistics.median(ta), 1000 * statistics.median(tb)


def one_file(segments: list[Path], target: Path) -> None:
    """The same rows as one Parquet file, written as the compactor writes (zstd, 128Ki groups)."""
    schema = pq.read_schema(segments[0])
    with pq.ParquetWriter(target, schema, compression="zstd") as out:
        for path in segments:
            out.write_table(pq.read_table(path), row_group_size=1 << 17)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="500k events, 1M charges")
    quick = parser.parse_args().quick
    n_events = 500_000 if quick else 1_000_000
    n_charges = 1_000_000 if quick else 10_000_000
    figures: dict[str, float] = {"events": n_events, "charge_rows": n_charges}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.environ.setdefault("SANDFLEET_AUDIT_KEY", str(root / "keys" / "audit.pem"))

        # -- ingest
        batches = [events_batch(s, min(BATCH, n_events - s)) for s in range(0, n_events, BATCH)]
        raw_s = raw_write(root / "raw-events.parquet", batches)
        ingest_s = ingest(root / "events-ledger", batches, "events")
        figures["ingest_events_per_s"] = round(n_events / ingest_s)
        figures["raw_parquet_events_per_s"] = round(n_events / raw_s)
        print(
            f"ingest {n_events:,} events: {figures['ingest_events_per_s']:,}/s through "
            f"LedgerWriter (baseline raw zstd Parquet + fsync: "
            f"{figures['raw_parquet_events_per_s']:,}/s) [target >= 500,000/s]"
        )

        # -- verify
        ledger = root / "events-ledger"
        segs = sorted(ledger.glob("ledger/events/*/*.parquet"))
        floor_s = timed(lambda: [pq.read_table(p) for p in segs if p.read_bytes()])
        verify_s = timed(lambda: verify(ledger))
        report = verify(ledger)
        assert report.ok and report.rows == n_events, report.summary()
        figures["verify_s"] = round(verify_s, 2)
        figures["verify_rows"] = report.rows
        figures["verify_read_floor_s"] = round(floor_s, 2)
        print(
            f"audit verify {report.rows:,} rows: {verify_s:.2f} s (baseline read + parse the "
            f"segments only: {floor_s:.2f} s) [target 1M rows <= 5 s]"
        )

        # -- cost report
        data = root / "charges-ledger"
        with LedgerWriter(data, checkpoint_interval_s=5.0) as w:
            start = time.perf_counter()
            for s in range(0, n_charges, 250_000):
                w.append("charges", charges_batch(s, min(250_000, n_charges - s)))
        figures["charges_ingest_per_s"] = round(n_charges / (time.perf_counter() - start))
        files = len(list(data.glob("ledger/charges/*/*.parquet")))
        sql = cost_report_sql(["team", "model"])
        repeat = 15 if quick else 7
        con = connect(data)
        figures["report_uncompacted_ms"] = round(median_ms(con, sql, repeat), 1)
        con.close()
        figures["compact_s"] = round(timed(lambda: compact(data)), 2)
        compacted = sorted(data.glob("ledger/charges/*/*.parquet"))
        single = root / "charges-one.parquet"
        one_file(compacted, single)
        con = connect(data)
        raw = duckdb.connect()
        raw.execute("SET TimeZone = 'UTC'")
        raw.execute(f"CREATE VIEW charges AS SELECT * FROM read_parquet('{single}')")
        assert raw.execute(sql).fetchall() == con.execute(sql).fetchall()  # the same answer
        ledger_ms, raw_ms = alternate(con, raw, sql, repeat)
        figures["report_ms"], figures["raw_duckdb_ms"] = round(ledger_ms, 1), round(raw_ms, 1)
        con.close()
        raw.close()
        figures["report_ratio"] = round(figures["report_ms"] / figures["raw_duckdb_ms"], 2)
        print(
            f"cost report by team,model over {n_charges:,} charge rows: "
            f"{figures['report_ms']} ms on the compacted ledger ({len(compacted)} files), "
            f"{figures['report_uncompacted_ms']} ms before compaction ({files} files); raw DuckDB "
            f"on one Parquet file: {figures['raw_duckdb_ms']} ms; ratio "
            f"{figures['report_ratio']} [target <= 1.5]"
        )
        print(
            f"(charges ingest {figures['charges_ingest_per_s']:,} rows/s; compaction "
            f"{figures['compact_s']} s incl. a full verify)"
        )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
