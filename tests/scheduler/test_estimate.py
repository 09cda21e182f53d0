"""The pre-flight estimate: compute from template limits, LLM from prices or the ledger's
history, clamped to each task's cap; the check `sandfleet run` makes; the CLI."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from click.testing import CliRunner

from accounting.charging import TokenCounts, llm_call_charges, resource_charges
from accounting.policies import BatchPolicy, load_policies
from accounting.pricing import load_pricing
from accounting.writer import LedgerWriter
from scheduler.estimate import (
    LlmSource,
    TokenBudget,
    estimate_batch,
    exceeds_cap,
    history_llm_costs,
)
from scheduler.estimate_cli import estimate_cmd
from scheduler.spec import load_batch, parse_batch

PRICES = load_pricing()
REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "configs" / "batches" / "example.yaml"
# minimal: 1 cpu, 512 MiB. One hour: $0.04048 of CPU + 0.5 x $0.004445 of memory.
HOUR_OF_MINIMAL = 40_480_000 + 2_222_500


def _spec(tmp_path: Path, *tasks: dict[str, Any], budget: str | None = None, **defaults: Any):
    rows = [{"repo": ".", "command": "true", **t} for t in tasks]
    data: dict[str, Any] = {"name": "est", "team": "demo", "defaults": defaults, "tasks": rows}
    if budget is not None:
        data["budget"] = budget
    return parse_batch(data, source=tmp_path / "batch.yaml")


def test_compute_is_the_template_limits_for_the_whole_timeout(tmp_path: Path) -> None:
    spec = _spec(tmp_path, {"id": "a"}, {"id": "b", "timeout": 1800}, template="minimal",
                 timeout=3600)  # fmt: skip
    estimate = estimate_batch(spec, PRICES)
    a, b = estimate.tasks
    assert a.compute_nusd == HOUR_OF_MINIMAL and b.compute_nusd == HOUR_OF_MINIMAL // 2
    assert a.llm_source is LlmSource.NONE and a.llm_nusd == 0
    assert estimate.total_nusd == HOUR_OF_MINIMAL * 3 // 2


def test_llm_is_the_model_prices_times_the_assumed_tokens(tmp_path: Path) -> None:
    spec = _spec(tmp_path, {"id": "a", "model": "gpt-4.1-mini"}, timeout=60)
    task = estimate_batch(spec, PRICES, tokens=TokenBudget(1000, 100)).tasks[0]
    assert task.llm_source is LlmSource.ASSUMED
    assert task.llm_nusd == 1000 * 400 + 100 * 1600  # $0.40 and $1.60 per million


def test_an_unpriced_model_is_unknown_never_zero_unless_a_cap_bounds_it(tmp_path: Path) -> None:
    spec = _spec(tmp_path, {"id": "a", "model": "no-such-model"}, timeout=60)
    unbounded = estimate_batch(spec, PRICES)
    assert unbounded.tasks[0].llm_nusd is None and unbounded.unknown == 1
    bounded = estimate_batch(spec, PRICES, policies=load_policies()).tasks[0]
    assert bounded.capped and bounded.total_nusd == 2_000_000_000  # policies: $2.00 per task


def test_a_task_never_costs_more_than_its_own_budget(tmp_path: Path) -> None:
    spec = _spec(tmp_path, {"id": "a", "budget": "0.01"}, {"id": "b"}, template="minimal",
                 timeout=3600, model="gpt-5")  # fmt: skip
    a, b = estimate_batch(spec, PRICES, policies=load_policies()).tasks
    assert a.capped and a.total_nusd == 10_000_000 and a.compute_nusd == 10_000_000
    assert a.llm_nusd == 0  # compute alone reaches the cap
    assert not b.capped and b.total_nusd > a.total_nusd


def _write_history(data_dir: Path) -> None:
    """Three attempts of `bug_fix`: LLM $0.000004 + $0.000002 and one without a call."""
    now = datetime.now(UTC)
    rows = []
    for attempt, calls in ((1, [TokenCounts(input_uncached=5, output=1)]), (2, []),
                           (3, [TokenCounts(input_uncached=1, output=1)])):  # fmt: skip
        who = {"team": "demo", "batch": "old", "task": "t", "attempt": attempt,
               "task_type": "bug_fix", "time": now, "period_start": now}  # fmt: skip
        for i, tokens in enumerate(calls):
            rows += llm_call_charges(PRICES, tokens, call_id=f"c{i}", model="gpt-4.1-mini",
                                     provider="openai", **who)  # fmt: skip
        rows += resource_charges(PRICES, {"cpu": Decimal(2)}, **who)
    with LedgerWriter(data_dir) as writer:
        writer.append("charges", rows)


def test_history_of_the_task_type_in_the_ledger_prices_llm_use(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    _write_history(data_dir)
    history = history_llm_costs(data_dir)
    assert history["bug_fix"].attempts == 3
    assert history["bug_fix"].llm_nusd == (5 * 400 + 1600) + (400 + 1600)
    spec = _spec(tmp_path, {"id": "a", "task_type": "bug_fix"}, {"id": "b", "task_type": "new"},
                 model="gpt-4.1-mini", timeout=60)  # fmt: skip
    a, b = estimate_batch(spec, PRICES, data_dir).tasks
    assert a.llm_source is LlmSource.HISTORY and a.llm_nusd == 1867  # ceil(5600 / 3)
    assert b.llm_source is LlmSource.ASSUMED
    assert history_llm_costs(tmp_path / "no-ledger") == {}


def test_a_batch_over_its_cap_is_refused_with_the_fix(tmp_path: Path) -> None:
    spec = _spec(tmp_path, {"id": "a"}, {"id": "b"}, budget="0.05", template="minimal",
                 timeout=3600)  # fmt: skip
    estimate = estimate_batch(spec, PRICES)
    reason = exceeds_cap(estimate, spec)
    assert reason is not None
    assert "$0.05" in reason and "--force" in reason and "budget:" in reason
    roomy = _spec(tmp_path, {"id": "a"}, budget="1.00", template="minimal", timeout=3600)
    assert exceeds_cap(estimate_batch(roomy, PRICES), roomy) is None
    uncapped = _spec(tmp_path, {"id": "a"}, template="minimal", timeout=3600)
    assert exceeds_cap(estimate_batch(uncapped, PRICES), uncapped) is None
    policies = load_policies()
    tiny = policies.model_copy(update={"batch": BatchPolicy(budget_usd=Decimal("0.01"))})
    assert exceeds_cap(estimate_batch(uncapped, PRICES), uncapped, tiny) is not None


def test_the_cli_prints_the_example_batch_within_its_cap(tmp_path: Path) -> None:
    args = [str(EXAMPLE), "--data-dir", str(tmp_path / "none")]
    shown = CliRunner().invoke(estimate_cmd, args)
    assert shown.exit_code == 0, shown.output
    assert "example-" in shown.output and "within the batch cap $1.00" in shown.output
    as_json = CliRunner().invoke(estimate_cmd, [*args, "--json"])
    doc = json.loads(as_json.output)
    expected = estimate_batch(load_batch(EXAMPLE), PRICES, policies=load_policies())
    assert doc["total_nusd"] == expected.total_nusd > 0 and doc["tasks"] == 3
    assert doc["exceeds_cap"] is False and doc["cap_nusd"] == 1_000_000_000
    assert [g["task_type"] for g in doc["groups"]] == ["shell"]
