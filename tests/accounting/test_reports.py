"""Cost and budget reports on generated ledgers equal sums computed here, in Python."""

from __future__ import annotations

import json
import random
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import duckdb
import pytest

from accounting.budget_report import budget_lines, budget_report, budget_spend_sql
from accounting.charging import TokenCounts, llm_call_charges, resource_charges
from accounting.errors import ConfigError
from accounting.policies import load_policies
from accounting.pricing import load_pricing
from accounting.reports import (
    Report,
    check_query,
    cost_report,
    cost_report_sql,
    parse_by,
    parse_when,
    render,
)
from accounting.schemas import Charge, Event, EventKind
from accounting.views import connect
from accounting.writer import LedgerWriter

PRICES = load_pricing()
START = datetime(2026, 3, 30, 22, 0, tzinfo=UTC)  # three UTC days, across a month end
MODELS = [("gpt-4.1", "openai"), ("claude-sonnet-4", "anthropic"), ("scripted", "scripted")]
MODELS += [("mystery-model", "other")]  # not priced: unknown cost


@pytest.fixture(autouse=True)
def _audit_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SANDFLEET_AUDIT_KEY", str(tmp_path / "keys" / "audit.pem"))


def _generate(seed: int = 7, tasks: int = 40) -> list[Charge]:
    rng = random.Random(seed)
    out: list[Charge] = []
    for i in range(tasks):
        team = rng.choice(["ml", "data", "web"])
        batch = f"{team}-b{rng.randint(1, 2)}"
        task_type = rng.choice(["fix", "refactor", "docs"])
        attempt = rng.choice([1, 1, 2])
        t = START + timedelta(minutes=rng.randint(0, 3 * 24 * 60 - 10))
        for call in range(rng.randint(1, 4)):
            model, provider = rng.choice(MODELS)
            counts = TokenCounts(
                input_uncached=rng.randint(0, 20_000),
                input_cache_read=rng.choice([0, rng.randint(1, 90_000)]),
                input_cache_write=rng.choice([0, 0, rng.randint(1, 5_000)]),
                output=rng.randint(1, 4_000),
                reasoning=rng.choice([0, rng.randint(1, 8_000)]),
            )
            end = t + timedelta(seconds=30 * call + 10)
            out += llm_call_charges(
                PRICES,
                counts,
                call_id=f"{i}-{call}",
                model=model,
                provider=provider,
                time=end,
                period_start=end - timedelta(seconds=9),
                team=team,
                batch=batch,
                task=f"task{i}",
                attempt=attempt,
                task_type=task_type,
            )
        usage = {
            "cpu": Decimal(rng.randint(1, 7200)),
            "memory": Decimal(rng.randint(1, 14_400)) / 4,
            "storage": Decimal(rng.randint(0, 50)) / 10,
            "egress": rng.randint(0, 10**9),
        }
        end = t + timedelta(minutes=5)
        out += resource_charges(
            PRICES,
            usage,
            time=end,
            period_start=t,
            team=team,
            batch=batch,
            task=f"task{i}",
            attempt=attempt,
            task_type=task_type,
        )
    return out


def _write(data_dir: Path, charges: list[Charge], events: list[Event] = ()) -> None:  # type: ignore[assignment]
    with LedgerWriter(data_dir) as w:
        # several appends and flushes: the report must not depend on segment layout
        for k in range(0, len(charges), 37):
            w.append("charges", charges[k : k + 37])
            if k % 111 == 0:
                w.flush()
        if events:
            w.append("events", list(events))


# The report's columns, restated here so the test does not trust the module's own mapping.
BUCKET_GROUPS = {
    "compute_usd": {"cpu", "memory"},
    "llm_usd": {"input_uncached", "input_cache_read", "input_cache_write", "output", "reasoning"},
    "storage_usd": {"storage"},
    "network_usd": {"egress"},
}

KEY: dict[str, Callable[[Charge], object]] = {
    "team": lambda c: c.team,
    "batch": lambda c: c.batch,
    "task": lambda c: c.task,
    "task_type": lambda c: c.task_type,
    "model": lambda c: c.model,
    "day": lambda c: c.time.date(),
}


def _expected(charges: list[Charge], by: list[str]) -> dict[tuple, dict[str, object]]:
    groups: dict[tuple, dict[str, object]] = defaultdict(
        lambda: {
            **{k: Decimal(0) for k in BUCKET_GROUPS},
            "total_usd": Decimal(0),
            "rows": 0,
            "unknown_rows": 0,
        }
    )
    for c in charges:
        g = groups[tuple(KEY[k](c) for k in by)]
        g["rows"] += 1  # type: ignore[operator]
        if c.cost_nusd is None:
            g["unknown_rows"] += 1  # type: ignore[operator]
            continue
        usd = Decimal(c.cost_nusd) / 10**9
        for col, buckets in BUCKET_GROUPS.items():
            if c.usage_bucket in buckets:
                g[col] += usd  # type: ignore[operator]
        g["total_usd"] += usd  # type: ignore[operator]
    return dict(groups)


