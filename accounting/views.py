"""DuckDB views over the ledger's Parquet: `events`, `charges`, `tasks` and `focus`.

Each table view reads `DATA/ledger/<table>/day=*/*.parquet` with Hive partitioning, so
a filter on the `day` column (DATE, UTC) skips whole files; dotfiles (a writer's
temporary segments) and `_`-files are never read. A table with no segment yet is an empty view with
the table's columns. `focus` renames `charges` to FOCUS 1.2 columns (`x_` custom ones).

The glob is evaluated at query time, so segments written after `connect` are seen;
a table that had no file at `connect` time stays empty until the next `connect`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa

from accounting.errors import LedgerError
from accounting.schemas import SCHEMAS, TABLES

if TYPE_CHECKING:
    import duckdb

__all__ = [
    "FOCUS_UNITS",
    "REMOTE_SCHEMES",
    "connect",
    "duckdb_type",
    "empty_view_sql",
    "focus_view_sql",
    "ledger_root",
    "table_glob",
    "table_view_sql",
]

REMOTE_SCHEMES = ("s3://", "gs://", "gcs://", "r2://", "az://", "abfss://", "http://", "https://")
"""URI schemes DuckDB reads itself (through its httpfs / azure extensions)."""

FOCUS_UNITS: Mapping[str, str] = {
    "tokens": "Tokens",
    "core-seconds": "vCPU-Seconds",
    "GiB-seconds": "GiB-Seconds",
    "GiB-hours": "GiB-Hours",
    "bytes": "Bytes",
}
"""Ledger unit -> FOCUS unit spelling (PricingUnit / ConsumedUnit)."""

_PROVIDER_NAMES = {"openai": "OpenAI", "anthropic": "Anthropic", "scripted": "sandfleet (scripted)"}


def ledger_root(data_dir: str | Path) -> str:
    """`DATA/ledger` as DuckDB will read it: a local path or a remote URI."""
    text = str(data_dir)
    if text.startswith("file://"):
        text = text[len("file://") :]
    elif "://" in text and not text.startswith(REMOTE_SCHEMES):
        scheme = text.split("://", 1)[0]
        raise LedgerError(
            f"--data-dir {text!r}: DuckDB cannot read {scheme}:// directly (fix: use a local "
            f"path or one of {', '.join(REMOTE_SCHEMES)}, or copy the ledger locally)"
        )
    if "://" in text:
        return text.rstrip("/") + "/ledger"
    return str(Path(text).expanduser().resolve() / "ledger")


def table_glob(root: str, table: str) -> str:
    """Every committed segment of `table` (dotfiles are temporary, never read)."""
    return f"{root}/{table}/day=*/[!._]*.parquet"


def _q(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def duckdb_type(t: pa.DataType) -> str:
    """The DuckDB type a Parquet column of Arrow type `t` reads as."""
    if pa.types.is_timestamp(t):
        return "TIMESTAMPTZ" if t.tz else "TIMESTAMP"
    if pa.types.is_decimal(t):
        return f"DECIMAL({t.precision}, {t.scale})"
    simple = {
        pa.string(): "VARCHAR",
        pa.large_string(): "VARCHAR",
        pa.int32(): "INTEGER",
        pa.int64(): "BIGINT",
        pa.bool_(): "BOOLEAN",
        pa.float64(): "DOUBLE",
    }
    if t in simple:
        return simple[t]
    if pa.types.is_binary(t) or pa.types.is_fixed_size_binary(t) or pa.types.is_large_binary(t):
        return "BLOB"
    raise LedgerError(f"no DuckDB type for Arrow type {t} (fix: extend accounting.views)")


def table_view_sql(table: str, glob: str) -> str:
    """The view over a table's segments, with `day` (DATE) from the Hive path."""
    return (
        f"CREATE OR REPLACE VIEW {table} AS SELECT * FROM read_parquet({_q(glob)}, "
        "hive_partitioning = true, hive_types = {'day': DATE})"
    )


def empty_view_sql(table: str, schema: pa.Schema) -> str:
    """An empty view with the table's columns (and `day`), for a table with no segment."""
    cols = [f"CAST(NULL AS {duckdb_type(f.type)}) AS {f.name}" for f in schema]
    cols.append("CAST(NULL AS DATE) AS day")
    return f"CREATE OR REPLACE VIEW {table} AS SELECT {', '.join(cols)} WHERE false"


def _usd(expr: str, in_scale: int = 0) -> str:
    # nano-USD -> USD, exactly: a DECIMAL multiplication never goes through a float.
    return f"(CAST({expr} AS DECIMAL(38, {in_scale})) * CAST(0.000000001 AS DECIMAL(10, 9)))"


