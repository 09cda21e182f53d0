"""Cost and budget reports: pure SQL builders over the views, a runner, and rendering.

Money leaves DuckDB as exact DECIMAL(38, 9) USD (integer nano-USD x 1e-9), never a
float. Costs whose `cost_status` is `unknown` are not in any `*_usd` column; the share
of such charge ROWS in a group is `unknown_share` (unknown rows / all rows).
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from accounting.errors import ConfigError

if TYPE_CHECKING:
    import duckdb

__all__ = [
    "BUCKET_GROUPS",
    "FORMATS",
    "GROUP_KEYS",
    "Report",
    "check_query",
    "cost_report",
    "cost_report_sql",
    "nusd_to_usd_sql",
    "parse_by",
    "parse_when",
    "render",
    "run_sql",
    "time_filter_sql",
]

GROUP_KEYS: dict[str, str] = {
    "team": "team",
    "batch": "batch",
    "task": "task",
    "task_type": "task_type",
    "model": "model",
    "day": "day",
}
"""`--by` key -> the charges column it groups on (`day` is the Hive partition, UTC)."""

BUCKET_GROUPS: dict[str, tuple[str, ...]] = {
    "compute_usd": ("cpu", "memory"),
    "llm_usd": ("input_uncached", "input_cache_read", "input_cache_write", "output", "reasoning"),
    "storage_usd": ("storage",),
    "network_usd": ("egress",),
}
"""Report column -> the usage buckets it sums."""

FORMATS = ("table", "csv", "json")

_RELATIVE = re.compile(r"^\s*(\d+)\s*([mhdw])\s*$")
_UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_when(text: str, *, now: datetime | None = None, what: str = "--since") -> datetime:
    """`2026-05-01`, `2026-05-01T12:00`, `...+02:00`, or relative `30m`/`6h`/`7d`/`2w` ago.

    Naive times are UTC. Returns an aware UTC datetime; raises ConfigError with the fix.
    """
    m = _RELATIVE.match(text)
    if m:
        ref = now or datetime.now(UTC)
        return ref - timedelta(**{_UNITS[m.group(2)]: int(m.group(1))})
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ConfigError(
            f"{what} {text!r} is not a date or time; write it like 2026-05-01, "
            "2026-05-01T12:00 (UTC unless an offset is given), or 7d / 6h / 30m ago"
        ) from None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def parse_by(text: str | Sequence[str]) -> list[str]:
    """`team,day` -> ["team", "day"]; unknown or repeated keys raise ConfigError."""
    parts = text.split(",") if isinstance(text, str) else list(text)
    keys = [p.strip() for p in parts if p.strip()]
    allowed = ", ".join(GROUP_KEYS)
    if not keys:
        raise ConfigError(f"--by needs at least one key; use one or more of: {allowed}")
    for k in keys:
        if k not in GROUP_KEYS:
            raise ConfigError(f"--by key {k!r} is unknown; use one or more of: {allowed}")
    if len(set(keys)) != len(keys):
        raise ConfigError(f"--by {','.join(keys)} repeats a key; list each key once")
    return keys


def _ts(value: datetime) -> str:
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return f"TIMESTAMPTZ '{value.astimezone(UTC).isoformat()}'"


def time_filter_sql(
    since: datetime | None, until: datetime | None, *, column: str = "time", day: str = "day"
) -> str:
    """`column` in [since, until), plus the same bound on the day partition so files prune."""
    clauses = ["TRUE"]
    if since is not None:
        clauses.append(f"{day} >= DATE '{since.astimezone(UTC).date().isoformat()}'")
        clauses.append(f"{column} >= {_ts(since)}")
    if until is not None:
        clauses.append(f"{day} <= DATE '{until.astimezone(UTC).date().isoformat()}'")
        clauses.append(f"{column} < {_ts(until)}")
    return " AND ".join(clauses)


def nusd_to_usd_sql(expr: str) -> str:
    """Integer nano-USD -> exact DECIMAL(38, 9) USD (a multiplication keeps it exact)."""
    return f"(CAST({expr} AS DECIMAL(38, 0)) * CAST(0.000000001 AS DECIMAL(10, 9)))"


def _in(values: Iterable[str]) -> str:
    return "(" + ", ".join(f"'{v}'" for v in values) + ")"


def cost_report_sql(
    by: Sequence[str], since: datetime | None = None, until: datetime | None = None
) -> str:
    """Cost per group over the `charges` view, in [since, until) of the charge's `time`.

    Columns: the group keys, compute_usd, llm_usd, storage_usd, network_usd, total_usd
    (exact DECIMAL USD of known costs), unit ('USD'), unknown_rows, unknown_share
    (unknown rows / rows), rows (charge rows in the group).
    """
    keys = parse_by(by)
    cols = [f"{GROUP_KEYS[k]} AS {k}" for k in keys]
    sums = [
        f"{nusd_to_usd_sql(f'coalesce(sum(cost_nusd) FILTER (WHERE usage_bucket IN {_in(b)}), 0)')}"
        f" AS {name}"
        for name, b in BUCKET_GROUPS.items()
    ]
    select = ",\n  ".join(
        [
            *cols,
            *sums,
            f"{nusd_to_usd_sql('coalesce(sum(cost_nusd), 0)')} AS total_usd",
            "'USD' AS unit",
            "count(*) FILTER (WHERE cost_status = 'unknown') AS unknown_rows",
            "round(count(*) FILTER (WHERE cost_status = 'unknown') / count(*), 6) AS unknown_share",
            "count(*) AS rows",
        ]
    )
    group = ", ".join(str(i + 1) for i in range(len(keys)))
    return (
        f"SELECT\n  {select}\nFROM charges\nWHERE {time_filter_sql(since, until)}\n"
        f"GROUP BY {group}\nORDER BY total_usd DESC, {group}"
    )


@dataclass(frozen=True)
class Report:
    """A query's result: column names and rows (money as Decimal)."""

    columns: list[str]
    rows: list[tuple[Any, ...]]

    def records(self) -> list[dict[str, Any]]:
        """One dict per row."""
        return [dict(zip(self.columns, r, strict=True)) for r in self.rows]


