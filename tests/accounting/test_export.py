"""SIEM export: OCSF events with their class's required fields, and JSONL of every row."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from accounting.canonical import row_hash
from accounting.export import OCSF_VERSION, export
from accounting.ledger_cli import audit_group
from accounting.schemas import Charge, Event, EventKind
from accounting.writer import LedgerWriter

T0 = datetime(2026, 8, 1, 10, 0, tzinfo=UTC)

PAYLOADS: dict[EventKind, dict[str, Any]] = {
    EventKind.COMMAND_STARTED: {"argv": ["/usr/bin/python", "-m", "pytest"], "pid": 42, "ppid": 1},
    EventKind.COMMAND_FINISHED: {
        "argv": ["python"],
        "pid": 42,
        "ppid": 1,
        "exit": 1,
        "duration_ms": 9,
    },
    EventKind.FILE_CHANGED: {"path": "src/app.py", "op": "modify", "bytes": 120},
    EventKind.LLM_CALL: {
        "model": "claude-sonnet-4",
        "provider": "anthropic",
        "input_uncached": 10,
        "input_cache_read": 0,
        "input_cache_write": 0,
        "output": 5,
        "reasoning": 0,
        "cost_nusd": 105_000,
        "latency_ms": 800,
        "status": "ok",
        "stream": True,
    },
    EventKind.EGRESS_DECISION: {
        "host": "evil.example",
        "port": 443,
        "allowed": False,
        "reason": "not in allowlist",
        "bytes_up": 0,
        "bytes_down": 0,
    },
    EventKind.ANOMALY_FINDING: {
        "rule": "repeated_command",
        "severity": "high",
        "action": "alert",
        "detail": "pytest x12",
        "evidence": ["c:1", "c:2"],
    },
    EventKind.TASK_STATE: {"state": "running", "previous": "queued", "reason": ""},
}

# class_uid -> (category_uid, required objects beyond the base event)
REQUIRED = {
    1007: (1, ["actor", "device", "process"]),
    1001: (1, ["actor", "device", "file"]),
    6003: (6, ["actor", "api", "src_endpoint"]),
    4001: (4, []),
    2004: (2, ["finding_info"]),
}
BASE = ["class_uid", "category_uid", "activity_id", "type_uid", "severity_id", "time", "metadata"]


@pytest.fixture(autouse=True)
def _audit_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SANDFLEET_AUDIT_KEY", str(tmp_path / "keys" / "audit.pem"))


@pytest.fixture
def ledger(data_dir: Path) -> Path:
    events = [
        Event(T0 + timedelta(minutes=i), "team", "batch", "task-1", 1, "node-7", kind, payload)
        for i, (kind, payload) in enumerate(PAYLOADS.items())
    ]
    charge = Charge(
        T0,
        "team",
        "batch",
        "task-1",
        1,
        "node-7",
        "ch-1",
        T0 - timedelta(seconds=2),
        "fix",
        "AI and Machine Learning",
        "LLM Inference",
        "anthropic",
        "claude-sonnet-4",
        "input_cache_read",
        Decimal("12.5"),
        "tokens",
        Decimal(300),
        3750,
        "estimated",
        "p1",
    )
    with LedgerWriter(data_dir) as w:
        w.append("events", events)
        w.append("charges", [charge])
    return data_dir


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_ocsf_export_has_the_required_fields_of_each_class(ledger: Path, tmp_path: Path) -> None:
    out = tmp_path / "ocsf.jsonl"
    assert export(ledger, format="ocsf", out=out) == 6  # task_state has no OCSF class here
    events = lines(out)
    assert sorted(e["class_uid"] for e in events) == [1001, 1007, 1007, 2004, 4001, 6003]
    for e in events:
        category, objects = REQUIRED[e["class_uid"]]
        for name in BASE + objects:
            assert name in e, f"{name} missing from class {e['class_uid']}"
        assert e["category_uid"] == category
        assert e["type_uid"] == e["class_uid"] * 100 + e["activity_id"]
        assert e["metadata"]["version"] == OCSF_VERSION
        assert e["metadata"]["product"]["name"] == "sandfleet"
        assert e["device"]["type_id"] == 1 and e["device"]["hostname"] == "node-7"
        assert isinstance(e["time"], int) and e["time"] >= int(T0.timestamp() * 1000)
        assert ":" in e["metadata"]["uid"]  # chain_id:event_seq, back to the audited row
    by_class = {e["class_uid"]: e for e in events}
    assert by_class[1001]["file"]["name"] == "app.py" and by_class[1001]["file"]["type_id"] == 1
    assert by_class[1001]["activity_id"] == 3  # modify -> Update
    assert by_class[6003]["api"]["operation"]
    assert by_class[4001]["activity_id"] == 5 and by_class[4001]["dst_endpoint"]["port"] == 443
    assert by_class[2004]["finding_info"]["uid"] and by_class[2004]["severity_id"] == 4
    launch = next(e for e in events if e["class_uid"] == 1007 and e["activity_id"] == 1)
    assert launch["process"]["cmd_line"] == "/usr/bin/python -m pytest"
    assert launch["process"]["name"] == "python"


def test_jsonl_export_has_every_row_of_every_table_faithfully(ledger: Path, tmp_path: Path) -> None:
    out = tmp_path / "rows.jsonl"
    assert export(ledger, format="jsonl", out=out) == 8
    rows = lines(out)
    assert [r["table"] for r in rows].count("charges") == 1
    charge = next(r for r in rows if r["table"] == "charges")
    assert charge["quantity"] == "12.500000000" and charge["cost_nusd"] == 3750
    # the row hash can be recomputed from the export alone
    row = dict(charge)
    table = row.pop("table")
    stored = bytes.fromhex(row.pop("row_hash"))
    for k in ("time", "period_start"):
        row[k] = datetime.fromisoformat(row[k].replace("Z", "+00:00"))
    for k in ("quantity", "unit_price_nusd"):
        row[k] = Decimal(row[k])
    assert row_hash(table, row) == stored


def test_since_leaves_out_older_rows(ledger: Path, tmp_path: Path) -> None:
    out = tmp_path / "recent.jsonl"
    export(ledger, format="ocsf", since=(T0 + timedelta(minutes=4)).isoformat(), out=out)
    assert {e["class_uid"] for e in lines(out)} == {4001, 2004}


def test_cli_export_writes_the_file(ledger: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli.jsonl"
    args = ["export", "--data-dir", str(ledger), "--format", "ocsf", "--out", str(out)]
    result = CliRunner().invoke(audit_group, args)
    assert result.exit_code == 0, result.output
    assert "wrote 6 ocsf line(s)" in result.output and len(lines(out)) == 6
