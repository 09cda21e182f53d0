"""The scheduler's outbox to the ledger: few large calls, each table's rows in order."""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from scheduler.fleet_outbox import LedgerOutbox


class _AppendMany:
    def __init__(self) -> None:
        self.calls: list[list[tuple[str, Any]]] = []

    def remote(self, batches: list[tuple[str, Any]]) -> str:
        # What Ray serializes at call time: a copy; later changes are not seen.
        self.calls.append([(t, list(r) if isinstance(r, list) else r) for t, r in batches])
        return f"ref{len(self.calls)}"


class _StubLedger:
    def __init__(self) -> None:
        self.append_many = _AppendMany()


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_rows_of_many_turns_go_in_one_call_with_one_batch_per_table_in_order() -> None:
    ledger, clock = _StubLedger(), _Clock()
    outbox = LedgerOutbox(ledger, every_s=1.0, clock=clock)
    outbox.send()  # nothing waits: nothing sent
    outbox.add([("events", ["e1", "e2"]), ("tasks", ["r1"])])
    outbox.send()  # the first rows go at once
    for turn in range(3):
        clock.now += 0.1
        outbox.add([("events", [f"e{turn}a", f"e{turn}b"]), ("tasks", [f"r{turn}"])])
        outbox.send()  # not due yet: gathered
    outbox.add([("events", [])])
    assert len(outbox) == 9 and len(ledger.append_many.calls) == 1
    clock.now += 1.0
    outbox.send()
    assert ledger.append_many.calls == [
        [("events", ["e1", "e2"]), ("tasks", ["r1"])],
        [("events", ["e0a", "e0b", "e1a", "e1b", "e2a", "e2b"]), ("tasks", ["r0", "r1", "r2"])],
    ]
    assert len(outbox) == 0


def test_an_arrow_table_keeps_its_place_among_its_tables_rows() -> None:
    ledger, clock = _StubLedger(), _Clock()
    outbox = LedgerOutbox(ledger, every_s=1.0, clock=clock)
    outbox.add([("tasks", ["t0"])])
    outbox.send()
    table = pa.table({"x": [1, 2]})
    outbox.add([("events", ["before"]), ("events", table), ("events", ["after"])])
    outbox.add([("tasks", ["t1"]), ("events", ["later"])])
    outbox.send()
    assert len(outbox) == 6
    clock.now += 1.0
    outbox.send()
    batches = ledger.append_many.calls[1]
    assert [r for t, r in batches if t == "events"] == [["before"], table, ["after", "later"]]
    assert [r for t, r in batches if t == "tasks"] == [["t1"]]
