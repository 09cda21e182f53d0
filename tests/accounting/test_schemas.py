"""Schemas, validation, the canonical row encoding and the Merkle tree."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import random
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pyarrow as pa
import pytest

from accounting.canonical import canonical_row, row_hash, row_hashes
from accounting.errors import SchemaError
from accounting.merkle import EMPTY_ROOT, MerkleTree, leaf_hash, merkle_root, node_hash
from accounting.schemas import (
    DATA_SCHEMAS,
    SCHEMAS,
    Charge,
    Event,
    EventKind,
    TaskState,
    TaskSummary,
)
from accounting.validation import to_table
from accounting.writer import LedgerWriter

NOW = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)


@pytest.fixture(autouse=True)
def _audit_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SANDFLEET_AUDIT_KEY", str(tmp_path / "keys" / "audit.pem"))


def event(**over: object) -> Event:
    base = dict(
        time=NOW,
        team="t",
        batch="b",
        task="k",
        attempt=1,
        node="n",
        kind=EventKind.COMMAND_STARTED,
        payload={"argv": ["ls"], "pid": 1, "ppid": 0},
    )
    return Event(**{**base, **over})  # type: ignore[arg-type]


def charge(**over: object) -> Charge:
    base = dict(
        time=NOW,
        team="t",
        batch="b",
        task="k",
        attempt=1,
        node="n",
        charge_id="c-1",
        period_start=NOW - timedelta(seconds=3),
        task_type="fix",
        service_category="AI and Machine Learning",
        service_name="LLM Inference",
        provider="anthropic",
        model="claude-sonnet-4",
        usage_bucket="output",
        quantity=Decimal(1200),
        unit="tokens",
        unit_price_nusd=Decimal(15000),
        cost_nusd=18_000_000,
        cost_status="final",
        price_version="p1",
    )
    return Charge(**{**base, **over})  # type: ignore[arg-type]


def summary(**over: object) -> TaskSummary:
    base = dict(
        time=NOW,
        team="t",
        batch="b",
        task="k",
        attempt=1,
        node="n",
        task_type="fix",
        template="py",
        outcome=TaskState.SUCCEEDED,
        exit_code=0,
        oom=False,
        timed_out=False,
        started=NOW - timedelta(minutes=3),
        duration_ms=180_000,
        cost_compute_nusd=1,
        cost_llm_nusd=2,
        cost_storage_nusd=3,
        cost_network_nusd=4,
        cost_total_nusd=10,
        tokens_input=100,
        tokens_output=50,
        llm_calls=3,
        files_changed=2,
        lines_added=10,
        lines_deleted=1,
        diff_sha256="ab" * 32,
    )
    return TaskSummary(**{**base, **over})  # type: ignore[arg-type]


def test_records_become_tables_with_the_contract_schema() -> None:
    for table, record in (("events", event()), ("charges", charge()), ("tasks", summary())):
        t = to_table(table, [record])
        assert t.schema == DATA_SCHEMAS[table]
        assert SCHEMAS[table].names[-3:] == ["chain_id", "event_seq", "row_hash"]
        assert SCHEMAS[table].names[:6] == ["time", "team", "batch", "task", "attempt", "node"]


def test_payload_is_stored_as_canonical_json() -> None:
    t = to_table("events", [event(payload={"b": 1, "a": [1, "x"]})])
    assert t["payload"][0].as_py() == '{"a":[1,"x"],"b":1}'


def test_task_state_has_every_state_the_scheduler_uses() -> None:
    assert {s.value for s in TaskState} == {
        "queued", "running", "succeeded", "failed", "oom", "timed_out", "cancelled",
        "budget_exceeded", "stopped_by_rule", "awaiting_review", "rejected",
    }  # fmt: skip


def test_a_float_cost_is_refused_naming_the_field_and_the_fix() -> None:
    with pytest.raises(SchemaError, match=r"cost_nusd: is a float .*integer nano-USD.*fix:"):
        to_table("charges", [charge(cost_nusd=0.018)])


def test_a_float_quantity_is_refused() -> None:
    with pytest.raises(SchemaError, match=r"quantity: is a float.*Decimal"):
        to_table("charges", [charge(quantity=1.5)])


def test_a_row_missing_a_field_is_refused_naming_it() -> None:
    row = {f.name: getattr(event(), f.name) for f in dataclasses.fields(Event)}
    del row["node"]
    with pytest.raises(SchemaError, match=r"row 0: node: is missing \(fix: add it\)"):
        to_table("events", [row])


def test_a_null_in_a_required_field_is_refused() -> None:
    with pytest.raises(SchemaError, match=r"team: is missing \(null\)"):
        to_table("events", [event(team=None)])


def test_an_unknown_usage_bucket_is_refused_listing_the_allowed_ones() -> None:
    with pytest.raises(
        SchemaError, match=r"usage_bucket: unknown value \(got 'cached'\).*input_uncached"
    ):
        to_table("charges", [charge(usage_bucket="cached")])


def test_an_unknown_cost_status_is_refused() -> None:
    with pytest.raises(SchemaError, match=r"cost_status: unknown value \(got 'partial'\)"):
        to_table("charges", [charge(cost_status="partial")])


def test_unknown_cost_status_with_a_cost_is_refused() -> None:
    with pytest.raises(SchemaError, match=r"cost_nusd: is set but cost_status is unknown.*fix:"):
        to_table("charges", [charge(cost_status="unknown", cost_nusd=0)])


def test_final_or_estimated_cost_status_without_a_cost_is_refused() -> None:
    for status in ("final", "estimated"):
        with pytest.raises(SchemaError, match=r"cost_nusd: is null but cost_status is final"):
            to_table("charges", [charge(cost_status=status, cost_nusd=None)])


def test_an_unknown_cost_is_accepted_as_null_never_zero() -> None:
    t = to_table("charges", [charge(cost_status="unknown", cost_nusd=None, unit_price_nusd=None)])
    assert t["cost_nusd"][0].as_py() is None


def test_a_unit_that_does_not_match_its_bucket_is_refused() -> None:
    with pytest.raises(SchemaError, match=r"unit: does not match its usage_bucket \(got 'bytes'\)"):
        to_table("charges", [charge(unit="bytes")])


def test_an_unknown_event_kind_or_outcome_is_refused() -> None:
    with pytest.raises(SchemaError, match=r"kind: unknown value \(got 'shell'\)"):
        to_table("events", [event(kind="shell")])
    with pytest.raises(SchemaError, match=r"outcome: unknown value \(got 'ok'\)"):
        to_table("tasks", [summary(outcome="ok")])


def test_a_naive_datetime_is_refused() -> None:
    with pytest.raises(SchemaError, match=r"time: is a naive datetime"):
        to_table("events", [event(time=datetime(2026, 1, 1))])


def test_audit_columns_are_refused_from_callers() -> None:
    row = {f.name: getattr(event(), f.name) for f in dataclasses.fields(Event)}
    row["event_seq"] = 3
    with pytest.raises(SchemaError, match=r"event_seq: is assigned by the writer"):
        to_table("events", [row])


def test_an_arrow_table_with_a_float_cost_column_is_refused() -> None:
    good = to_table("charges", [charge()])
    bad = good.set_column(
        good.schema.get_field_index("cost_nusd"), "cost_nusd", pa.array([0.5], pa.float64())
    )
    with pytest.raises(
        SchemaError, match=r"column cost_nusd: is double \(money is integer nano-USD\)"
    ):
        to_table("charges", bad)


def test_a_record_of_another_table_is_refused() -> None:
    with pytest.raises(SchemaError, match=r"is a Charge, not a Event"):
        to_table("events", [charge()])


def test_one_bad_row_refuses_the_whole_batch_and_nothing_is_written(data_dir: Path) -> None:
    with LedgerWriter(data_dir) as w:
        with pytest.raises(SchemaError, match=r"batch refused, nothing written:\nrow 2: cost_nusd"):
            w.append("charges", [charge(), charge(charge_id="c-2"), charge(cost_nusd=1.0)])
        assert w.next_seq == 0
    assert not list(data_dir.rglob("*.parquet"))


# -- canonical encoding


def _reference(table: str, t: pa.Table) -> list[bytes]:
    return [row_hash(table, row) for row in t.to_pylist()]


def _with_audit(table: str, t: pa.Table, chain: str = "c0") -> pa.Table:
    n = t.num_rows
    t = t.append_column("chain_id", pa.array([chain] * n))
    return t.append_column("event_seq", pa.array(range(n), pa.int64()))


def test_the_vectorised_row_hash_equals_the_reference_encoder() -> None:
    rng = random.Random(3)
    events = [
        event(team=rng.choice(["", "é", "t\x1fx"]), attempt=rng.randint(0, 9), payload={"i": i})
        for i in range(50)
    ]
    charges = [
        charge(
            quantity=Decimal(rng.randint(0, 10**12)) / 1000,
            unit_price_nusd=rng.choice([None, Decimal("0.000000001"), Decimal(-3)]),
            cost_nusd=rng.choice([None, -5, 2**40]),
            cost_status="estimated",
        )
        for _ in range(50)
    ]
    charges = [
        c if c.cost_nusd is not None else dataclasses.replace(c, cost_status="unknown")
        for c in charges
    ]
    tasks = [
        summary(exit_code=rng.choice([None, -9, 0]), started=rng.choice([None, NOW]), oom=True)
        for _ in range(50)
    ]
    for table, rows in (("events", events), ("charges", charges), ("tasks", tasks)):
        t = _with_audit(table, to_table(table, rows))
        fast = row_hashes(table, t)
        assert [bytes(h.as_py()) for h in fast] == _reference(table, t)


def test_the_encoding_is_unambiguous_between_adjacent_fields() -> None:
    a = _with_audit("events", to_table("events", [event(team="ab", batch="c")]))
    b = _with_audit("events", to_table("events", [event(team="a", batch="bc")]))
    assert row_hashes("events", a)[0] != row_hashes("events", b)[0]


def test_the_encoding_binds_the_chain_and_the_sequence() -> None:
    t = to_table("events", [event()])
    row = {**t.to_pylist()[0], "chain_id": "c", "event_seq": 1}
    assert canonical_row("events", row).startswith(b"\x00sandfleet.ledger.v1/events\xff")
    assert row_hash("events", row) != row_hash("events", {**row, "event_seq": 2})
    assert row_hash("events", row) != row_hash("events", {**row, "chain_id": "d"})


def test_integers_and_decimals_are_encoded_as_base_ten_integers() -> None:
    t = _with_audit("charges", to_table("charges", [charge(quantity=Decimal("1.5"))]))
    encoded = canonical_row("charges", t.to_pylist()[0])
    assert b"\xff1500000000\xff" in encoded  # 1.5 at scale 9
    assert b"\xfftokens\xff" in encoded


# -- Merkle tree


def test_the_merkle_tree_follows_rfc_6962() -> None:
    assert EMPTY_ROOT.hex() == hashlib.sha256(b"").hexdigest()
    leaves = [leaf_hash(bytes([i])) for i in range(3)]
    expected = node_hash(node_hash(leaves[0], leaves[1]), leaves[2])
    assert merkle_root(leaves) == expected
    tree = MerkleTree()
    tree.extend(leaves)
    assert tree.root() == expected


def test_incremental_roots_equal_the_recursive_reference_at_every_size() -> None:
    rng = random.Random(5)
    leaves = [os.urandom(32) for _ in range(300)]
    by_list, by_blob = MerkleTree(), MerkleTree()
    i = 0
    while i < len(leaves):
        k = rng.randint(1, 40)
        by_list.extend(leaves[i : i + k])
        by_blob.extend_blob(b"".join(leaves[i : i + k]))
        i = min(i + k, len(leaves))
        assert by_list.root() == by_blob.root() == merkle_root(leaves[:i])
        assert by_blob.size == i
