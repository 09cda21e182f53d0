"""accounting: the ledger — events, charges and task summaries as Parquet, the audit
chain, DuckDB reports and anomaly rules. Imports neither `scheduler` nor `sandbox`."""

from __future__ import annotations

import importlib
from typing import Any

# Each public name and the module that defines it; imported on first use (PEP 562),
# so `import accounting.<module>` never pays for the heavy ones.
_EXPORTS = {
    "Action": "accounting.policies",
    "anomalies_sql": "accounting.anomalies",
    "AnomalyPolicies": "accounting.policies",
    "AuditError": "accounting.errors",
    "budget_report": "accounting.budget_report",
    "BudgetError": "accounting.errors",
    "BudgetLine": "accounting.budget_report",
    "Bytes": "accounting.units",
    "Charge": "accounting.schemas",
    "charge_id": "accounting.charging",
    "compact": "accounting.compact",
    "ConfigError": "accounting.errors",
    "configs_dir": "accounting.config",
    "connect": "accounting.views",
    "cost_report": "accounting.reports",
    "cost_report_sql": "accounting.reports",
    "CostStatus": "accounting.schemas",
    "CredentialError": "accounting.errors",
    "DATA_SCHEMAS": "accounting.schemas",
    "EngineError": "accounting.errors",
    "Event": "accounting.schemas",
    "EventKind": "accounting.schemas",
    "export": "accounting.export",
    "find_anomalies": "accounting.anomalies",
    "Finding": "accounting.anomalies",
    "format_bytes": "accounting.units",
    "ImageError": "accounting.errors",
    "LedgerError": "accounting.errors",
    "LedgerStore": "accounting.store",
    "LedgerWriter": "accounting.writer",
    "llm_call_charges": "accounting.charging",
    "load_model": "accounting.config",
    "load_policies": "accounting.policies",
    "load_pricing": "accounting.pricing",
    "NUSD_PER_USD": "accounting.pricing",
    "open_store": "accounting.store",
    "parse_bytes": "accounting.units",
    "Policies": "accounting.policies",
    "price_usage": "accounting.pricing",
    "PricedUsage": "accounting.pricing",
    "PriceList": "accounting.pricing",
    "read_yaml": "accounting.config",
    "render": "accounting.reports",
    "Report": "accounting.reports",
    "resolve_data_dir": "accounting.paths",
    "resource_charges": "accounting.charging",
    "row_hash": "accounting.canonical",
    "row_hashes": "accounting.canonical",
    "RULE_SQL": "accounting.anomaly_rules",
    "RULES": "accounting.policies",
    "run_anomalies": "accounting.anomalies",
    "run_sql": "accounting.reports",
    "SandboxError": "accounting.errors",
    "SandfleetError": "accounting.errors",
    "SchedulerError": "accounting.errors",
    "SchemaError": "accounting.errors",
    "SCHEMAS": "accounting.schemas",
    "ServiceCategory": "accounting.schemas",
    "Severity": "accounting.policies",
    "TABLES": "accounting.schemas",
    "TaskState": "accounting.schemas",
    "TaskSummary": "accounting.schemas",
    "TeamPolicy": "accounting.policies",
    "to_table": "accounting.validation",
    "TokenCounts": "accounting.charging",
    "unit_price_nusd": "accounting.pricing",
    "UsageBucket": "accounting.schemas",
    "Usd": "accounting.pricing",
    "verify": "accounting.audit",
    "VerifyReport": "accounting.verify_report",
    "WorkspaceError": "accounting.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
