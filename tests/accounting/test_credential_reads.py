"""A credential file read (a `file_changed` row with op `read` / `open`, from
sandbox.sensitive_watch) is a sensitive_files finding in SQL and on the stream, and an
OCSF File System Activity Read / Open."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

from accounting.anomalies import run_anomalies
from accounting.export import ocsf_event
from accounting.policies import load_policies
from accounting.writer import LedgerWriter
from scheduler.event_builder import AttemptEvents
from scheduler.stream_checks import SensitiveFiles

T0 = datetime(2026, 5, 1, 12, tzinfo=UTC)
POLICIES = load_policies().anomalies


def test_the_sql_rule_finds_a_seeded_read_and_not_a_harmless_one(data_dir: Path) -> None:
    reader = AttemptEvents("ml", "b1", "reader", t0=T0)
    calm = AttemptEvents("ml", "b1", "calm", t0=T0)
    events = [
        reader.state(0, "running"),
        reader.file(5, "/tmp/.config/gh/hosts.yml", "read", 120),
        reader.file(6, "/tmp/.config/gh/hosts.yml", "read", 120),
        calm.state(0, "running"),
        calm.file(5, "/workspace/README.md", "read", 10),  # not a credential path
        calm.file(6, "/tmp/.aws/", "create", 0),  # the directory is not the file
    ]
    with LedgerWriter(data_dir, node="n") as writer:
        writer.append("events", events)
    found, _ = run_anomalies(str(data_dir), POLICIES, rules=["sensitive_files"], record=False)
    (f,) = found
    assert (f.task, f.rule, f.action, f.severity) == (
        "reader",
        "sensitive_files",
        "stop",
        "critical",
    )
    assert f.detail == "credential access: /tmp/.config/gh/hosts.yml (file read)"
    assert f.evidence["events"] == 2


def test_the_streaming_rule_fires_on_a_read_or_an_open() -> None:
    rule = SensitiveFiles(POLICIES.sensitive_files)
    for op in ("read", "open"):
        (hit,) = rule.file(T0, {"path": "/tmp/.ssh/id_ed25519", "op": op, "bytes": 400})
        assert hit.subject == "credential_access:/tmp/.ssh/id_ed25519"
        assert hit.evidence["how"] == [f"file {op}"]
    assert rule.file(T0, {"path": "/workspace/notes.txt", "op": "read", "bytes": 1}) == []


def test_ocsf_maps_a_read_to_read_and_an_open_to_open() -> None:
    a = AttemptEvents("ml", "b1", "t1", t0=T0)
    for op, (activity_id, name) in {"read": (2, "Read"), "open": (14, "Open")}.items():
        e = a.file(1, "/tmp/.aws/credentials", op, 135)
        row = {"time_us": int(e.time.timestamp() * 1e6), "team": e.team, "batch": e.batch,
               "task": e.task, "attempt": e.attempt, "node": e.node, "kind": e.kind.value,
               "payload": json.dumps(e.payload), "chain_id": "c", "event_seq": 1,
               "row_hash": "00"}  # fmt: skip
        out = ocsf_event(row)
        assert out is not None
        assert (out["class_uid"], out["activity_id"], out["activity_name"]) == (
            1001, activity_id, name,
        )  # fmt: skip
        assert out["type_uid"] == 100100 + activity_id
        assert out["file"]["path"] == "/tmp/.aws/credentials" and out["file"]["size"] == 135
