"""accounting: the ledger — events, charges and task summaries as Parquet, the audit
chain, DuckDB reports and anomaly rules. Imports neither `scheduler` nor `sandbox`."""

from accounting.config import configs_dir, load_model, read_yaml
from accounting.errors import (
    AuditError,
    BudgetError,
    ConfigError,
    CredentialError,
    EngineError,
    ImageError,
    LedgerError,
    SandboxError,
    SandfleetError,
    SchedulerError,
    SchemaError,
    WorkspaceError,
)
from accounting.paths import resolve_data_dir

__all__ = [
    "AuditError",
    "BudgetError",
    "ConfigError",
    "CredentialError",
    "EngineError",
    "ImageError",
    "LedgerError",
    "SandboxError",
    "SandfleetError",
    "SchedulerError",
    "SchemaError",
    "WorkspaceError",
    "configs_dir",
    "load_model",
    "read_yaml",
    "resolve_data_dir",
]
