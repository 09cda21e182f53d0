"""The one exception tree of sandfleet.

It lives in `accounting`, the package every other one may import, so that
`scheduler`, `sandbox` and `accounting` share a single root::

    SandfleetError                  anything sandfleet raises on purpose
    ├── ConfigError                 a config file, template, batch spec or flag is wrong
    ├── EngineError                 the Docker engine (or Ray) cannot be reached or set up
    │   └── ImageError              a sandbox image is missing or failed to build
    ├── SandboxError                a sandbox could not be created, run or cleaned up
    │   └── WorkspaceError          the task's repository could not be cloned or diffed
    ├── LedgerError                 the ledger refused a record or cannot be read
    │   ├── SchemaError             a record is missing a field, or has a float cost, ...
    │   └── AuditError              the audit chain is broken (tampering, lost segment)
    ├── CredentialError             a task token is malformed, forged, expired or revoked
    ├── BudgetError                 a reservation was refused by a cap
    └── SchedulerError              a batch, task or cluster operation failed

Every message says what is wrong and what to do next.
"""

from __future__ import annotations

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
]


class SandfleetError(Exception):
    """Root of every error sandfleet raises on purpose."""


class ConfigError(SandfleetError):
    """A config file, template, batch spec or command-line value is invalid."""


class EngineError(SandfleetError):
    """The container engine (or Ray) cannot be reached or set up."""


class ImageError(EngineError):
    """A sandbox image is missing or failed to build."""


class SandboxError(SandfleetError):
    """A sandbox could not be created, run or cleaned up."""


class WorkspaceError(SandboxError):
    """The task's repository could not be cloned, or its diff collected."""


class LedgerError(SandfleetError):
    """The ledger refused a record, or cannot be read."""


class SchemaError(LedgerError):
    """A record does not match its table's schema."""


class AuditError(LedgerError):
    """The audit chain does not verify."""


class CredentialError(SandfleetError):
    """A task token is malformed, forged, expired, revoked or lacks a scope."""


class BudgetError(SandfleetError):
    """A budget reservation was refused by a cap."""


class SchedulerError(SandfleetError):
    """A batch, task or cluster operation failed."""
