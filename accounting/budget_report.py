"""`sandfleet report budget`: spend against every cap, from the ledger and the policies.

Caps: per team per UTC day and per UTC calendar month (`configs/policies.yaml` teams /
defaults); per batch (the batch spec's `budget`, else policies `batch.budget_usd`);
per task, all attempts together (the task's `budget`, else the batch's
`defaults.budget`, else policies `task.budget_usd`). Batch and task budgets are read
from each batch's `batch_submitted` event (`payload.spec`). Spend = the sum of known
costs (final and estimated); charges of unknown cost are counted in `unknown_rows`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal
from typing import TYPE_CHECKING, Any

from accounting.errors import LedgerError
from accounting.policies import Policies
from accounting.pricing import to_decimal
from accounting.reports import Report, run_sql
from accounting.schemas import EventKind

if TYPE_CHECKING:
    import duckdb

__all__ = [
    "BUDGET_COLUMNS",
    "BudgetLine",
    "budget_lines",
    "budget_report",
    "budget_spend_sql",
    "spec_budgets_sql",
    "utc_windows",
]

BUDGET_COLUMNS = ["scope", "id", "window", "cap_usd", "spent_usd", "used_pct", "over"]
BUDGET_COLUMNS += ["unknown_rows"]
_SCOPES = ("team_day", "team_month", "batch", "task")


@dataclass(frozen=True)
class BudgetLine:
    """One cap and the spend against it."""

    scope: str  # team_day | team_month | batch | task
    id: str  # team, batch, or `batch/task`
    window: str  # the UTC day, the month, or "lifetime"
    cap_usd: Decimal
    spent_usd: Decimal
    used_pct: Decimal | None  # None when the cap is 0
    over: bool  # spent > cap
    unknown_rows: int


def utc_windows(now: datetime) -> tuple[datetime, datetime, datetime, datetime]:
    """(day start, day end, month start, month end) in UTC around `now`."""
    now = now.astimezone(UTC)
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    month = day.replace(day=1)
    next_month = (month + timedelta(days=32)).replace(day=1)
    return day, day + timedelta(days=1), month, next_month


def _ts(t: datetime) -> str:
    return f"TIMESTAMPTZ '{t.isoformat()}'"


def budget_spend_sql(now: datetime) -> str:
    """Known spend (nUSD) and unknown rows per scope: team today, team this month, batch, task."""
    d0, d1, m0, m1 = utc_windows(now)
    unknown = "count(*) FILTER (WHERE cost_status = 'unknown')"
    spent = "coalesce(sum(cost_nusd), 0)"
    day_f = f"day = DATE '{d0.date()}' AND time >= {_ts(d0)} AND time < {_ts(d1)}"
    month_f = f"day >= DATE '{m0.date()}' AND day <= DATE '{m1.date()}'"
    month_f += f" AND time >= {_ts(m0)} AND time < {_ts(m1)}"
    return f"""SELECT 'team_day' AS scope, team, '' AS batch, '' AS task, {spent} AS spent_nusd,
  {unknown} AS unknown_rows FROM charges WHERE {day_f} GROUP BY team
UNION ALL
SELECT 'team_month', team, '', '', {spent}, {unknown} FROM charges WHERE {month_f} GROUP BY team
UNION ALL
SELECT 'batch', any_value(team), batch, '', {spent}, {unknown} FROM charges GROUP BY batch
UNION ALL
SELECT 'task', any_value(team), batch, task, {spent}, {unknown} FROM charges GROUP BY batch, task"""


def spec_budgets_sql() -> str:
    """Budgets stated by batch specs: (batch, task, budget); task '' = the batch's own cap,
    task '*' = the batch's default per-task cap."""
    kind = f"kind = '{EventKind.BATCH_SUBMITTED.value}'"
    return f"""SELECT batch, '' AS task, json_extract_string(payload, '$.spec.budget') AS budget
FROM events WHERE {kind}
UNION ALL
SELECT batch, '*', json_extract_string(payload, '$.spec.defaults.budget') FROM events WHERE {kind}
UNION ALL
SELECT batch, json_extract_string(t, '$.id'), json_extract_string(t, '$.budget')
FROM (SELECT batch, unnest(json_extract(payload, '$.spec.tasks[*]')) AS t FROM events
      WHERE {kind})"""


