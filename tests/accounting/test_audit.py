"""The audit chain: an intact ledger verifies; every kind of tampering is named."""

from __future__ import annotations

import json
import shutil
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from accounting.audit import open_document, public_pem, sign_document
from accounting.canonical import row_hashes
from accounting.ledger_cli import audit_group
from accounting.schemas import SCHEMAS, Charge, Event
from accounting.verify import VerifyReport, trusted_key, verify
from accounting.writer import LedgerWriter

T0 = datetime(2026, 6, 1, 9, 0, tzinfo=UTC)


@pytest.fixture(autouse=True)
def _audit_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SANDFLEET_AUDIT_KEY", str(tmp_path / "keys" / "audit.pem"))


def _events(n: int, start: int) -> list[Event]:
    return [
        Event(
            T0 + timedelta(seconds=start + i),
            "team-a",
            "batch-1",
            f"task-{i % 3}",
            1,
            "node-1",
            "command_finished",
            {"argv": ["pytest", "-q"], "pid": 100 + i, "ppid": 1, "exit": 0},
        )
        for i in range(n)
    ]


def _charges(n: int, start: int) -> list[Charge]:
    return [
        Charge(
            T0 + timedelta(seconds=start + i + 1),
            "team-a",
            "batch-1",
            "task-0",
            1,
            "node-1",
            f"ch-{start}-{i}",
            T0 + timedelta(seconds=start + i),
            "fix",
            "AI and Machine Learning",
            "LLM Inference",
            "anthropic",
            "claude-sonnet-4",
            "output",
            Decimal(100 + i),
            "tokens",
            Decimal(15000),
            (100 + i) * 15000,
            "final",
            "p1",
        )
        for i in range(n)
    ]


@pytest.fixture
def ledger(data_dir: Path) -> Path:
    """Six flushes of events and charges, a checkpoint after every second, closed (final)."""
    with LedgerWriter(data_dir, node="node-1", flush_interval_s=3600) as w:
        for k in range(6):
            w.append("events", _events(40, start=k * 100))
            w.append("charges", _charges(10, start=k * 100))
            w.flush()
            if k % 2:
                w.checkpoint()
    return data_dir


def segments(data_dir: Path, table: str = "*") -> list[Path]:
    return sorted(data_dir.glob(f"ledger/{table}/day=*/*.parquet"))


def checkpoints(data_dir: Path) -> list[Path]:
    return sorted(data_dir.glob("ledger/_checkpoints/*/*.json"))


def failed(report: VerifyReport, *fragments: str) -> None:
    """The report is not ok and some error mentions every fragment."""
    assert not report.ok, report.summary()
    text = "\n".join(report.errors)
    for fragment in fragments:
        assert fragment in text, f"{fragment!r} not in:\n{report.summary()}"


def rewrite(path: Path, table: str, edit) -> None:  # type: ignore[no-untyped-def]
    rows = pq.read_table(path).to_pylist()
    edit(rows)
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMAS[table]), path, compression="zstd")


def rehash(table: str, rows: list[dict]) -> None:  # type: ignore[type-arg]
    t = pa.Table.from_pylist(rows, schema=SCHEMAS[table])
    for row, h in zip(rows, row_hashes(table, t).to_pylist(), strict=True):
        row["row_hash"] = h


def test_an_intact_ledger_verifies_with_a_summary(ledger: Path) -> None:
    report = verify(ledger)
    assert report.ok, report.summary()
    assert report.rows == 300 and report.segments == 12 and report.checkpoints == 5
    assert report.warnings == () and report.uncovered_rows == 0
    assert report.chains[0].final
    assert report.summary().startswith("ledger intact\n  chains 1, rows 300, segments 12")


def test_a_flipped_byte_in_a_segment_is_detected(ledger: Path) -> None:
    target = segments(ledger, "events")[2]
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    failed(verify(ledger), f"segment {target.relative_to(ledger).as_posix()} was modified")


def test_an_edited_row_is_detected_by_its_row_hash(ledger: Path) -> None:
    target = segments(ledger, "charges")[1]

    def edit(rows: list[dict]) -> None:  # type: ignore[type-arg]
        rows[3]["cost_nusd"] = 1

    rewrite(target, "charges", edit)
    failed(verify(ledger), "was modified", "row 3", "row_hash does not match the row (edited)")


def test_an_edited_row_with_its_row_hash_recomputed_is_detected(ledger: Path) -> None:
    target = segments(ledger, "charges")[1]

    def edit(rows: list[dict]) -> None:  # type: ignore[type-arg]
        rows[3]["cost_nusd"] = 1
        rehash("charges", rows)

    rewrite(target, "charges", edit)
    report = verify(ledger)
    failed(report, "was modified", "do not give the Merkle root signed in checkpoint")
    assert "row_hash does not match" not in "\n".join(report.errors)


def test_a_deleted_segment_is_detected(ledger: Path) -> None:
    target = segments(ledger, "events")[1]
    target.unlink()
    failed(
        verify(ledger),
        f"segment {target.relative_to(ledger).as_posix()} is missing (deleted?)",
        "row(s) missing from event_seq",
    )


def test_swapped_segments_are_detected(ledger: Path) -> None:
    a, b = segments(ledger, "events")[0], segments(ledger, "events")[3]
    data_a, data_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(data_b)
    b.write_bytes(data_a)
    rel_a, rel_b = a.relative_to(ledger).as_posix(), b.relative_to(ledger).as_posix()
    failed(verify(ledger), f"segment {rel_a} holds the content of segment {rel_b}")


