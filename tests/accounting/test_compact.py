"""Compaction: fewer, larger segments; not one row changed; verify stays green."""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from accounting.audit import sign_document
from accounting.compact import compact, plan_groups
from accounting.errors import AuditError
from accounting.ledger_cli import ledger_group
from accounting.schemas import Event
from accounting.verify import verify
from accounting.writer import LedgerWriter

T0 = datetime(2026, 7, 1, 23, 59, 0, tzinfo=UTC)


@pytest.fixture(autouse=True)
def _audit_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SANDFLEET_AUDIT_KEY", str(tmp_path / "keys" / "audit.pem"))


def _events(n: int, start: int, tag: str) -> list[Event]:
    return [
        Event(
            T0 + timedelta(seconds=start + i),
            tag,
            "b",
            f"{tag}-{i % 5}",
            1,
            "n",
            "file_changed",
            {"path": f"src/{i}.py", "op": "modify", "bytes": i},
        )
        for i in range(n)
    ]


@pytest.fixture
def ledger(data_dir: Path) -> Path:
    """Two writers (two chains), many small flushes, across two day partitions."""
    with LedgerWriter(data_dir) as a, LedgerWriter(data_dir) as b:
        for k in range(8):
            a.append("events", _events(15, start=k * 10, tag="a"))
            b.append("events", _events(15, start=k * 10, tag="b"))
            a.flush()
            b.flush()
            if k == 3:
                a.checkpoint()
    return data_dir


def all_rows(data_dir: Path) -> list[tuple]:  # type: ignore[type-arg]
    return duckdb.sql(
        f"SELECT * FROM read_parquet('{data_dir}/ledger/*/*/*.parquet', hive_partitioning=false) "
        f"ORDER BY chain_id, event_seq"
    ).fetchall()


def segments(data_dir: Path) -> list[Path]:
    return sorted(data_dir.glob("ledger/*/day=*/*.parquet"))


def test_compaction_merges_small_segments_and_verify_stays_green(ledger: Path) -> None:
    before = segments(ledger)
    assert verify(ledger).ok
    result = compact(ledger)
    after = segments(ledger)
    assert len(after) == 2 < len(before)  # one per day partition
    assert result.segments_in == len(before) and result.segments_out == 2
    report = verify(ledger)
    assert report.ok, report.summary()
    assert report.rows == 240 and report.compactions == 2 and report.warnings == ()


def test_compaction_changes_no_row(ledger: Path) -> None:
    before = all_rows(ledger)
    compact(ledger)
    assert all_rows(ledger) == before
    compact(ledger)  # idempotent: nothing left to merge
    assert all_rows(ledger) == before


def test_compacting_compacted_segments_keeps_verify_green(ledger: Path) -> None:
    compact(ledger, target_rows=50)
    assert verify(ledger).ok
    with LedgerWriter(ledger) as w:
        w.append("events", _events(10, 0, "c"))
    compact(ledger)
    report = verify(ledger)
    assert report.ok, report.summary()
    assert report.compactions >= 3 and report.rows == 250


def test_compaction_refuses_a_ledger_that_does_not_verify(ledger: Path) -> None:
    target = segments(ledger)[0]
    data = bytearray(target.read_bytes())
    data[100] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(AuditError, match=r"refusing to compact a ledger that does not verify"):
        compact(ledger)


def test_a_tampered_compacted_segment_is_detected(ledger: Path) -> None:
    compact(ledger)
    target = segments(ledger)[0]
    data = bytearray(target.read_bytes())
    data[len(data) // 3] ^= 0x01
    target.write_bytes(bytes(data))
    report = verify(ledger)
    assert not report.ok and any("was modified" in e for e in report.errors)


def test_a_forged_compaction_manifest_is_detected(ledger: Path) -> None:
    compact(ledger)
    manifest = sorted(ledger.glob("ledger/_compactions/*.json"))[0]
    doc = json.loads(manifest.read_bytes())
    del doc["signature"], doc["format"]
    manifest.write_bytes(sign_document(doc, Ed25519PrivateKey.generate()))
    report = verify(ledger)
    assert not report.ok
    assert any("signature does not verify" in e for e in report.errors)


def test_leftovers_of_an_interrupted_compaction_are_tolerated_then_removed(
    ledger: Path, tmp_path: Path
) -> None:
    backup = tmp_path / "backup"
    shutil.copytree(ledger / "ledger", backup)
    before = segments(ledger)
    compact(ledger)
    leftover = before[0]
    shutil.copy(backup / leftover.relative_to(ledger / "ledger"), leftover)  # as if never deleted
    report = verify(ledger)
    assert report.ok, report.summary()
    assert any("was compacted but not yet removed" in w for w in report.warnings)
    result = compact(ledger)
    assert result.leftovers_removed == 1 and not leftover.exists()
    assert verify(ledger).warnings == ()


def test_plan_groups_merges_runs_of_small_segments_per_partition() -> None:
    refs = {
        "ledger/events/day=1/a.parquet": {"rows": 10},
        "ledger/events/day=1/b.parquet": {"rows": 10},
        "ledger/events/day=1/c.parquet": {"rows": 10},
        "ledger/events/day=1/big.parquet": {"rows": 100},
        "ledger/events/day=2/d.parquet": {"rows": 10},
    }
    assert plan_groups(refs, target_rows=25) == [
        ["ledger/events/day=1/a.parquet", "ledger/events/day=1/b.parquet"],
    ]
    assert plan_groups(refs, target_rows=100) == [
        [f"ledger/events/day=1/{n}.parquet" for n in "abc"],
    ]


def test_cli_compact_reports_what_it_did(ledger: Path) -> None:
    out = CliRunner().invoke(ledger_group, ["compact", "--data-dir", str(ledger), "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["segments_out"] == 2