def focus_view_sql() -> str:
    """`focus`: the `charges` view with FOCUS 1.2 column names and values.

    Deviation from FOCUS: a charge whose `cost_status` is `unknown` keeps NULL cost
    columns (FOCUS wants non-null) — sandfleet never turns an unknown cost into 0.
    """
    cost = _usd("cost_nusd")
    unit_usd = _usd("unit_price_nusd", in_scale=9)
    unit = "CASE unit " + " ".join(f"WHEN {_q(k)} THEN {_q(v)}" for k, v in FOCUS_UNITS.items())
    unit += " ELSE unit END"
    provider = "CASE lower(provider) " + " ".join(
        f"WHEN {_q(k)} THEN {_q(v)}" for k, v in _PROVIDER_NAMES.items()
    )
    provider += " WHEN '' THEN 'sandfleet' ELSE provider END"
    sku = "CASE WHEN model <> '' THEN model ELSE 'sandbox-' || usage_bucket END"
    return f"""CREATE OR REPLACE VIEW focus AS SELECT
  {cost} AS BilledCost,
  {cost} AS EffectiveCost,
  {cost} AS ListCost,
  {cost} AS ContractedCost,
  'USD' AS BillingCurrency,
  'sandfleet' AS BillingAccountId,
  'sandfleet' AS BillingAccountName,
  period_start AS ChargePeriodStart,
  time AS ChargePeriodEnd,
  date_trunc('month', period_start) AS BillingPeriodStart,
  date_trunc('month', period_start) + INTERVAL 1 MONTH AS BillingPeriodEnd,
  'Usage' AS ChargeCategory,
  CAST(NULL AS VARCHAR) AS ChargeClass,
  'Usage-Based' AS ChargeFrequency,
  CASE WHEN model <> '' THEN model || ' ' || replace(usage_bucket, '_', ' ') || ' tokens'
       ELSE 'sandbox ' || usage_bucket || ' (' || unit || ')' END AS ChargeDescription,
  service_category AS ServiceCategory,
  service_name AS ServiceName,
  {provider} AS ProviderName,
  {provider} AS PublisherName,
  'sandfleet' AS InvoiceIssuerName,
  team AS SubAccountId,
  team AS SubAccountName,
  'Team' AS SubAccountType,
  task || '/' || CAST(attempt AS VARCHAR) AS ResourceId,
  task AS ResourceName,
  CASE WHEN model <> '' THEN 'LLM Endpoint' ELSE 'Sandbox' END AS ResourceType,
  {sku} AS SkuId,
  usage_bucket AS SkuMeter,
  price_version || ':' || ({sku}) || ':' || usage_bucket AS SkuPriceId,
  'Standard' AS PricingCategory,
  quantity AS PricingQuantity,
  {unit} AS PricingUnit,
  quantity AS ConsumedQuantity,
  {unit} AS ConsumedUnit,
  {unit_usd} AS ListUnitPrice,
  {unit_usd} AS ContractedUnitPrice,
  CAST(NULL AS VARCHAR) AS RegionId,
  json_object('team', team, 'batch', batch, 'task', task, 'attempt', attempt,
              'task_type', task_type) AS Tags,
  batch AS x_Batch,
  task AS x_Task,
  attempt AS x_Attempt,
  task_type AS x_TaskType,
  usage_bucket AS x_UsageBucket,
  cost_status AS x_CostStatus,
  price_version AS x_PriceVersion,
  model AS x_Model,
  charge_id AS x_ChargeId,
  cost_nusd AS x_CostNanoUsd,
  node AS x_Node,
  day AS x_Day
FROM charges"""


def connect(data_dir: str | Path, *, read_only: bool = True) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB with the ledger's views, session time zone UTC.

    `read_only=True` (the default) then locks the connection down: it can read files
    under `DATA/ledger` and nothing else — no other file, no extension install, no
    ATTACH, and its configuration cannot be changed back. (DuckDB cannot tell reads
    from writes inside an allowed directory, so `sandfleet sql` also refuses
    statements other than queries.)
    """
    import duckdb

    root = ledger_root(data_dir)
    con = duckdb.connect(":memory:")
    try:
        con.execute("SET TimeZone = 'UTC'")
        if root.startswith(REMOTE_SCHEMES):
            ext = "azure" if root.startswith(("az://", "abfss://")) else "httpfs"
            try:
                con.execute(f"LOAD {ext}")
            except duckdb.Error as e:
                raise LedgerError(
                    f"cannot read {root}: DuckDB's {ext} extension did not load ({e}) (fix: run "
                    f"`python -c \"import duckdb; duckdb.sql('INSTALL {ext}')\"` once)"
                ) from None
        for table in TABLES:
            glob = table_glob(root, table)
            (found,) = con.execute("SELECT count(*) FROM glob(?)", [glob]).fetchone() or (0,)
            if found:
                con.execute(table_view_sql(table, glob))
            else:
                con.execute(empty_view_sql(table, SCHEMAS[table]))
        con.execute(focus_view_sql())
        if read_only:
            con.execute("SET allowed_directories = [?]", [root + "/"])
            con.execute("SET enable_external_access = false")
            con.execute("SET autoinstall_known_extensions = false")
            con.execute("SET lock_configuration = true")
    except BaseException:
        con.close()
        raise
    return con
