"""DuckDB views over real Parquet written by the LedgerWriter."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import duckdb
import pytest

from accounting.charging import TokenCounts, llm_call_charges, resource_charges
from accounting.errors import LedgerError
from accounting.pricing import load_pricing
from accounting.schemas import SCHEMAS, TABLES, Event, EventKind
from accounting.views import connect, ledger_root
from accounting.writer import LedgerWriter

PRICES = load_pricing()
DAY1 = datetime(2026, 4, 30, 23, 59, 30, tzinfo=UTC)
DAY2 = datetime(2026, 5, 1, 0, 0, 30, tzinfo=UTC)

FOCUS_COLUMNS = {
    "BilledCost",
    "EffectiveCost",
    "ListCost",
    "ContractedCost",
    "BillingCurrency",
    "BillingAccountId",
    "BillingAccountName",
    "ChargePeriodStart",
    "ChargePeriodEnd",
    "BillingPeriodStart",
    "BillingPeriodEnd",
    "ChargeCategory",
    "ChargeClass",
    "ChargeDescription",
    "ServiceCategory",
    "ServiceName",
    "ProviderName",
    "PublisherName",
    "InvoiceIssuerName",
    "SubAccountId",
    "SubAccountName",
    "ResourceId",
    "ResourceName",
    "ResourceType",
    "SkuId",
    "PricingQuantity",
    "PricingUnit",
    "ConsumedQuantity",
    "ConsumedUnit",
    "ListUnitPrice",
    "Tags",
    "x_Batch",
    "x_Task",
    "x_Attempt",
    "x_TaskType",
    "x_UsageBucket",
    "x_CostStatus",
    "x_PriceVersion",
    "x_Model",
    "x_ChargeId",
}


@pytest.fixture(autouse=True)
def _audit_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SANDFLEET_AUDIT_KEY", str(tmp_path / "keys" / "audit.pem"))


def _charges(when: datetime, task: str, model: str = "gpt-4.1") -> list:
    out = llm_call_charges(
        PRICES,
        TokenCounts(input_uncached=1000, input_cache_read=3000, output=200),
        call_id=f"call-{task}",
        model=model,
        provider="openai",
        time=when,
        period_start=when - timedelta(seconds=2),
        team="ml",
        batch="b1",
        task=task,
        attempt=1,
        task_type="fix",
    )
    out += resource_charges(
        PRICES,
        {"cpu": Decimal(90), "egress": 5000},
        time=when,
        period_start=when - timedelta(minutes=1),
        team="ml",
        batch="b1",
        task=task,
        attempt=1,
        task_type="fix",
    )
    return out


def _write(data_dir: Path, table: str, rows: list) -> None:
    with LedgerWriter(data_dir) as w:
        w.append(table, rows)


def test_an_empty_ledger_has_every_view_with_the_contract_columns(data_dir: Path) -> None:
    con = connect(data_dir)
    for table in TABLES:
        cols = [r[0] for r in con.execute(f"DESCRIBE {table}").fetchall()]
        assert cols == [*SCHEMAS[table].names, "day"]
        assert con.execute(f"SELECT count(*) FROM {table}").fetchone() == (0,)
    focus = {r[0] for r in con.execute("DESCRIBE focus").fetchall()}
    assert focus >= FOCUS_COLUMNS


def test_rows_written_by_the_writer_are_in_the_views_with_their_utc_day(data_dir: Path) -> None:
    _write(data_dir, "charges", _charges(DAY1, "t1") + _charges(DAY2, "t2"))
    con = connect(data_dir)
    rows = con.execute("SELECT task, day, CAST(time AS DATE) FROM charges ORDER BY task").fetchall()
    assert {(t, d) for t, d, _ in rows} == {("t1", DAY1.date()), ("t2", DAY2.date())}
    assert all(d == td for _, d, td in rows)
    cols = [r[0] for r in con.execute("DESCRIBE charges").fetchall()]
    assert cols == [*SCHEMAS["charges"].names, "day"]


def test_a_day_filter_skips_the_other_days_files(data_dir: Path) -> None:
    _write(data_dir, "charges", _charges(DAY1, "t1") + _charges(DAY2, "t2"))
    # Make day 2's segment unreadable: a query that still reads it fails; one that prunes
    # it by its day partition does not.
    (segment,) = (data_dir / "ledger" / "charges" / f"day={DAY2.date()}").glob("*.parquet")
    segment.write_bytes(b"not parquet at all")
    con = connect(data_dir)
    n = con.execute(f"SELECT count(*) FROM charges WHERE day = DATE '{DAY1.date()}'").fetchone()
    assert n == (5,)
    with pytest.raises(duckdb.Error):
        con.execute("SELECT count(*) FROM charges").fetchone()


def test_temporary_dotfiles_in_a_partition_are_never_read(data_dir: Path) -> None:
    _write(data_dir, "charges", _charges(DAY1, "t1"))
    part = data_dir / "ledger" / "charges" / f"day={DAY1.date()}"
    (part / ".half-written.parquet.tmp").write_bytes(b"PAR1 garbage")
    (part / ".half-written.parquet").write_bytes(b"PAR1 garbage")
    con = connect(data_dir)
    assert con.execute("SELECT count(*) FROM charges").fetchone() == (5,)


def test_segments_written_after_connect_are_seen(data_dir: Path) -> None:
    _write(data_dir, "charges", _charges(DAY1, "t1"))
    con = connect(data_dir)
    _write(data_dir, "charges", _charges(DAY2, "t2"))
    assert con.execute("SELECT count(DISTINCT task) FROM charges").fetchone() == (2,)


def test_focus_costs_are_exact_usd_decimals_of_the_nano_usd_costs(data_dir: Path) -> None:
    rows = _charges(DAY1, "t1") + _charges(DAY2, "t2", model="not-priced")
    _write(data_dir, "charges", rows)
    con = connect(data_dir)
    got = con.execute(
        "SELECT x_ChargeId, BilledCost, EffectiveCost, ListCost, ContractedCost, x_CostStatus, "
        "ListUnitPrice, PricingQuantity, BillingCurrency, ChargeCategory, SubAccountId, "
        "ResourceId, ServiceCategory FROM focus"
    ).fetchall()
    by_id = {c.charge_id: c for c in rows}
    assert len(got) == len(rows)
    for cid, billed, eff, lst, con_, status, unit_usd, qty, cur, cat, sub, res, svc in got:
        c = by_id[cid]
        assert status == c.cost_status and cur == "USD" and cat == "Usage" and sub == "ml"
        assert res == f"{c.task}/1" and svc == c.service_category
        if c.cost_nusd is None:
            assert billed is None and eff is None and lst is None and unit_usd is None
            continue
        assert billed == eff == lst == con_ == Decimal(c.cost_nusd) / 10**9
        assert isinstance(billed, Decimal)
        assert abs(unit_usd * qty - lst) <= Decimal("0.0000000005")  # ListCost ~ price x qty


def test_focus_maps_providers_skus_units_and_tags(data_dir: Path) -> None:
    _write(data_dir, "charges", _charges(DAY1, "t1"))
    con = connect(data_dir)
    rows = con.execute(
        "SELECT x_UsageBucket, SkuId, ProviderName, PricingUnit, ResourceType, "
        "json_extract_string(Tags, '$.task_type'), BillingPeriodStart FROM focus "
        "ORDER BY x_UsageBucket"
    ).fetchall()
    by = {r[0]: r[1:] for r in rows}
    assert by["output"][:4] == ("gpt-4.1", "OpenAI", "Tokens", "LLM Endpoint")
    assert by["cpu"][:4] == ("sandbox-cpu", "sandfleet", "vCPU-Seconds", "Sandbox")
    assert by["egress"][2] == "Bytes"
    assert {r[5] for r in rows} == {"fix"}
    assert {r[6].date().isoformat() for r in rows} == {"2026-04-01"}


def test_a_read_only_connection_reads_the_ledger_and_nothing_else(
    data_dir: Path, tmp_path: Path
) -> None:
    _write(
        data_dir,
        "events",
        [Event(DAY1, "ml", "b", "t", 1, "n", EventKind.GATE_RESULT, {"gate": "x"})],
    )
    outside = tmp_path / "secret.csv"
    outside.write_text("a\n1\n")
    con = connect(data_dir)
    assert con.execute("SELECT count(*) FROM events").fetchone() == (1,)
    with pytest.raises(duckdb.PermissionException):
        con.execute(f"SELECT * FROM read_csv('{outside}')")
    with pytest.raises(duckdb.PermissionException):
        con.execute(f"COPY (SELECT 1) TO '{tmp_path / 'out.csv'}'")
    with pytest.raises(duckdb.Error, match="locked"):
        con.execute("SET enable_external_access = true")


def test_a_writable_connection_can_export(data_dir: Path, tmp_path: Path) -> None:
    _write(data_dir, "charges", _charges(DAY1, "t1"))
    con = connect(data_dir, read_only=False)
    con.execute(f"COPY (SELECT * FROM focus) TO '{tmp_path / 'focus.parquet'}'")
    assert (tmp_path / "focus.parquet").stat().st_size > 0


def test_local_paths_and_file_uris_work_and_unreadable_schemes_are_refused(
    data_dir: Path,
) -> None:
    assert ledger_root(f"file://{data_dir}") == str(data_dir.resolve() / "ledger")
    assert ledger_root("s3://bucket/prefix/") == "s3://bucket/prefix/ledger"
    with pytest.raises(LedgerError, match=r"hdfs://.*fix: use a local path"):
        ledger_root("hdfs://namenode/data")
