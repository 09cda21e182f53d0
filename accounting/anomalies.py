"""Running the anomaly rules and recording each finding once as an `anomaly_finding` event.

The rules themselves are pure SQL builders in `accounting.anomaly_rules`; thresholds and
actions come from `configs/policies.yaml`. `run_anomalies` finds, then records only the
findings whose `finding_id` is not already in the ledger, so running twice (or on
overlapping windows) never writes the same finding twice.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

from accounting.anomaly_rules import FINDING_COLUMNS, RULE_SQL
from accounting.errors import ConfigError, LedgerError
from accounting.policies import RULES, AnomalyPolicies
from accounting.reports import Report, run_sql
from accounting.schemas import Event, EventKind

if TYPE_CHECKING:
    import duckdb

__all__ = [
    "Finding",
    "FindingSink",
    "anomalies_sql",
    "find_anomalies",
    "finding_event",
    "findings_report",
    "record_findings",
    "recorded_finding_ids",
    "run_anomalies",
]


@dataclass(frozen=True)
class Finding:
    """One rule firing for one task attempt."""

    rule: str
    severity: str
    action: str
    team: str
    batch: str
    task: str
    attempt: int
    first_seen: datetime
    last_seen: datetime
    subject: str
    detail: str
    evidence: dict[str, Any] = field(hash=False)
    finding_id: str


class FindingSink(Protocol):
    """Where findings go: `accounting.writer.LedgerWriter` (or a test double)."""

    def append(self, table: str, rows: Sequence[Any]) -> Any:
        """Accept rows for a table."""


def _check_rules(rules: Iterable[str] | None) -> list[str]:
    if rules is None:
        return list(RULES)
    chosen = list(rules)
    for r in chosen:
        if r not in RULE_SQL:
            raise ConfigError(f"anomaly rule {r!r} is unknown; use one of: {', '.join(RULES)}")
    return chosen


def anomalies_sql(
    policies: AnomalyPolicies,
    since: datetime | None = None,
    until: datetime | None = None,
    *,
    rules: Iterable[str] | None = None,
) -> str | None:
    """Every enabled rule's SQL, UNIONed and ordered; None when no rule is enabled."""
    parts = []
    for name in _check_rules(rules):
        rule = getattr(policies, name)
        if rule.enabled:
            parts.append(f"({RULE_SQL[name](rule, since, until)})")
    if not parts:
        return None
    return (
        "\nUNION ALL\n".join(parts)
        + "\nORDER BY last_seen, rule, team, batch, task, attempt, subject"
    )


def find_anomalies(
    con: duckdb.DuckDBPyConnection,
    policies: AnomalyPolicies,
    since: datetime | None = None,
    until: datetime | None = None,
    *,
    rules: Iterable[str] | None = None,
) -> list[Finding]:
    """Run the enabled rules over a connection from `accounting.views.connect`."""
    sql = anomalies_sql(policies, since, until, rules=rules)
    if sql is None:
        return []
    report = run_sql(con, sql)
    if tuple(report.columns) != FINDING_COLUMNS:
        raise LedgerError(f"anomaly SQL returned columns {report.columns}, not {FINDING_COLUMNS}")
    out = []
    for rec in report.records():
        rec["evidence"] = json.loads(rec["evidence"]) if rec["evidence"] else {}
        out.append(Finding(**rec))
    return out


def recorded_finding_ids(con: duckdb.DuckDBPyConnection) -> set[str]:
    """The `finding_id` of every `anomaly_finding` event already in the ledger."""
    rows = con.execute(
        "SELECT DISTINCT json_extract_string(payload, '$.finding_id') FROM events "
        "WHERE kind = ? AND json_extract_string(payload, '$.finding_id') IS NOT NULL",
        [EventKind.ANOMALY_FINDING.value],
    ).fetchall()
    return {r[0] for r in rows}


def finding_event(f: Finding, *, node: str = "") -> Event:
    """The `anomaly_finding` event of a finding (time = when it was last seen)."""
    return Event(
        time=f.last_seen,
        team=f.team,
        batch=f.batch,
        task=f.task,
        attempt=f.attempt,
        node=node,
        kind=EventKind.ANOMALY_FINDING,
        payload={
            "rule": f.rule,
            "severity": f.severity,
            "action": f.action,
            "detail": f.detail,
            "evidence": f.evidence,
            "finding_id": f.finding_id,
            "subject": f.subject,
            "first_seen": f.first_seen.isoformat(),
        },
    )


def record_findings(
    findings: Sequence[Finding], sink: FindingSink, already: set[str], *, node: str = ""
) -> list[Finding]:
    """Append the findings not in `already` as events; returns the ones written."""
    new = [f for f in findings if f.finding_id not in already]
    if new:
        sink.append("events", [finding_event(f, node=node) for f in new])
    return new


def run_anomalies(
    data_dir: str,
    policies: AnomalyPolicies,
    since: datetime | None = None,
    until: datetime | None = None,
    *,
    rules: Iterable[str] | None = None,
    record: bool = True,
    node: str = "",
    signing_key: str | None = None,
) -> tuple[list[Finding], list[Finding]]:
    """Find anomalies in the ledger at `data_dir`; record new ones. Returns (all, new).

    New findings are written by a `LedgerWriter` of their own (its own audit chain),
    signed with `signing_key` (default: `$SANDFLEET_AUDIT_KEY` or the standard path).
    """
    from accounting.views import connect

    con = connect(data_dir)
    try:
        findings = find_anomalies(con, policies, since, until, rules=rules)
        already = recorded_finding_ids(con) if record else set()
    finally:
        con.close()
    if not record:
        return findings, []
    new = [f for f in findings if f.finding_id not in already]
    if new:
        from accounting.writer import LedgerWriter

        with LedgerWriter(data_dir, node=node, signing_key=signing_key) as writer:
            record_findings(new, writer, already, node=node)
    return findings, new


def findings_report(findings: Sequence[Finding], new_ids: set[str] | None = None) -> Report:
    """Findings as a `Report` for `accounting.reports.render` (`new`: recorded this run)."""
    columns = ["rule", "severity", "action", "team", "batch", "task", "attempt", "last_seen"]
    columns += ["detail", "finding_id"]
    if new_ids is not None:
        columns.append("new")
    rows = []
    for f in findings:
        row: list[Any] = [getattr(f, c) for c in columns if c != "new"]
        if new_ids is not None:
            row.append(f.finding_id in new_ids)
        rows.append(tuple(row))
    return Report(columns=columns, rows=rows)
