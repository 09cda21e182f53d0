"""A batch's cost before anything runs: compute from its templates, LLM from prices or history.

Per task, for one attempt (retries after infrastructure failures are not counted):

- **compute** = the template's limits (cpus, memory) x the task's timeout x the compute
  prices of `configs/pricing.yaml` — an upper bound, as if every task ran to its timeout;
- **LLM**, when the task may call a model: the average LLM cost of one attempt of the
  same `task_type` in the ledger's history (`history_llm_costs`, DuckDB over the
  `charges` view), or, with no history, the model's prices x an assumed token budget
  per task (`TokenBudget`). A model the price list does not know is `unpriced`: its
  cost is unknown (None), never 0, and the total is then a lower bound.

A task can never spend more than its own cap (the BudgetKeeper refuses the call or
the lease that would pass it), so each task's estimate is clamped to its cap — its
`budget:`, else the policies' `task.budget_usd` — compute first, then LLM; `capped`
marks the tasks whose estimate reached it (they may well end `budget_exceeded`).

`exceeds_cap(estimate, spec)` is what `sandfleet run` checks (refusing unless `--force`):
the reason the estimate breaks the batch's cap, or None. Pure functions of their data;
only `history_llm_costs` reads the ledger.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from enum import StrEnum
from pathlib import Path
from typing import Any

from accounting.policies import Policies
from accounting.pricing import PriceList, unit_price_nusd
from accounting.schemas import ServiceCategory, UsageBucket
from sandbox.templates import Template, load_template
from scheduler.budget import format_usd
from scheduler.spec import NANO_USD_PER_USD, BatchSpec, TaskSpec

__all__ = [
    "BatchEstimate",
    "History",
    "LlmSource",
    "TaskEstimate",
    "TokenBudget",
    "estimate_batch",
    "estimate_task",
    "exceeds_cap",
    "history_llm_costs",
]


@dataclass(frozen=True)
class TokenBudget:
    """Tokens assumed for one attempt of a task that has no history."""

    input_tokens: int = 200_000
    output_tokens: int = 20_000


@dataclass(frozen=True)
class History:
    """One task type's LLM cost in the ledger: summed over its attempts."""

    llm_nusd: int
    attempts: int

    @property
    def per_attempt_nusd(self) -> int:
        return math.ceil(self.llm_nusd / self.attempts) if self.attempts else 0


class LlmSource(StrEnum):
    """Where a task's LLM estimate comes from."""

    NONE = "none"  # the task calls no model
    HISTORY = "history"  # the task type's average in the ledger
    ASSUMED = "assumed"  # the model's prices x the assumed token budget
    UNPRICED = "unpriced"  # the model has no price: unknown


@dataclass(frozen=True)
class TaskEstimate:
    """One task's estimate (one attempt), in nano-USD."""

    task_id: str
    task_type: str
    template: str
    model: str | None
    timeout_s: int
    compute_nusd: int
    llm_nusd: int | None  # None: unknown (unpriced model)
    llm_source: LlmSource
    cap_nusd: int | None  # the task's cap (its budget, else the policies' default)
    capped: bool = False  # the estimate was clamped to the cap

    @property
    def total_nusd(self) -> int:
        """What is known (compute + a known LLM cost)."""
        return self.compute_nusd + (self.llm_nusd or 0)


@dataclass(frozen=True)
class BatchEstimate:
    """Every task's estimate and the batch's totals."""

    batch_id: str
    team: str
    tasks: tuple[TaskEstimate, ...]

    @property
    def compute_nusd(self) -> int:
        return sum(t.compute_nusd for t in self.tasks)

    @property
    def llm_nusd(self) -> int:
        return sum(t.llm_nusd or 0 for t in self.tasks)

    @property
    def total_nusd(self) -> int:
        return self.compute_nusd + self.llm_nusd

    @property
    def unknown(self) -> int:
        """Tasks whose LLM cost is unknown (unpriced, no cap): the total is a lower bound."""
        return sum(1 for t in self.tasks if t.llm_nusd is None)

    @property
    def capped(self) -> int:
        """Tasks whose estimate reached their own cap."""
        return sum(1 for t in self.tasks if t.capped)

    def groups(self) -> list[dict[str, Any]]:
        """Tasks summed per (task_type, template, model, LLM source), in first-seen order."""
        rows: dict[tuple[str, ...], dict[str, Any]] = {}
        for t in self.tasks:
            key = (t.task_type, t.template, t.model or "", t.llm_source.value)
            row = rows.get(key)
            if row is None:
                row = rows[key] = {"task_type": key[0], "template": key[1], "model": key[2],
                                   "llm_source": key[3], "tasks": 0, "compute_nusd": 0,
                                   "llm_nusd": 0, "total_nusd": 0, "capped": 0}  # fmt: skip
            row["tasks"] += 1
            row["capped"] += int(t.capped)
            row["compute_nusd"] += t.compute_nusd
            row["llm_nusd"] += t.llm_nusd or 0
            row["total_nusd"] += t.total_nusd
        return list(rows.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "batch": self.batch_id,
            "team": self.team,
            "tasks": len(self.tasks),
            "compute_nusd": self.compute_nusd,
            "llm_nusd": self.llm_nusd,
            "total_nusd": self.total_nusd,
            "unknown_llm_tasks": self.unknown,
            "capped_tasks": self.capped,
            "groups": self.groups(),
        }