def run_sql(con: duckdb.DuckDBPyConnection, sql: str) -> Report:
    """Run one query; a DuckDB error becomes a LedgerError/ConfigError naming the fix."""
    import duckdb

    from accounting.errors import LedgerError

    try:
        rel = con.execute(sql)
        rows = rel.fetchall()
    except (duckdb.ParserException, duckdb.BinderException, duckdb.CatalogException) as e:
        raise ConfigError(
            f"the SQL is not valid: {str(e).splitlines()[0]} (fix: check the query; the views are "
            "events, charges, tasks and focus — `DESCRIBE charges` lists columns)"
        ) from None
    except duckdb.PermissionException as e:
        raise ConfigError(
            f"the SQL was refused: {str(e).splitlines()[0]} (fix: only the ledger's views can be "
            "read; nothing can be written)"
        ) from None
    except duckdb.Error as e:
        raise LedgerError(f"the query failed: {str(e).splitlines()[0]}") from None
    columns = [d[0] for d in (rel.description or [])]
    return Report(columns=columns, rows=rows)


def cost_report(
    con: duckdb.DuckDBPyConnection,
    by: Sequence[str],
    since: datetime | None = None,
    until: datetime | None = None,
) -> Report:
    """Run `cost_report_sql` on a connection from `accounting.views.connect`."""
    return run_sql(con, cost_report_sql(by, since, until))


def check_query(sql: str) -> str:
    """One read-only statement (SELECT, WITH, FROM, DESCRIBE, SHOW, SUMMARIZE, EXPLAIN), else
    ConfigError naming the problem: `sandfleet sql` reads the ledger, it never changes it."""
    import duckdb

    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as e:
        raise ConfigError(
            f"the SQL is not valid: {str(e).splitlines()[0]} (fix: check the query's syntax)"
        ) from None
    if len(statements) != 1:
        raise ConfigError(
            f"give exactly one query, not {len(statements)} statements (fix: run them one by one)"
        )
    kind = statements[0].type
    if kind not in (duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN):
        raise ConfigError(
            f"only queries are allowed, not a {kind.name} statement (fix: use SELECT ... over "
            "the views events, charges, tasks and focus; the ledger is append-only)"
        )
    return sql


def _plain(value: Any) -> Any:
    if isinstance(value, Decimal):
        return format(value, "f")
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, timedelta):
        return value.total_seconds()
    return value


def render(report: Report, fmt: str, *, title: str | None = None) -> str:
    """As a rich table, CSV or JSON (a list of objects; decimals as exact strings)."""
    if fmt == "json":
        records = [{k: _plain(v) for k, v in r.items()} for r in report.records()]
        return json.dumps(records, indent=2)
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(report.columns)
        for row in report.rows:
            w.writerow(["" if v is None else _plain(v) for v in row])
        return buf.getvalue()
    if fmt == "table":
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title)
        for c in report.columns:
            table.add_column(c, justify="right" if c.endswith(("_usd", "rows", "_pct")) else "left")
        for row in report.rows:
            table.add_row(*("" if v is None else str(_plain(v)) for v in row))
        console = Console(file=io.StringIO(), width=200, record=True)
        console.print(table)
        return console.export_text()
    raise ConfigError(f"--format {fmt!r} is unknown; use one of: {', '.join(FORMATS)}")