def _as_dict(report: Report, by: list[str]) -> dict[tuple, dict[str, object]]:
    out = {}
    for rec in report.records():
        key = tuple(rec.pop(k) for k in by)
        out[key] = rec
    return out


@pytest.mark.parametrize(
    "by",
    [["team"], ["batch"], ["task"], ["task_type"], ["model"], ["day"], ["team", "day", "model"]],
)
def test_cost_report_equals_the_sums_computed_in_python(data_dir: Path, by: list[str]) -> None:
    charges = _generate()
    _write(data_dir, charges)
    got = _as_dict(cost_report(connect(data_dir), by), by)
    want = _expected(charges, by)
    assert got.keys() == want.keys()
    for key, w in want.items():
        g = got[key]
        for col in [*BUCKET_GROUPS, "total_usd"]:
            assert g[col] == w[col], (key, col)
            assert isinstance(g[col], Decimal)
        assert (g["rows"], g["unknown_rows"], g["unit"]) == (w["rows"], w["unknown_rows"], "USD")
        assert g["unknown_share"] == pytest.approx(w["unknown_rows"] / w["rows"], abs=1e-6)  # type: ignore[operator]


def test_unknown_costs_are_counted_not_added_as_zero(data_dir: Path) -> None:
    charges = _generate()
    _write(data_dir, charges)
    got = _as_dict(cost_report(connect(data_dir), ["model"]), ["model"])
    mystery = got[("mystery-model",)]
    assert mystery["unknown_share"] == 1.0 and mystery["llm_usd"] == 0
    assert mystery["unknown_rows"] == sum(1 for c in charges if c.model == "mystery-model")


def test_since_and_until_select_charges_by_their_end_time(data_dir: Path) -> None:
    charges = _generate()
    _write(data_dir, charges)
    since, until = START + timedelta(hours=5), START + timedelta(hours=30)
    got = _as_dict(cost_report(connect(data_dir), ["team"], since, until), ["team"])
    want = _expected([c for c in charges if since <= c.time < until], ["team"])
    assert {k: g["total_usd"] for k, g in got.items()} == {
        k: w["total_usd"] for k, w in want.items()
    }
    assert {k: g["rows"] for k, g in got.items()} == {k: w["rows"] for k, w in want.items()}


def test_an_empty_ledger_gives_an_empty_report(data_dir: Path) -> None:
    assert cost_report(connect(data_dir), ["team", "day"]).rows == []


def test_cost_report_sql_is_built_without_data_and_parses() -> None:
    sql = cost_report_sql(["team", "model"], START, START + timedelta(days=1))
    assert duckdb.extract_statements(sql)[0].type == duckdb.StatementType.SELECT
    assert "day >= DATE '2026-03-30'" in sql and "day <= DATE '2026-03-31'" in sql
    assert "FROM charges" in sql and "GROUP BY 1, 2" in sql


def test_bad_group_keys_are_refused_naming_the_allowed_ones() -> None:
    with pytest.raises(ConfigError, match="'colour' is unknown; use one or more of: team, batch"):
        parse_by("team,colour")
    with pytest.raises(ConfigError, match="repeats"):
        parse_by("team,team")
    with pytest.raises(ConfigError, match="at least one"):
        cost_report_sql([])


def test_dates_times_and_relative_windows_parse_as_utc() -> None:
    now = datetime(2026, 5, 10, 12, tzinfo=UTC)
    assert parse_when("2026-05-01") == datetime(2026, 5, 1, tzinfo=UTC)
    assert parse_when("2026-05-01T12:30+02:00") == datetime(2026, 5, 1, 10, 30, tzinfo=UTC)
    assert parse_when("7d", now=now) == now - timedelta(days=7)
    assert parse_when("90m", now=now) == now - timedelta(minutes=90)
    with pytest.raises(ConfigError, match=r"--until 'last tuesday' is not a date.*2026-05-01"):
        parse_when("last tuesday", what="--until")


def test_reports_render_as_table_csv_and_json_with_exact_decimals() -> None:
    report = Report(["team", "total_usd", "rows"], [("ml", Decimal("0.000000001"), 3)])
    assert json.loads(render(report, "json")) == [
        {"team": "ml", "total_usd": "0.000000001", "rows": 3}
    ]
    assert render(report, "csv") == "team,total_usd,rows\nml,0.000000001,3\n"
    table = render(report, "table", title="cost")
    assert "0.000000001" in table and "team" in table
    with pytest.raises(ConfigError, match="use one of: table, csv, json"):
        render(report, "xml")