def _usd(nusd: int) -> Decimal:
    # integer nano-USD -> exact USD (1 USD = 10^9 nUSD)
    return Decimal(nusd).scaleb(-9)


def _line(
    scope: str, id_: str, window: str, cap: Decimal, spent_nusd: int, unknown: int
) -> BudgetLine:
    spent = _usd(spent_nusd)
    pct = None
    if cap > 0:
        pct = (spent * 100 / cap).quantize(Decimal("0.01"), rounding=ROUND_HALF_EVEN)
    return BudgetLine(scope, id_, window, cap, spent, pct, spent > cap, unknown)


def budget_lines(
    spend: Iterable[Sequence[Any]],
    spec_budgets: Iterable[Sequence[Any]],
    policies: Policies,
    now: datetime,
) -> list[BudgetLine]:
    """Pure: spend rows (scope, team, batch, task, spent_nusd, unknown_rows) and spec budget
    rows (batch, task, budget) -> one line per capped scope, worst first within a scope."""
    d0, _, m0, _ = utc_windows(now)
    stated: dict[tuple[str, str], Decimal] = {}
    for batch, task, budget in spec_budgets:
        if budget is None or task is None:
            continue
        try:
            stated[(batch, task)] = to_decimal(budget, what="budget")
        except ValueError as e:
            raise LedgerError(
                f"batch {batch!r}: its batch_submitted event has budget {budget!r}: {e}"
            ) from None
    rows = {(r[0], r[1], r[2], r[3]): (int(r[4]), int(r[5])) for r in spend}
    for team in [*policies.teams, *{r[1] for r in rows if r[0] == "team_day"}]:
        for scope in ("team_day", "team_month"):
            rows.setdefault((scope, team, "", ""), (0, 0))
    lines = []
    for (scope, team, batch, task), (spent, unknown) in rows.items():
        if scope in ("team_day", "team_month"):
            tp = policies.team(team)
            cap = tp.daily_usd if scope == "team_day" else tp.monthly_usd
            window = str(d0.date()) if scope == "team_day" else m0.strftime("%Y-%m")
            id_ = team
        elif scope == "batch":
            cap = stated.get((batch, ""), policies.batch.budget_usd)
            window, id_ = "lifetime", batch
        else:
            cap = stated.get((batch, task), stated.get((batch, "*"), policies.task.budget_usd))
            window, id_ = "lifetime", f"{batch}/{task}"
        if cap is not None:
            lines.append(_line(scope, id_, window, cap, spent, unknown))
    order = {s: i for i, s in enumerate(_SCOPES)}
    lines.sort(key=lambda x: (order[x.scope], -(x.used_pct or 0), not x.over, x.id))
    return lines


def budget_report(
    con: duckdb.DuckDBPyConnection,
    policies: Policies,
    now: datetime | None = None,
    *,
    only_over: bool = False,
    limit: int | None = None,
) -> Report:
    """Spend vs every cap, as a `Report`; `limit` keeps the worst N lines of each scope."""
    now = now or datetime.now(UTC)
    spend = run_sql(con, budget_spend_sql(now)).rows
    specs = run_sql(con, spec_budgets_sql()).rows
    lines = budget_lines(spend, specs, policies, now)
    if only_over:
        lines = [x for x in lines if x.over]
    if limit is not None:
        kept: dict[str, int] = {}
        trimmed = []
        for x in lines:
            kept[x.scope] = kept.get(x.scope, 0) + 1
            if kept[x.scope] <= limit:
                trimmed.append(x)
        lines = trimmed
    rows = [
        (x.scope, x.id, x.window, x.cap_usd, x.spent_usd, x.used_pct, x.over, x.unknown_rows)
        for x in lines
    ]
    return Report(columns=list(BUDGET_COLUMNS), rows=rows)