def test_an_injected_copy_of_a_segment_is_detected(ledger: Path) -> None:
    source = segments(ledger, "events")[2]
    shutil.copy(source, source.with_name("injected.parquet"))
    failed(verify(ledger), "injected.parquet is not in the audit chain", "injected or duplicated")


def test_an_injected_segment_of_an_unknown_chain_is_detected(ledger: Path) -> None:
    source = segments(ledger, "events")[2]

    def forge(rows: list[dict]) -> None:  # type: ignore[type-arg]
        for row in rows:
            row["chain_id"] = "forged"
        rehash("events", rows)

    fake = source.with_name("forged-0.parquet")
    shutil.copy(source, fake)
    rewrite(fake, "events", forge)
    failed(verify(ledger), "chain forged has no signed checkpoint (injected?)")


def test_two_rows_swapped_in_order_are_detected(ledger: Path) -> None:
    target = segments(ledger, "events")[4]

    def swap_seqs(rows: list[dict]) -> None:  # type: ignore[type-arg]
        rows[5]["event_seq"], rows[6]["event_seq"] = rows[6]["event_seq"], rows[5]["event_seq"]
        rehash("events", rows)  # even with valid row hashes, the order is signed

    rewrite(target, "events", swap_seqs)
    failed(verify(ledger), "do not give the Merkle root signed", "(rows edited, reordered")


def test_two_rows_swapped_in_a_file_are_detected(ledger: Path) -> None:
    target = segments(ledger, "events")[4]

    def swap_rows(rows: list[dict]) -> None:  # type: ignore[type-arg]
        rows[5], rows[6] = rows[6], rows[5]

    rewrite(target, "events", swap_rows)
    failed(verify(ledger), "was modified")


def test_a_deleted_checkpoint_is_detected(ledger: Path) -> None:
    cps = checkpoints(ledger)
    cps[2].unlink()
    failed(verify(ledger), "checkpoint 2 is missing (deleted?)")


def test_a_checkpoint_signed_with_another_key_is_detected(ledger: Path) -> None:
    target = checkpoints(ledger)[2]
    doc = json.loads(target.read_bytes())
    del doc["signature"], doc["format"]
    doc["size"] += 0  # same content, another signer
    target.write_bytes(sign_document(doc, Ed25519PrivateKey.generate()))
    failed(
        verify(ledger), "checkpoint 2 of chain", "signature does not verify with the trusted key"
    )


def test_the_whole_ledger_fails_against_another_trusted_key(ledger: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.pub"
    other.write_bytes(public_pem(Ed25519PrivateKey.generate().public_key()))
    report = verify(ledger, public_key=other)
    failed(report, "signature does not verify")
    assert len([e for e in report.errors if "signature" in e]) == 5


def test_a_stale_checkpoint_warns_but_passes(data_dir: Path) -> None:
    w = LedgerWriter(data_dir, checkpoint_interval_s=3600)
    try:
        w.append("events", _events(5, 0))
        w.checkpoint()
        later = w.checkpoint()
        assert later is not None
        fresh = verify(data_dir, now_us=later.time_us + 1_000_000)
        assert fresh.ok and fresh.warnings == ()
        stale = verify(data_dir, stale_after_s=600, now_us=later.time_us + 3_600_000_000)
        assert stale.ok
        assert any("is 3600 s old and not final" in w for w in stale.warnings)
    finally:
        w.close()


def test_rows_after_the_newest_checkpoint_are_reported_as_not_yet_covered(data_dir: Path) -> None:
    w = LedgerWriter(data_dir, checkpoint_interval_s=3600)
    try:
        w.append("events", _events(5, 0))
        w.checkpoint()
        w.append("events", _events(7, 100))
        w.flush()
        report = verify(data_dir)
        assert report.ok, report.summary()
        assert report.rows == 12 and report.uncovered_rows == 7
        assert any("7 row(s) are not yet covered" in w for w in report.warnings)
    finally:
        w.close()
    assert verify(data_dir).uncovered_rows == 0


def test_a_truncated_tail_shows_as_a_stale_unfinished_chain(ledger: Path) -> None:
    newest = checkpoints(ledger)[-1]
    doc = open_document(newest.read_bytes(), trusted_key(None), what="newest")
    for seg in doc["segments"]:
        (ledger / seg["path"]).unlink()
    newest.unlink()
    an_hour_later = time.time_ns() // 1000 + 3_600_000_000
    report = verify(ledger, stale_after_s=600, now_us=an_hour_later)
    assert report.ok  # a consistent prefix: only the staleness rule can tell
    assert any("not final" in w for w in report.warnings)


def test_cli_verify_exits_zero_when_intact_and_nonzero_naming_the_problem(ledger: Path) -> None:
    runner = CliRunner()
    ok = runner.invoke(audit_group, ["verify", "--data-dir", str(ledger)])
    assert ok.exit_code == 0, ok.output
    assert "ledger intact" in ok.output
    as_json = runner.invoke(audit_group, ["verify", "--data-dir", str(ledger), "--json"])
    assert json.loads(as_json.output)["ok"] is True
    target = segments(ledger, "events")[0]
    target.unlink()
    bad = runner.invoke(audit_group, ["verify", "--data-dir", str(ledger)])
    assert bad.exit_code == 1
    assert f"{target.relative_to(ledger).as_posix()} is missing" in bad.output


def test_cli_verify_uses_a_given_public_key(ledger: Path, tmp_path: Path) -> None:
    pub = tmp_path / "keys" / "audit.pem.pub"
    ok = CliRunner().invoke(
        audit_group, ["verify", "--data-dir", str(ledger), "--public-key", str(pub)]
    )
    assert ok.exit_code == 0, ok.output
