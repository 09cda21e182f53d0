"""`sandfleet report cost|budget`, `sandfleet sql`, `sandfleet anomalies`: reading the ledger."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING

import click

from accounting.errors import ConfigError
from accounting.paths import resolve_data_dir
from accounting.reports import FORMATS, parse_by, parse_when

if TYPE_CHECKING:
    import duckdb

__all__ = ["COMMANDS", "anomalies_cmd", "report_group", "sql_cmd"]


def _when(ctx: click.Context, param: click.Parameter, value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        return parse_when(value, what=f"--{param.name}")
    except ConfigError as e:
        raise click.BadParameter(str(e)) from None


def _by(ctx: click.Context, param: click.Parameter, value: str) -> list[str]:
    try:
        return parse_by(value)
    except ConfigError as e:
        raise click.BadParameter(str(e)) from None


def _check_window(since: datetime | None, until: datetime | None) -> None:
    if since is not None and until is not None and since >= until:
        raise click.BadParameter(
            f"--since {since.isoformat()} is not before --until {until.isoformat()} "
            "(fix: swap them, or widen the window)"
        )


data_dir_option = click.option(
    "--data-dir",
    default=None,
    help="Ledger root (default $SANDFLEET_DATA or ./sandfleet-data); a path or URI.",
)
format_option = click.option(
    "--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True
)
since_option = click.option(
    "--since", callback=_when, help="From (inclusive): 2026-05-01, 2026-05-01T12:00, or 7d/6h/30m."
)
until_option = click.option("--until", callback=_when, help="To (exclusive); same forms.")
policies_option = click.option(
    "--policies",
    "policies_path",
    default=None,
    type=click.Path(dir_okay=False),
    help="Policies file (default configs/policies.yaml).",
)


def _connect(data_dir: str | None) -> duckdb.DuckDBPyConnection:
    from accounting.views import connect

    return connect(resolve_data_dir(data_dir))


@click.group("report")
def report_group() -> None:
    """Cost and budget reports over the ledger."""


@report_group.command("cost")
@click.option(
    "--by",
    default="team",
    show_default=True,
    callback=_by,
    help="Group keys, comma-separated: team, batch, task, task_type, model, day.",
)
@since_option
@until_option
@format_option
@data_dir_option
def cost_cmd(
    by: list[str],
    since: datetime | None,
    until: datetime | None,
    fmt: str,
    data_dir: str | None,
) -> None:
    """Compute, LLM, storage, network and total USD per group, with the unknown share.

    unknown_share = charge rows whose cost is unknown / all charge rows of the group;
    their cost is in no *_usd column.
    """
    from accounting.reports import cost_report, render

    _check_window(since, until)
    con = _connect(data_dir)
    try:
        report = cost_report(con, by, since, until)
    finally:
        con.close()
    click.echo(render(report, fmt, title=f"cost by {','.join(by)} (USD)"))


@report_group.command("budget")
@click.option("--over", "only_over", is_flag=True, help="Only caps that are exceeded.")
@click.option("--limit", type=click.IntRange(min=1), help="At most N lines per scope (worst).")
@policies_option
@format_option
@data_dir_option
def budget_cmd(
    only_over: bool, limit: int | None, policies_path: str | None, fmt: str, data_dir: str | None
) -> None:
    """Spend against each cap: team per UTC day and month, batch, task."""
    from accounting.budget_report import budget_report
    from accounting.policies import load_policies
    from accounting.reports import render

    policies = load_policies(policies_path)
    con = _connect(data_dir)
    try:
        report = budget_report(con, policies, datetime.now(UTC), only_over=only_over, limit=limit)
    finally:
        con.close()
    click.echo(render(report, fmt, title="budgets (USD)"))


@click.command("sql")
@click.argument("query")
@format_option
@data_dir_option
def sql_cmd(query: str, fmt: str, data_dir: str | None) -> None:
    """Run one read-only query over the views events, charges, tasks and focus."""
    from accounting.reports import check_query, render, run_sql

    check_query(query)
    con = _connect(data_dir)
    try:
        report = run_sql(con, query)
    finally:
        con.close()
    click.echo(render(report, fmt))


@click.command("anomalies")
@since_option
@until_option
@click.option(
    "--rule", "rules", multiple=True, help="Only this rule (repeatable); default every enabled one."
)
@click.option(
    "--record/--no-record",
    default=True,
    show_default=True,
    help="Write new findings to the ledger as anomaly_finding events.",
)
@policies_option
@format_option
@data_dir_option
def anomalies_cmd(
    since: datetime | None,
    until: datetime | None,
    rules: tuple[str, ...],
    record: bool,
    policies_path: str | None,
    fmt: str,
    data_dir: str | None,
) -> None:
    """Run the anomaly rules of configs/policies.yaml over the ledger."""
    from accounting.anomalies import findings_report, run_anomalies
    from accounting.policies import load_policies
    from accounting.reports import render

    _check_window(since, until)
    policies = load_policies(policies_path)
    found, new = run_anomalies(
        resolve_data_dir(data_dir),
        policies.anomalies,
        since,
        until,
        rules=rules or None,
        record=record,
    )
    report = findings_report(found, {f.finding_id for f in new} if record else None)
    click.echo(render(report, fmt, title=f"{len(found)} findings, {len(new)} new"))


COMMANDS: list[click.Command] = [report_group, sql_cmd, anomalies_cmd]
