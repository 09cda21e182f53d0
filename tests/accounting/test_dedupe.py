"""A retried charge is recorded once: by the writer that saw it, and by a new writer
(another chain, another process) that finds it already in the ledger."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from accounting.schemas import Charge
from accounting.verify import verify
from accounting.views import connect
from accounting.writer import LedgerWriter

NOW = datetime.now(UTC).replace(microsecond=0)


@pytest.fixture(autouse=True)
def _audit_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SANDFLEET_AUDIT_KEY", str(tmp_path / "keys" / "audit.pem"))


def charge(cid: str, batch: str = "b1", nusd: int = 100, at: datetime = NOW) -> Charge:
    return Charge(
        at, "team", batch, "task-0", 1, "node", cid, at, "fix",
        "Compute", "Sandbox Compute", "sandfleet", "", "cpu", Decimal(1), "core-seconds",
        Decimal(nusd), nusd, "final", "p1",
    )  # fmt: skip


def rows(data_dir: Path) -> list[tuple[str, str, int]]:
    con = connect(data_dir)
    return con.execute("SELECT batch, charge_id, cost_nusd FROM charges ORDER BY 1, 2").fetchall()


def test_the_same_charges_appended_twice_are_recorded_once(data_dir: Path) -> None:
    with LedgerWriter(data_dir) as w:
        assert len(w.append("charges", [charge("a"), charge("b")])) == 2
        w.flush()
        assert len(w.append("charges", [charge("b"), charge("c")])) == 1  # b: a retry
        assert len(w.append("charges", [charge("c")])) == 0  # still buffered, still known
        assert w.duplicate_charges == 2
    assert rows(data_dir) == [("b1", "a", 100), ("b1", "b", 100), ("b1", "c", 100)]
    assert verify(data_dir).ok


def test_a_repeat_within_one_append_keeps_the_first_row(data_dir: Path) -> None:
    with LedgerWriter(data_dir) as w:
        assert w.append("charges", [charge("a", nusd=1), charge("a", nusd=2)]) == range(0, 1)
    assert rows(data_dir) == [("b1", "a", 1)]


def test_a_new_writer_finds_the_ids_already_in_the_ledger(data_dir: Path) -> None:
    with LedgerWriter(data_dir) as first:
        first.append("charges", [charge("a"), charge("b"), charge("x", batch="b2")])
    with LedgerWriter(data_dir) as second:  # a restarted ledger actor: a new chain
        assert len(second.append("charges", [charge("a"), charge("z")])) == 1
        assert len(second.append("charges", [charge("x", batch="b2")])) == 0
    assert rows(data_dir) == [("b1", "a", 100), ("b1", "b", 100), ("b1", "z", 100),
                              ("b2", "x", 100)]  # fmt: skip
    assert verify(data_dir).ok


def test_ids_older_than_the_window_are_forgotten_and_memory_is_capped(data_dir: Path) -> None:
    with LedgerWriter(data_dir) as w:
        w._charge_ids.window_us = 3600 * 1_000_000
        w.append("charges", [charge("old", at=NOW - timedelta(hours=2))])
        w.append("charges", [charge("new")])  # the newest row moves the window past "old"
        assert len(w.append("charges", [charge("old", at=NOW - timedelta(hours=2))])) == 1
        assert len(w.append("charges", [charge("new")])) == 0
        w._charge_ids.max_ids = 2
        w.append("charges", [charge("x"), charge("y")])
        assert len(w._charge_ids._ids) == 2
    warnings = verify(data_dir).warnings  # "old" twice: beyond the window, verify says so
    assert any("recorded more than once (old x2)" in w for w in warnings), warnings


def test_a_new_writer_reads_only_the_window_from_the_ledger(data_dir: Path) -> None:
    with LedgerWriter(data_dir) as first:
        first.append("charges", [charge("a"), charge("week", at=NOW - timedelta(days=7))])
    with LedgerWriter(data_dir) as second:
        second.append("charges", [charge("z")])
        assert set(second._charge_ids._ids) == {"a", "z"}


def test_events_and_tasks_are_never_deduplicated(data_dir: Path) -> None:
    from accounting.schemas import Event, EventKind

    e = Event(NOW, "team", "b1", "task-0", 1, "node", EventKind.TASK_STATE, {"state": "queued"})
    with LedgerWriter(data_dir) as w:
        assert len(w.append("events", [e, dataclasses.replace(e)])) == 2


def test_verify_warns_about_a_charge_id_recorded_twice(data_dir: Path) -> None:
    # two writers racing: both seeded before either wrote, so neither saw the other's row
    first, second = LedgerWriter(data_dir), LedgerWriter(data_dir)
    first.append("charges", [charge("a")])
    second.append("charges", [charge("a"), charge("b")])
    first.close()
    second.close()
    report = verify(data_dir)
    assert report.ok
    assert any("1 charge_id(s) recorded more than once (a x2)" in w for w in report.warnings)


def test_the_writer_says_which_rows_it_kept(data_dir: Path) -> None:
    with LedgerWriter(data_dir) as w:
        w.append("charges", [charge("a")])
        kept: list[bool] = []
        assert len(w.append("charges", [charge("a"), charge("b"), charge("b")], kept=kept)) == 1
        assert kept == [False, True, False]
        w.append("events", [], kept=kept)
        assert kept == []
