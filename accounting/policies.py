"""`configs/policies.yaml`: team fair share, quotas and budget caps, and anomaly rules.

Money is an exact `Decimal` (see `accounting.pricing.Usd`); memory is bytes (or a
size like `8g`, binary units); a cap of `null` means "no cap".
"""

from __future__ import annotations

import re
from decimal import Decimal
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from accounting.config import configs_dir, load_model
from accounting.pricing import Usd
from accounting.units import Bytes, parse_bytes

__all__ = [
    "RULES",
    "Action",
    "AnomalyPolicies",
    "AnomalyRule",
    "BatchPolicy",
    "CostOutlierRule",
    "CpuPeggedRule",
    "DeniedEgressRule",
    "MemoryPressureRule",
    "Policies",
    "RepeatedCommandRule",
    "RunawayLlmRule",
    "SensitiveFilesRule",
    "Severity",
    "StuckRule",
    "TaskPolicy",
    "TeamOverride",
    "TeamPolicy",
    "load_policies",
    "parse_bytes",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TeamPolicy(_Strict):
    """One team's share, quotas and caps (every field resolved)."""

    weight: float = Field(gt=0, description="Fair-share weight against other teams.")
    max_sandboxes: int = Field(gt=0, description="Most sandboxes running at once.")
    max_cpus: float = Field(gt=0, description="Most CPUs (sum of sandbox limits) at once.")
    max_memory: Bytes = Field(description="Most memory (sum of limits), bytes or '8g'.")
    daily_usd: Usd | None = Field(description="Spend cap per UTC day; null = no cap.")
    monthly_usd: Usd | None = Field(description="Spend cap per UTC calendar month; null = no cap.")


class TeamOverride(_Strict):
    """A listed team: any field left out comes from `defaults`."""

    weight: float | None = Field(default=None, gt=0, description="Fair-share weight.")
    max_sandboxes: int | None = Field(default=None, gt=0, description="Most sandboxes at once.")
    max_cpus: float | None = Field(default=None, gt=0, description="Most CPUs at once.")
    max_memory: Bytes | None = Field(default=None, description="Most memory, bytes or '8g'.")
    daily_usd: Usd | None = Field(default=None, description="Daily cap; null here = no cap.")
    monthly_usd: Usd | None = Field(default=None, description="Monthly cap; null here = no cap.")


class BatchPolicy(_Strict):
    """Defaults for a batch whose spec sets no budget of its own."""

    budget_usd: Usd | None = Field(default=None, description="Cap per batch; null = no cap.")


class TaskPolicy(_Strict):
    """Defaults for a task whose batch sets no per-task budget."""

    budget_usd: Usd | None = Field(default=None, description="Cap per task; null = no cap.")


class Action(StrEnum):
    """What happens when a rule fires."""

    ALERT = "alert"  # record the finding, show it
    STOP = "stop"  # record it and stop the task attempt
    ESCALATE = "escalate"  # record it and notify a person (webhook)


class Severity(StrEnum):
    """How bad a finding is."""

    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"
    CRITICAL = "critical"


class AnomalyRule(_Strict):
    """What every rule has: on/off, its action, severity and escalation webhook."""

    enabled: bool = Field(default=True, description="Run this rule.")
    action: Action = Field(default=Action.ALERT, description="alert, stop or escalate.")
    severity: Severity = Field(default=Severity.MEDIUM, description="low .. critical.")
    webhook: str | None = Field(default=None, description="http(s) URL notified on escalate.")

    @field_validator("webhook")
    @classmethod
    def _webhook_is_http(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^https?://[^\s/]+", v):
            raise ValueError(f"webhook {v!r} must be an http:// or https:// URL")
        return v

    @model_validator(mode="after")
    def _webhook_only_for_escalate(self) -> AnomalyRule:
        if self.webhook is not None and self.action is not Action.ESCALATE:
            raise ValueError("webhook is only used with action: escalate; remove it or escalate")
        return self


class RepeatedCommandRule(AnomalyRule):
    """(1) The same command started >= min_repeats times within window_minutes."""

    action: Action = Field(default=Action.STOP, description="A loop stops the attempt.")

    min_repeats: int = Field(default=10, ge=2, description="Starts of one command that fire.")
    window_minutes: float = Field(default=5, gt=0, description="Sliding window length.")
    normalize_numbers: bool = Field(default=True, description="Treat 1, 42 and 0xff as equal.")


class RunawayLlmRule(AnomalyRule):
    """(2) Too many LLM calls in a window, or a minute far above the attempt's own history."""

    max_calls_per_window: int = Field(default=60, gt=0, description="Calls that fire.")
    window_minutes: float = Field(default=1, gt=0, description="Sliding window length.")
    robust_z: float = Field(default=6.0, gt=0, description="Tokens-per-minute robust z that fires.")
    min_history_minutes: int = Field(
        default=10, ge=3, description="Active minutes an attempt needs before z applies."
    )


class CostOutlierRule(AnomalyRule):
    """(3) An attempt's cost far above peers of the same task_type (median / MAD)."""

    min_peers: int = Field(default=20, ge=3, description="Attempts of the type needed first.")
    robust_z: float = Field(default=3.5, gt=0, description="0.6745*(cost-median)/MAD that fires.")
    mad_zero_factor: float = Field(default=3.0, gt=1, description="When MAD=0: cost > k x median.")
    min_cost_usd: Usd = Field(default=Decimal(0), description="Never flag cheaper attempts.")


class CpuPeggedRule(AnomalyRule):
    """(4) CPU at >= min_pct_of_limit of the container's limit for >= min_minutes."""

    min_pct_of_limit: float = Field(default=95, gt=0, le=100, description="Percent of the limit.")
    min_minutes: float = Field(default=10, gt=0, description="Length of the stretch that fires.")


class MemoryPressureRule(AnomalyRule):
    """(5) Memory above a fraction of its limit, or its trend reaching the limit soon."""

    max_fraction_of_limit: float = Field(default=0.9, gt=0, le=1, description="Fires above this.")
    oom_horizon_minutes: float = Field(default=5, gt=0, description="Trend hits limit within.")
    trend_window_minutes: float = Field(default=10, gt=0, description="Samples used for trend.")
    min_samples: int = Field(default=5, ge=3, description="Samples needed for a trend.")


class DeniedEgressRule(AnomalyRule):
    """(6) Repeated denied egress, or any attempt to reach a metadata address."""

    min_denied: int = Field(default=3, ge=1, description="Denials in the window that fire.")
    window_minutes: float = Field(default=15, gt=0, description="Sliding window length.")
    always_flag_hosts: list[str] = Field(
        default_factory=lambda: ["169.254.169.254", "metadata.google.internal", "fd00:ec2::254"],
        description="Hosts whose single denied attempt fires (cloud metadata services).",
    )


class SensitiveFilesRule(AnomalyRule):
    """(7) Credential paths read or touched; persistence / CI / shell-rc files written."""

    action: Action = Field(default=Action.STOP, description="Reaching for credentials stops it.")

    credential_patterns: list[str] = Field(
        default_factory=lambda: [
            r"(^|/)\.ssh/(id_[^/]*|authorized_keys)$",
            r"(^|/)\.aws/credentials$",
            r"(^|/)\.(netrc|git-credentials|npmrc|pypirc)$",
            r"(^|/)\.docker/config\.json$",
            r"(^|/)\.config/gh/hosts\.yml$",
            r"(^|/)\.kube/config$",
            r"^/etc/(shadow|sudoers)$",
            r"^/proc/[0-9]+/environ$",
        ],
        description="Regexes (RE2) for credential files: any read, change or command naming one.",
    )
    persistence_patterns: list[str] = Field(
        default_factory=lambda: [
            r"(^|/)\.git/hooks/",
            r"(^|/)\.github/workflows/",
            r"(^|/)\.gitlab-ci\.yml$",
            r"(^|/)\.(bashrc|bash_profile|bash_login|profile|zshrc|zprofile|zshenv)$",
            r"^/etc/(cron|systemd)",
        ],
        description="Regexes (RE2) for hooks, CI workflows and shell rc files: any write.",
    )

    @field_validator("credential_patterns", "persistence_patterns")
    @classmethod
    def _patterns_compile(cls, v: list[str]) -> list[str]:
        for p in v:
            try:
                re.compile(p)
            except re.error as e:
                raise ValueError(f"pattern {p!r} is not a valid regex: {e}") from None
        return v


class StuckRule(AnomalyRule):
    """(8) Running with no command, file or LLM event for idle_minutes."""

    action: Action = Field(default=Action.ESCALATE, description="A person looks at it.")

    idle_minutes: float = Field(default=15, gt=0, description="Quiet minutes that fire.")


class AnomalyPolicies(_Strict):
    """The eight rules, each with its thresholds and action."""

    repeated_command: RepeatedCommandRule = Field(default_factory=RepeatedCommandRule)
    runaway_llm: RunawayLlmRule = Field(default_factory=RunawayLlmRule)
    cost_outlier: CostOutlierRule = Field(default_factory=CostOutlierRule)
    cpu_pegged: CpuPeggedRule = Field(default_factory=CpuPeggedRule)
    memory_pressure: MemoryPressureRule = Field(default_factory=MemoryPressureRule)
    denied_egress: DeniedEgressRule = Field(default_factory=DeniedEgressRule)
    sensitive_files: SensitiveFilesRule = Field(default_factory=SensitiveFilesRule)
    stuck: StuckRule = Field(default_factory=StuckRule)


RULES: tuple[str, ...] = tuple(AnomalyPolicies.model_fields)
"""The rule names, in their documented order (1..8)."""


class Policies(_Strict):
    """`configs/policies.yaml`."""

    defaults: TeamPolicy = Field(description="Share, quotas and caps of any team not listed.")
    teams: dict[str, TeamOverride] = Field(
        default_factory=dict, description="Per team: fields that differ from `defaults`."
    )
    batch: BatchPolicy = Field(default_factory=BatchPolicy, description="Batch defaults.")
    task: TaskPolicy = Field(default_factory=TaskPolicy, description="Task defaults.")
    anomalies: AnomalyPolicies = Field(
        default_factory=AnomalyPolicies, description="Anomaly rules: thresholds and actions."
    )

    @field_validator("teams", mode="before")
    @classmethod
    def _teams_mapping(cls, v: Any) -> Any:
        return {} if v is None else v

    def team(self, name: str) -> TeamPolicy:
        """The resolved policy of `name` (its overrides on top of `defaults`)."""
        override = self.teams.get(name)
        if override is None:
            return self.defaults
        update = {k: getattr(override, k) for k in override.model_fields_set}
        return self.defaults.model_copy(update=update)


def load_policies(path: Path | str | None = None) -> Policies:
    """Load and validate the policies (default `configs/policies.yaml`)."""
    p = Path(path) if path is not None else configs_dir() / "policies.yaml"
    return load_model(p, Policies)
