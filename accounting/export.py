"""`export(data_dir, format, since, out)`: the ledger for a SIEM (OCSF) or any tool (JSONL).

- `ocsf`: one OCSF 1.8 event per line, from the `events` table:

  | ledger kind                        | OCSF class                | activity               |
  |------------------------------------|---------------------------|------------------------|
  | command_started / command_finished | 1007 Process Activity     | 1 Launch / 2 Terminate |
  | file_changed                       | 1001 File System Activity | 1 Create, 2 Read,      |
  |                                    |                           | 3 Update, 4 Delete,    |
  |                                    |                           | 5 Rename, 14 Open      |
  | llm_call                           | 6003 API Activity         | 1 Create               |
  | egress_decision                    | 4001 Network Activity     | 1 Open / 5 Refuse      |
  | anomaly_finding                    | 2004 Detection Finding    | 1 Create               |

  Every event has the base fields (class_uid, category_uid, activity_id, type_uid =
  class_uid * 100 + activity_id, severity_id, time in ms, metadata.product and
  metadata.version) and its class's required objects (actor, device, process, file,
  api, src_endpoint, finding_info). The ledger's own columns ride in `unmapped`, and
  `metadata.uid` is `<chain_id>:<event_seq>` so an event leads back to its audited row.
  Other kinds have no OCSF class here and are left out (they are in the JSONL export).
- `jsonl`: every row of every table, faithfully: `{"table": ..., <column>: <value>}`,
  timestamps as ISO 8601 UTC, decimals as strings, `row_hash` as hex.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from decimal import Decimal
from importlib import metadata
from pathlib import Path
from typing import Any, Final, TextIO

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from accounting.errors import ConfigError
from accounting.schemas import TABLES
from accounting.store import LedgerStore, open_store

__all__ = ["OCSF_VERSION", "export", "ocsf_event"]

OCSF_VERSION: Final = "1.8.0"
_SEVERITY: Final = {"info": 1, "informational": 1, "low": 2, "medium": 3, "high": 4, "critical": 5}
_FILE_ACTIVITY: Final = {
    "create": (1, "Create"),
    "modify": (3, "Update"),
    "delete": (4, "Delete"),
    "rename": (5, "Rename"),
    "read": (2, "Read"),  # a credential file read (sandbox.sensitive_watch)
    "open": (14, "Open"),  # ... opened, nothing read
}


def _product() -> dict[str, str]:
    try:
        version = metadata.version("sandfleet")
    except metadata.PackageNotFoundError:
        version = "0"
    return {"name": "sandfleet", "vendor_name": "sandfleet", "version": version}


def _base(
    row: dict[str, Any], class_uid: int, activity_id: int, activity: str, severity_id: int = 1
) -> dict[str, Any]:
    category_uid = class_uid // 1000
    return {
        "class_uid": class_uid,
        "category_uid": category_uid,
        "activity_id": activity_id,
        "activity_name": activity,
        "type_uid": class_uid * 100 + activity_id,
        "severity_id": severity_id,
        "time": row["time_us"] // 1000,
        "metadata": {
            "version": OCSF_VERSION,
            "product": _product(),
            "uid": f"{row['chain_id']}:{row['event_seq']}",
            "correlation_uid": row["task"] or None,
            "log_name": "sandfleet.events",
            "sequence": row["event_seq"],
        },
        "actor": {
            "app_name": "sandfleet",
            "app_uid": row["task"] or None,
            "user": {"name": row["team"] or "unknown", "uid": row["team"] or "unknown"},
        },
        "device": {"type_id": 1, "type": "Server", "hostname": row["node"] or "unknown"},
        "unmapped": {
            "team": row["team"],
            "batch": row["batch"],
            "task": row["task"],
            "attempt": row["attempt"],
            "kind": row["kind"],
            "chain_id": row["chain_id"],
            "event_seq": row["event_seq"],
            "row_hash": row["row_hash"],
        },
    }


def _process(row: dict[str, Any], p: dict[str, Any]) -> dict[str, Any]:
    started = row["kind"] == "command_started"
    event = _base(row, 1007, 1 if started else 2, "Launch" if started else "Terminate")
    argv = [str(a) for a in p.get("argv") or []]
    process: dict[str, Any] = {
        "pid": p.get("pid"),
        "name": os.path.basename(argv[0]) if argv else "unknown",
        "cmd_line": " ".join(argv),
    }
    if p.get("ppid") is not None:
        process["parent_process"] = {"pid": p["ppid"]}
    event["process"] = process
    if not started:
        event["exit_code"] = p.get("exit")
        event["unmapped"]["duration_ms"] = p.get("duration_ms")
    return event


def _file(row: dict[str, Any], p: dict[str, Any]) -> dict[str, Any]:
    activity_id, name = _FILE_ACTIVITY.get(str(p.get("op")), (99, "Other"))
    event = _base(row, 1001, activity_id, name)
    path = str(p.get("path") or "")
    event["file"] = {
        "name": os.path.basename(path) or path,
        "path": path,
        "type_id": 1,
        "type": "Regular File",
        "size": p.get("bytes"),
    }
    if p.get("from"):
        event["file_result"] = {"name": os.path.basename(path), "path": path, "type_id": 1}
        event["file"] = {**event["file"], "path": p["from"], "name": os.path.basename(p["from"])}
    return event


def _api(row: dict[str, Any], p: dict[str, Any]) -> dict[str, Any]:
    ok = str(p.get("status", "ok")).lower() in {"ok", "success", "200", "succeeded"}
    event = _base(row, 6003, 1, "Create")
    event["api"] = {
        "operation": "chat.completions.create",
        "service": {"name": str(p.get("provider") or "llm")},
        "response": {"code": 200 if ok else None},
    }
    event["src_endpoint"] = {"hostname": row["node"] or "unknown", "svc_name": "sandfleet-gateway"}
    event["status_id"] = 1 if ok else 2
    event["ai_model"] = {
        "name": str(p.get("model") or "unknown"),
        "ai_provider": str(p.get("provider") or "unknown"),
    }
    event["unmapped"]["usage"] = {
        k: p.get(k)
        for k in (
            "input_uncached",
            "input_cache_read",
            "input_cache_write",
            "output",
            "reasoning",
            "cost_nusd",
            "latency_ms",
            "stream",
            "status",
        )
    }
    return event


def _network(row: dict[str, Any], p: dict[str, Any]) -> dict[str, Any]:
    allowed = bool(p.get("allowed"))
    event = _base(
        row,
        4001,
        1 if allowed else 5,
        "Open" if allowed else "Refuse",
        severity_id=1 if allowed else 2,
    )
    event["dst_endpoint"] = {"hostname": p.get("host"), "port": p.get("port")}
    event["src_endpoint"] = {"hostname": row["node"] or "unknown"}
    event["traffic"] = {"bytes_out": p.get("bytes_up"), "bytes_in": p.get("bytes_down")}
    event["action_id"] = 1 if allowed else 2
    event["action"] = "Allowed" if allowed else "Denied"
    event["status_detail"] = p.get("reason")
    return event


def _finding(row: dict[str, Any], p: dict[str, Any]) -> dict[str, Any]:
    severity = _SEVERITY.get(str(p.get("severity", "")).lower(), 99)
    event = _base(row, 2004, 1, "Create", severity_id=severity)
    rule = str(p.get("rule") or "unknown")
    uid = str(p.get("finding_id") or f"{rule}:{row['task']}:{row['chain_id']}:{row['event_seq']}")
    event["finding_info"] = {
        "uid": uid,
        "title": f"sandfleet rule {rule}",
        "desc": str(p.get("detail") or ""),
        "analytic": {"name": rule, "type_id": 1, "type": "Rule"},
    }
    event["evidences"] = [{"data": p.get("evidence")}] if p.get("evidence") else None
    event["unmapped"]["action"] = p.get("action")
    return event


_MAPPERS: Final[dict[str, Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]]]] = {
    "command_started": _process,
    "command_finished": _process,
    "file_changed": _file,
    "llm_call": _api,
    "egress_decision": _network,
    "anomaly_finding": _finding,
}


def ocsf_event(row: dict[str, Any]) -> dict[str, Any] | None:
    """The OCSF event for one `events` row (`time_us`, `row_hash` hex), or None if unmapped."""
    mapper = _MAPPERS.get(row["kind"])
    if mapper is None:
        return None
    return _drop_nones(mapper(row, json.loads(row["payload"])))


def _drop_nones(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_nones(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nones(v) for v in value]
    return value


# -- reading the ledger


def _rows(store: LedgerStore, table: str, since_us: int | None) -> Iterator[dict[str, Any]]:
    for path in store.list_files(f"ledger/{table}", ".parquet"):
        data = pq.read_table(pa.BufferReader(store.read_bytes(path)))
        data = data.set_column(
            data.schema.get_field_index("time"), "time", data["time"].cast(pa.int64())
        )
        if since_us is not None:
            data = data.filter(pc.greater_equal(data["time"], since_us))
        for row in data.to_pylist():
            row["row_hash"] = row["row_hash"].hex()
            yield row


def _since_us(since: datetime | str | None) -> int | None:
    if since is None:
        return None
    if isinstance(since, str):
        try:
            since = datetime.fromisoformat(since.replace("Z", "+00:00"))
        except ValueError:
            raise ConfigError(
                f"--since {since!r} is not a date (fix: use ISO 8601, e.g. 2025-01-31)"
            ) from None
    if since.tzinfo is None:
        since = since.replace(tzinfo=UTC)
    return int(since.timestamp() * 1_000_000)


def _json_value(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, bytes):
        return value.hex()
    return value


def _iso(us: int | None) -> str | None:
    if us is None:
        return None
    return datetime.fromtimestamp(us / 1_000_000, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def export(
    data_dir: str | os.PathLike[str],
    format: str = "ocsf",
    since: datetime | str | None = None,
    out: str | os.PathLike[str] = "-",
) -> int:
    """Write the export to `out` (a path, or `-` for stdout); returns the lines written."""
    if format not in {"ocsf", "jsonl"}:
        raise ConfigError(f"unknown export format {format!r} (fix: use ocsf or jsonl)")
    store = open_store(data_dir)
    since_us = _since_us(since)
    if os.fspath(out) == "-":
        return _write(sys.stdout, store, format, since_us)
    target = Path(out)
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            count = _write(f, store, format, since_us)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return count


def _write(f: TextIO, store: LedgerStore, format: str, since_us: int | None) -> int:
    count = 0
    if format == "ocsf":
        for row in _rows(store, "events", since_us):
            row["time_us"] = row.pop("time")
            event = ocsf_event(row)
            if event is not None:
                f.write(json.dumps(event, separators=(",", ":"), ensure_ascii=False) + "\n")
                count += 1
        return count
    for table in TABLES:
        for row in _rows(store, table, since_us):
            line: dict[str, Any] = {"table": table}
            for k, v in row.items():
                line[k] = _iso(v) if k == "time" else v
            f.write(json.dumps(line, default=_json_value, ensure_ascii=False) + "\n")
            count += 1
    return count