def _nusd(usd: Decimal | None) -> int | None:
    return None if usd is None else int(usd * NANO_USD_PER_USD)


def _price(prices: PriceList, bucket: UsageBucket, quantity: Decimal | int, model: str = "") -> int:
    unit = unit_price_nusd(prices, bucket, model)
    assert unit is not None, f"{bucket} of {model!r} has no price"
    return math.ceil(unit * quantity)


def estimate_task(
    task: TaskSpec,
    template: Template,
    prices: PriceList,
    history: Mapping[str, History] | None = None,
    tokens: TokenBudget = TokenBudget(),
    default_cap_nusd: int | None = None,
) -> TaskEstimate:
    """One task's estimate (see the module doc); `default_cap_nusd` applies to a task
    without a budget of its own."""
    res, seconds = template.resources, Decimal(task.timeout_s)
    compute = _price(prices, UsageBucket.CPU, Decimal(str(res.cpus)) * seconds) + _price(
        prices, UsageBucket.MEMORY, Decimal(res.memory) / 2**30 * seconds
    )
    llm: int | None = 0
    source = LlmSource.NONE
    past = (history or {}).get(task.task_type)
    if task.model and past is not None and past.attempts:
        llm, source = past.per_attempt_nusd, LlmSource.HISTORY
    elif task.model and prices.find_model(task.model) is None:
        llm, source = None, LlmSource.UNPRICED
    elif task.model:
        llm = _price(prices, UsageBucket.INPUT_UNCACHED, tokens.input_tokens, task.model)
        llm += _price(prices, UsageBucket.OUTPUT, tokens.output_tokens, task.model)
        source = LlmSource.ASSUMED
    cap = task.budget_nusd if task.budget_nusd is not None else default_cap_nusd
    capped = False
    if cap is not None:
        raw = (compute, llm)
        compute = min(compute, cap)
        llm = cap - compute if llm is None else min(llm, cap - compute)
        capped = (compute, llm) != raw
    return TaskEstimate(
        task_id=task.task_id, task_type=task.task_type, template=template.name,
        model=task.model, timeout_s=task.timeout_s, compute_nusd=compute, llm_nusd=llm,
        llm_source=source, cap_nusd=cap, capped=capped,
    )  # fmt: skip


def estimate_batch(
    spec: BatchSpec,
    pricing: PriceList,
    data_dir: str | Path | None = None,
    *,
    policies: Policies | None = None,
    tokens: TokenBudget = TokenBudget(),
    templates: Callable[[str], Template] = load_template,
) -> BatchEstimate:
    """Every task's estimate; LLM history comes from the ledger under `data_dir` (if any);
    `policies` give the cap of tasks without a budget (no cap without them)."""
    history = history_llm_costs(data_dir) if data_dir is not None else {}
    default_cap = _nusd(policies.task.budget_usd) if policies is not None else None
    loaded: dict[str, Template] = {}
    out = []
    for task in spec.task_specs():
        template = loaded.get(task.template)
        if template is None:
            template = loaded[task.template] = templates(task.template)
        out.append(estimate_task(task, template, pricing, history, tokens, default_cap))
    return BatchEstimate(spec.batch_id, spec.team, tuple(out))


def batch_cap_nusd(spec: BatchSpec, policies: Policies | None = None) -> int | None:
    """The batch's cap: its own `budget:`, else the policies' default batch budget."""
    if spec.budget is not None:
        return _nusd(spec.budget)
    return _nusd(policies.batch.budget_usd) if policies is not None else None


def exceeds_cap(
    estimate: BatchEstimate, spec: BatchSpec, policies: Policies | None = None
) -> str | None:
    """Why `sandfleet run` should refuse the batch (its estimate is over its cap), or None."""
    cap = batch_cap_nusd(spec, policies)
    if cap is None or estimate.total_nusd <= cap:
        return None
    n = estimate.unknown
    lower = f" (at least: {n} tasks use models without a price)" if n else ""
    return (
        f"batch {spec.batch_id}: the estimated cost {format_usd(estimate.total_nusd)}{lower} "
        f"(compute {format_usd(estimate.compute_nusd)} + LLM {format_usd(estimate.llm_nusd)} "
        f"over {len(estimate.tasks)} tasks) exceeds its budget {format_usd(cap)}, which would "
        "stop it part way (fix: raise `budget:` in the batch file, lower the timeouts or split "
        "the batch — `sandfleet estimate` shows the breakdown — or run anyway with --force)"
    )


def history_llm_costs(data_dir: str | Path) -> dict[str, History]:
    """Per task type: the LLM cost summed over its attempts in the ledger, and how many
    attempts it has (an attempt that made no call counts, at 0). Empty without a ledger."""
    if "://" not in str(data_dir) and not Path(data_dir, "ledger", "charges").exists():
        return {}
    from accounting.views import connect

    con = connect(data_dir)
    try:
        rows = con.execute(
            """SELECT task_type, sum(llm)::BIGINT, count(*) FROM (
                   SELECT task_type, batch, task, attempt,
                          coalesce(sum(cost_nusd) FILTER (WHERE service_category = ?), 0) AS llm
                   FROM charges WHERE task_type <> '' GROUP BY ALL)
               GROUP BY task_type""",
            [ServiceCategory.AI.value],
        ).fetchall()
    finally:
        con.close()
    return {task_type: History(int(llm), int(n)) for task_type, llm, n in rows}
