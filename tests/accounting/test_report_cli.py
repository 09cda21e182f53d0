"""`sandfleet report cost|budget`, `sandfleet sql`, `sandfleet anomalies` on a real ledger."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from accounting.charging import TokenCounts, llm_call_charges, resource_charges
from accounting.errors import ConfigError
from accounting.pricing import load_pricing
from accounting.report_cli import COMMANDS
from accounting.schemas import Event, EventKind
from accounting.writer import LedgerWriter

PRICES = load_pricing()
T = datetime(2026, 2, 10, 9, 0, tzinfo=UTC)


@click.group()
def sandfleet() -> None:
    """The accounting commands alone, as the root CLI mounts them."""


for _command in COMMANDS:
    sandfleet.add_command(_command)


@pytest.fixture(autouse=True)
def _audit_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SANDFLEET_AUDIT_KEY", str(tmp_path / "keys" / "audit.pem"))


@pytest.fixture
def ledger(data_dir: Path) -> Path:
    charges = []
    for team, tokens in (("ml", 1000), ("web", 3000)):
        charges += llm_call_charges(
            PRICES,
            TokenCounts(input_uncached=tokens, output=tokens // 10),
            call_id=team,
            model="gpt-4o",
            provider="openai",
            time=T,
            period_start=T - timedelta(seconds=5),
            team=team,
            batch=f"{team}-b",
            task=f"{team}-t",
            attempt=1,
            task_type="fix",
        )
    charges += resource_charges(
        PRICES,
        {"cpu": 3600},
        time=T + timedelta(days=1),
        period_start=T,
        team="ml",
        batch="ml-b",
        task="ml-t",
        attempt=1,
        task_type="fix",
    )
    events = [
        Event(T, "ml", "ml-b", "ml-t", 1, "n", EventKind.TASK_STATE, {"state": "running"}),
        Event(
            T + timedelta(minutes=1),
            "ml",
            "ml-b",
            "ml-t",
            1,
            "n",
            EventKind.FILE_CHANGED,
            {"path": "/w/.git/hooks/pre-push", "op": "create", "bytes": 10},
        ),
    ]
    with LedgerWriter(data_dir) as w:
        w.append("charges", charges)
        w.append("events", events)
    return data_dir


def _run(*args: str) -> str:
    result = CliRunner().invoke(sandfleet, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_report_cost_by_team_as_json_has_exact_usd(ledger: Path) -> None:
    rows = json.loads(
        _run("report", "cost", "--by", "team", "--format", "json", "--data-dir", str(ledger))
    )
    by = {r["team"]: r for r in rows}
    # gpt-4o: $2.50 / 1M input, $10 / 1M output; one vCPU-hour $0.04048
    assert Decimal(by["ml"]["llm_usd"]) == Decimal("0.0025") + Decimal("0.001")
    assert Decimal(by["ml"]["compute_usd"]) == Decimal("0.04048")
    assert Decimal(by["web"]["total_usd"]) == Decimal("0.0075") + Decimal("0.003")
    assert by["web"]["unit"] == "USD" and by["web"]["unknown_share"] == 0


def test_report_cost_by_several_keys_as_csv_with_a_window(ledger: Path) -> None:
    out = _run(
        "report",
        "cost",
        "--by",
        "team,day",
        "--since",
        "2026-02-10",
        "--until",
        "2026-02-11",
        "--format",
        "csv",
        "--data-dir",
        str(ledger),
    )
    rows = list(csv.DictReader(io.StringIO(out)))
    assert {(r["team"], r["day"]) for r in rows} == {("ml", "2026-02-10"), ("web", "2026-02-10")}
    assert all(Decimal(r["compute_usd"]) == 0 for r in rows)  # the cpu charge ends on the 11th


def test_report_cost_as_a_table_titles_the_grouping(ledger: Path) -> None:
    out = _run("report", "cost", "--by", "model", "--data-dir", str(ledger))
    assert "cost by model (USD)" in out and "gpt-4o" in out


def test_data_dir_comes_from_the_environment_when_no_flag(
    ledger: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SANDFLEET_DATA", str(ledger))
    assert "web" in _run("report", "cost", "--format", "csv")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["report", "cost", "--by", "team,colour"], "'colour' is unknown; use one or more of"),
        (["report", "cost", "--since", "soonish"], "--since 'soonish' is not a date"),
        (["report", "cost", "--since", "2026-02-11", "--until", "2026-02-10"], "is not before"),
        (["report", "cost", "--format", "xml"], "'xml' is not one of"),
    ],
)
def test_bad_flags_are_usage_errors_naming_the_fix(
    ledger: Path, args: list[str], message: str
) -> None:
    result = CliRunner().invoke(sandfleet, [*args, "--data-dir", str(ledger)])
    assert result.exit_code == 2
    assert message in result.output


def test_sql_runs_any_query_over_the_views(ledger: Path) -> None:
    out = _run(
        "sql",
        "SELECT SubAccountId, sum(BilledCost) AS usd FROM focus GROUP BY 1 ORDER BY 1",
        "--format",
        "json",
        "--data-dir",
        str(ledger),
    )
    assert json.loads(out) == [
        {"SubAccountId": "ml", "usd": "0.043980000"},
        {"SubAccountId": "web", "usd": "0.010500000"},
    ]


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("SELECT nope FROM charges", "not valid: Binder Error"),
        ("SELEC 1", "not valid"),
        ("DELETE FROM charges", "only queries are allowed, not a DELETE"),
        ("SELECT * FROM read_csv('/etc/passwd')", "was refused"),
    ],
)
def test_bad_sql_is_refused_naming_the_problem(ledger: Path, query: str, message: str) -> None:
    result = CliRunner().invoke(sandfleet, ["sql", query, "--data-dir", str(ledger)])
    assert isinstance(result.exception, ConfigError)
    assert message in str(result.exception)


def test_the_root_cli_turns_a_bad_query_into_one_line_and_exit_2(
    ledger: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from scheduler.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["sql", "SELECT nope FROM charges", "--data-dir", str(ledger)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the SQL is not valid") and "DESCRIBE charges" in err


def test_report_budget_lists_caps_from_the_policies(ledger: Path) -> None:
    rows = json.loads(_run("report", "budget", "--format", "json", "--data-dir", str(ledger)))
    scopes = {(r["scope"], r["id"]) for r in rows}
    assert {("batch", "ml-b"), ("task", "ml-b/ml-t"), ("team_month", "demo")} <= scopes
    task = next(r for r in rows if r["id"] == "ml-b/ml-t")
    assert Decimal(task["spent_usd"]) == Decimal("0.04398") and task["over"] is False


def test_anomalies_reports_and_records_each_finding_once(ledger: Path) -> None:
    args = ["anomalies", "--since", "2026-02-10", "--until", "2026-02-10T10:00", "--format", "json"]
    first = json.loads(_run(*args, "--data-dir", str(ledger)))
    assert {r["rule"] for r in first} == {"sensitive_files", "stuck"}
    assert all(r["new"] for r in first)
    second = json.loads(_run(*args, "--data-dir", str(ledger)))
    assert [r["finding_id"] for r in second] == [r["finding_id"] for r in first]
    assert not any(r["new"] for r in second)
    recorded = json.loads(
        _run(
            "sql",
            "SELECT count(*) AS n FROM events WHERE kind = 'anomaly_finding'",
            "--format",
            "json",
            "--data-dir",
            str(ledger),
        )
    )
    assert recorded == [{"n": 2}]


def test_anomalies_can_run_one_rule_without_recording(ledger: Path) -> None:
    out = _run(
        "anomalies",
        "--rule",
        "sensitive_files",
        "--no-record",
        "--until",
        "2026-02-10T10:00",
        "--format",
        "csv",
        "--data-dir",
        str(ledger),
    )
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [r["rule"] for r in rows] == ["sensitive_files"]
    assert "new" not in rows[0]
    recorded = _run(
        "sql",
        "SELECT count(*) FROM events WHERE kind = 'anomaly_finding'",
        "--format",
        "csv",
        "--data-dir",
        str(ledger),
    )
    assert recorded.splitlines()[1] == "0"