def test_only_single_read_only_queries_are_accepted() -> None:
    assert check_query("SELECT 1")
    assert check_query("DESCRIBE charges")
    for bad, why in [
        ("COPY (SELECT 1) TO 'x.csv'", "not a COPY statement"),
        ("SELECT 1; SELECT 2", "exactly one query"),
        ("CREATE TABLE x (a INT)", "not a CREATE statement"),
        ("SELEKT 1", "not valid"),
    ]:
        with pytest.raises(ConfigError, match=why):
            check_query(bad)


# --- budgets


NOW = datetime(2026, 4, 1, 18, 0, tzinfo=UTC)


def _spend(team: str, batch: str, task: str, nusd: int, when: datetime, *, unknown: bool = False):
    return Charge(
        time=when,
        team=team,
        batch=batch,
        task=task,
        attempt=1,
        node="n",
        charge_id=f"{team}-{batch}-{task}-{when.isoformat()}-{nusd}-{unknown}",
        period_start=when,
        task_type="fix",
        service_category="Compute",
        service_name="Sandbox Compute",
        provider="sandfleet",
        model="",
        usage_bucket="cpu",
        quantity=Decimal(1),
        unit="core-seconds",
        unit_price_nusd=None if unknown else Decimal(nusd),
        cost_nusd=None if unknown else nusd,
        cost_status="unknown" if unknown else "final",
        price_version="test",
    )


def test_budget_report_compares_spend_with_every_cap(data_dir: Path) -> None:
    usd = 10**9
    charges = [
        _spend("demo", "bx", "t1", 3 * usd, NOW - timedelta(hours=2)),  # today
        _spend("demo", "bx", "t1", 4 * usd, NOW - timedelta(hours=20)),  # yesterday (March!)
        _spend("demo", "bx", "t2", usd // 2, NOW - timedelta(hours=1)),
        _spend("demo", "bx", "t2", 0, NOW - timedelta(hours=1), unknown=True),
        _spend("ml-research", "by", "t9", 1 * usd, NOW - timedelta(minutes=5)),
    ]
    spec = {
        "name": "bx",
        "team": "demo",
        "budget": "6.50",
        "defaults": {"budget": "1.00"},
        "tasks": [{"id": "t1", "budget": "5"}, {"id": "t2"}],
    }
    submitted = Event(
        NOW - timedelta(days=1),
        "demo",
        "bx",
        "",
        0,
        "n",
        EventKind.BATCH_SUBMITTED,
        {"spec": spec, "tasks": 2},
    )
    _write(data_dir, charges, [submitted])
    policies = load_policies()
    report = budget_report(connect(data_dir), policies, NOW)
    lines = {(r["scope"], r["id"]): r for r in report.records()}

    demo_day = lines[("team_day", "demo")]  # cap $5/day; today 3 + 0.5
    assert (demo_day["cap_usd"], demo_day["spent_usd"]) == (Decimal("5.00"), Decimal("3.5"))
    assert demo_day["used_pct"] == Decimal("70.00") and demo_day["over"] is False
    assert demo_day["window"] == "2026-04-01" and demo_day["unknown_rows"] == 1
    demo_month = lines[("team_month", "demo")]  # April only: yesterday's $4 was in March
    assert demo_month["spent_usd"] == Decimal("3.5") and demo_month["window"] == "2026-04"
    batch = lines[("batch", "bx")]  # the spec's own cap, not the policies' default
    assert (batch["cap_usd"], batch["spent_usd"], batch["over"]) == (
        Decimal("6.50"),
        Decimal("7.5"),
        True,
    )
    t1, t2 = lines[("task", "bx/t1")], lines[("task", "bx/t2")]
    assert (t1["cap_usd"], t1["spent_usd"], t1["over"]) == (Decimal("5"), Decimal(7), True)
    assert (t2["cap_usd"], t2["spent_usd"], t2["over"]) == (Decimal("1.00"), Decimal("0.5"), False)
    t9 = lines[("task", "by/t9")]  # no spec: the policies' default task cap
    assert t9["cap_usd"] == policies.task.budget_usd and t9["used_pct"] == Decimal("50.00")
    assert lines[("team_day", "data-platform")]["spent_usd"] == 0  # listed team, no spend

    over = budget_report(connect(data_dir), policies, NOW, only_over=True)
    assert {(r["scope"], r["id"]) for r in over.records()} == {("batch", "bx"), ("task", "bx/t1")}


def test_budget_lines_are_a_pure_function_of_spend_specs_and_policies() -> None:
    policies = load_policies()
    spend = [("team_day", "demo", "", "", 6 * 10**9, 0), ("task", "demo", "b", "t", 10**9, 0)]
    lines = budget_lines(spend, [("b", "*", "0.5")], policies, NOW)
    by = {(x.scope, x.id): x for x in lines}
    assert by[("team_day", "demo")].over and by[("team_day", "demo")].used_pct == Decimal("120.00")
    assert by[("task", "b/t")].cap_usd == Decimal("0.5") and by[("task", "b/t")].over
    assert "DATE '2026-04-01'" in budget_spend_sql(NOW)
