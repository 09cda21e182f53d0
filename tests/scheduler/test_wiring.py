"""The fleet wired together: the ledger tees rows to the Monitor, a rule stops an attempt
through the scheduler, budgets end or hold tasks, and the runner's costs reach `tasks`.

Ray tests run on a real local Ray (2 CPUs, 2 sandbox slots) with the real ledger actor;
the budget keeper is a small stub actor under the keeper's name, so these tests prove
the scheduler's side of the contract whatever the keeper's state.
"""

from __future__ import annotations

import itertools
import sys
import types
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml

from accounting.policies import Policies, load_policies
from accounting.schemas import TaskState
from scheduler.book import FleetBook
from scheduler.event_builder import AttemptEvents
from scheduler.fleet import BUDGET_NAME, get_scheduler
from scheduler.ledger_actor import NAMESPACE, get_ledger
from scheduler.plan import Backend, Plan, plan_batch
from scheduler.queue import Capacity, FleetQueue
from scheduler.records import attempt_summary
from scheduler.spec import parse_batch
from scheduler.state import judge_result, next_step, queue_policies
from scheduler.testing import (
    containers_of,
    flush_ledger,
    last_states,
    local_ray,
    make_plan,
    remove_containers,
    source_dir,
    state_rows,
    stop_fleet,
    terminal_counts,
)

POLICIES = {
    "defaults": {"weight": 1, "max_sandboxes": 2, "max_cpus": 8, "max_memory": "8g",
                 "daily_usd": None, "monthly_usd": None},
}  # fmt: skip


# -- pure: the book and the tasks row ---------------------------------------------------


def _plan(tmp_path: Path, n: int, max_attempts: int = 3) -> Plan:
    data = {
        "name": "pure",
        "team": "t",
        "defaults": {"template": "minimal", "max_attempts": max_attempts},
        "tasks": [{"id": f"k{i}", "repo": ".", "command": "true"} for i in range(n)],
    }
    spec = parse_batch(data, source=tmp_path / "pure.yaml")
    return plan_batch(spec, backend=Backend.FAKE, policies=Policies.model_validate(POLICIES))


@pytest.fixture
def book() -> FleetBook:
    teams, default = queue_policies(Policies.model_validate(POLICIES))
    ticks = itertools.count()
    start = datetime(2026, 5, 1, tzinfo=UTC)
    return FleetBook(FleetQueue(teams, default), node="head",
                     clock=lambda: start + timedelta(seconds=next(ticks)))  # fmt: skip


def _events(book: FleetBook) -> list[Any]:
    return [r for table, rs in book.take_rows() if table == "events" for r in rs]


def test_a_runner_result_of_budget_exceeded_is_terminal_and_never_retried(
    book: FleetBook, tmp_path: Path
) -> None:
    plan = _plan(tmp_path, 1, max_attempts=3)
    book.register(plan, {"k0": 1}, {})
    (attempt,) = book.admit(Capacity(slots=1))
    result = {"outcome": "budget_exceeded", "exit_code": 4, "error": "task cap $0.01 reached",
              "costs": {"llm_nusd": 10_000_000, "compute_nusd": 5}, "tokens_input": 7,
              "tokens_output": 3, "llm_calls": 1}  # fmt: skip
    step = next_step(judge_result(result), attempt.number, attempt.task.spec.max_attempts)
    assert not step.retry
    book.finish(attempt, result, step)
    rows = dict(book.take_rows())
    assert [e.payload["state"] for e in rows["events"]][-1] == "budget_exceeded"
    assert "task cap $0.01 reached" in rows["events"][-1].payload["reason"]
    (summary,) = rows["tasks"]
    assert summary.outcome is TaskState.BUDGET_EXCEEDED
    assert (summary.cost_llm_nusd, summary.cost_compute_nusd, summary.cost_total_nusd) == (
        10_000_000, 5, 10_000_005,
    )  # fmt: skip
    assert (summary.tokens_input, summary.tokens_output, summary.llm_calls) == (7, 3, 1)
    assert len(book.queue) == 0 and book.done(plan.batch_id)


def test_a_tasks_row_without_costs_has_zeros(tmp_path: Path) -> None:
    spec = _plan(tmp_path, 1).tasks[0]
    row = attempt_summary(spec, attempt=1, outcome=TaskState.SUCCEEDED, template="minimal",
                          result={"outcome": "succeeded"}, node="n", started=None,
                          time=datetime(2026, 5, 1, tzinfo=UTC))  # fmt: skip
    assert (row.cost_total_nusd, row.tokens_input, row.llm_calls) == (0, 0, 0)


def test_a_rule_stop_ends_the_attempt_stopped_by_rule_once_and_refuses_a_stale_attempt(
    book: FleetBook, tmp_path: Path
) -> None:
    plan = _plan(tmp_path, 1)
    book.register(plan, {"k0": 1}, {})
    (attempt,) = book.admit(Capacity(slots=1))
    key = f"{plan.batch_id}/k0"
    stop = TaskState.STOPPED_BY_RULE
    assert book.cancel(key, outcome=stop, reason="rule loop", attempt=2) is None  # stale
    assert not attempt.cancelled
    assert book.cancel(key, outcome=stop, reason="rule loop", attempt=1) == (0, [attempt])
    assert book.cancel(key, outcome=stop, reason="again", attempt=1) == (0, [])  # once
    # The stopped attempt comes back as Ray's cancellation (judged as cancelled).
    book.finish(attempt, None, next_step(judge_result({"outcome": "failed"}), 1, 3))
    states = [(e.payload["state"], e.payload["reason"]) for e in _events(book)]
    assert states[-1] == ("stopped_by_rule", "rule loop")
    assert sum(s == "stopped_by_rule" for s, _ in states) == 1 and book.done(plan.batch_id)


def test_an_exhausted_team_waits_parked_and_an_exhausted_batch_ends_its_queue(
    book: FleetBook, tmp_path: Path
) -> None:
    plan = _plan(tmp_path, 4)
    book.register(plan, {f"k{i}": 1 for i in range(4)}, {})
    assert book.hold_team("t") == 4
    assert book.admit(Capacity(slots=4)) == [] and book.waiting_teams() == {"t"}
    assert book.snapshot()["teams"]["t"]["queued"] == 4
    assert book.release_team("t") == 4
    assert len(book.admit(Capacity(slots=4))) == 2  # team quota 2
    assert book.exhaust_batch(plan.batch_id) == 2
    ended = [e for e in _events(book) if e.payload["state"] == "budget_exceeded"]
    assert {e.payload["reason"] for e in ended} == {"batch budget reached"} and len(ended) == 2


# -- Ray: the tee, the stop, the keeper ---------------------------------------------------


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    with local_ray(num_cpus=2, slots=2) as tmp:
        yield tmp


@pytest.fixture
def policies_path(tmp_path: Path) -> Path:
    path = tmp_path / "policies.yaml"
    path.write_text(yaml.safe_dump(POLICIES))
    return path


@pytest.fixture
def audit_key(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SANDFLEET_AUDIT_KEY", str(tmp_path / "keys" / "audit.pem"))


@pytest.fixture
def fleet(cluster: str, audit_key: None) -> Iterator[None]:
    yield
    stop_fleet()  # the scheduler, gateways, keeper (or its stub), monitor and ledger


@ray.remote(num_cpus=0)
class StubKeeper:
    """The BudgetKeeper's scheduler-facing methods, with exhaustion set by the test."""

    def __init__(self, batches: list[str], teams: list[str]) -> None:
        self.batches, self.teams = set(batches), set(teams)
        self.registered: list[tuple[str, str]] = []

    def register_batch(self, batch_id: str, team: str, **caps: Any) -> None:
        self.registered.append((batch_id, team))

    def exhausted(self, batches: list[str], teams: list[str]) -> list[bool]:
        return [b in self.batches for b in batches] + [t in self.teams for t in teams]

    def exhaust(self, batches: list[str], teams: list[str]) -> None:
        self.batches, self.teams = set(batches), set(teams)

    def seen(self) -> list[tuple[str, str]]:
        return self.registered


def _keeper(batches: list[str], teams: list[str]) -> Any:
    return StubKeeper.options(name=BUDGET_NAME, namespace=NAMESPACE,  # type: ignore[attr-defined]
                              lifetime="detached").remote(batches, teams)  # fmt: skip


@pytest.mark.ray
def test_the_ledger_tees_what_it_accepts_to_the_monitor_whose_live_state_shows_the_task(
    fleet: None, data_dir: Path, wait_for: Any
) -> None:
    from scheduler.monitor_actor import get_monitor

    monitor = get_monitor("127.0.0.1", 0)
    ray.get(monitor.url.remote())
    ledger = get_ledger(str(data_dir))
    a = AttemptEvents("ml", "tee-batch", "t1")
    assert ray.get(ledger.append.remote("events", [a.state(0, "running")])) == 1

    def running() -> bool:
        return ray.get(monitor.fleet.remote())["states"] == {"running": 1}

    wait_for(running, timeout=60, what="the Monitor to show the teed running task")
    stats = ray.get(ledger.tee_stats.remote())
    assert stats["monitor"] and stats["sent"] >= 1 and stats["dropped"] == 0

    # Appends in quick succession reach the Monitor gathered, in order, in fewer calls.
    rows = [a.state(0, "succeeded")]
    rows += [AttemptEvents("ml", "tee-batch", f"t{i}").state(0, "running") for i in range(2, 42)]
    for row in rows:
        ledger.append.remote("events", [row])

    def all_seen() -> bool:
        return ray.get(monitor.fleet.remote())["states"] == {"succeeded": 1, "running": 40}

    wait_for(all_seen, timeout=60, what="the Monitor to show all 41 teed states")
    after = ray.get(ledger.tee_stats.remote())
    assert after["sent"] - stats["sent"] == 41 and after["dropped"] == 0
    assert after["calls"] - stats["calls"] < 41  # gathered, not one call per append


@pytest.mark.ray
def test_a_monitor_started_after_the_ledger_gets_the_rows_appended_once_it_answers(
    fleet: None, data_dir: Path, wait_for: Any
) -> None:
    """As `sandfleet run` starts them: the ledger first (its tee finds no Monitor), the
    Monitor a moment later; the first rows after it answers reach it, none dropped."""
    from scheduler.monitor_actor import get_monitor

    ledger = get_ledger(str(data_dir))
    wait_for(lambda: ray.get(ledger.tee_stats.remote())["lookups"] >= 1, timeout=20,
             what="the tee's timer to look for a Monitor")  # fmt: skip
    assert ray.get(ledger.tee_stats.remote())["monitor"] is False  # and it found none
    monitor = get_monitor("127.0.0.1", 0)
    ray.get(monitor.url.remote())
    a = AttemptEvents("ml", "late-monitor", "t1")
    assert ray.get(ledger.append.remote("events", [a.state(0, "running")])) == 1
    wait_for(lambda: ray.get(monitor.fleet.remote())["states"] == {"running": 1},
             timeout=20, what="the Monitor to show the row appended once it answered")  # fmt: skip
    stats = ray.get(ledger.tee_stats.remote())
    assert stats["monitor"] and stats["sent"] == 1 and stats["dropped"] == 0


@pytest.mark.ray
def test_an_exhausted_batch_is_never_admitted_its_tasks_end_budget_exceeded(
    fleet: None, data_dir: Path, tmp_path: Path, policies_path: Path
) -> None:
    plan = make_plan(tmp_path, "spent-batch", "t", ["true"] * 4, backend=Backend.FAKE,
                     policies_path=policies_path)  # fmt: skip
    keeper = _keeper([plan.batch_id], [])
    scheduler = get_scheduler(str(data_dir), policies=load_policies(policies_path))
    ray.get(scheduler.submit.remote(plan))
    status = ray.get(scheduler.wait.remote(plan.batch_id, 120.0))
    assert status["batches"][plan.batch_id]["states"] == {"budget_exceeded": 4}
    assert ray.get(keeper.seen.remote()) == [(plan.batch_id, "t")]
    flush_ledger()
    rows = state_rows(str(data_dir), plan.batch_id)
    assert {r["state"] for r in rows} == {"queued", "budget_exceeded"}  # nothing ran
    assert {r["reason"] for r in rows if r["state"] == "budget_exceeded"} == {
        "batch budget reached"
    }
    assert set(terminal_counts(rows).values()) == {1}


@pytest.mark.ray
def test_an_exhausted_teams_tasks_wait_queued_until_it_may_spend_again(
    fleet: None, data_dir: Path, tmp_path: Path, policies_path: Path, wait_for: Any
) -> None:
    plan = make_plan(tmp_path, "held-batch", "t", ["true"] * 3, backend=Backend.FAKE,
                     policies_path=policies_path)  # fmt: skip
    keeper = _keeper([], ["t"])
    scheduler = get_scheduler(str(data_dir), policies=load_policies(policies_path))
    ray.get(scheduler.submit.remote(plan))
    wait_for(lambda: ray.get(scheduler.status.remote())["budget"]["held_teams"] == ["t"],
             timeout=60, what="the scheduler to hold team t")  # fmt: skip
    status = ray.get(scheduler.status.remote(plan.batch_id))
    assert status["batches"][plan.batch_id]["states"] == {"queued": 3}
    assert status["cluster"]["in_use"] == 0 and status["teams"]["t"]["admitted"] == 0
    ray.get(keeper.exhaust.remote([], []))
    status = ray.get(scheduler.wait.remote(plan.batch_id, 120.0))
    assert status["batches"][plan.batch_id]["states"] == {"succeeded": 3}


@pytest.mark.ray
@pytest.mark.docker
def test_a_monitor_stop_ends_a_real_sandbox_stopped_by_rule_once_with_no_container_left(
    fleet: None, data_dir: Path, tmp_path: Path, policies_path: Path, docker_client: Any,
    base_image: str, wait_for: Any,
) -> None:  # fmt: skip
    from scheduler.monitor_actor import _cancel

    plan = make_plan(tmp_path, "rule-stop", "t", ["sleep 300"], backend=Backend.DOCKER,
                     policies_path=policies_path)  # fmt: skip
    scheduler = get_scheduler(str(data_dir), policies=load_policies(policies_path))
    key = f"{plan.batch_id}/t0000"
    try:
        ray.get(scheduler.submit.remote(plan))
        wait_for(lambda: len(containers_of(docker_client, plan.batch_id)) == 1
                 and ray.get(scheduler.status.remote(plan.batch_id))["batches"][plan.batch_id]
                 ["states"].get("running") == 1,
                 timeout=120, what="the sleeper running in its sandbox")  # fmt: skip
        stop = {"outcome": "stopped_by_rule", "reason": "stopped by rule repeated_command"}
        assert ray.get(scheduler.cancel.remote(key, **stop, attempt=2)) is False
        _cancel(key, 1, "stopped by rule repeated_command")  # what the Monitor calls
        _cancel(key, 1, "stopped by rule repeated_command")  # a second finding: no effect
        status = ray.get(scheduler.wait.remote(plan.batch_id, 120.0))
        assert status["batches"][plan.batch_id]["states"] == {"stopped_by_rule": 1}
        left = containers_of(docker_client, plan.batch_id)
    finally:
        remove_containers(docker_client, plan.batch_id)
    assert left == [], f"containers left behind after the stop: {left}"
    flush_ledger()
    rows = state_rows(str(data_dir), plan.batch_id)
    assert last_states(rows) == {"t0000": "stopped_by_rule"}
    assert Counter(terminal_counts(rows).values()) == Counter({1: 1})
    (end,) = [r for r in rows if r["state"] == "stopped_by_rule"]
    assert end["reason"] == "stopped by rule repeated_command"


def test_run_refuses_a_batch_whose_estimate_exceeds_its_cap_unless_forced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from scheduler.cli import main

    stub = types.ModuleType("scheduler.estimate")
    stub.estimate_batch = (  # type: ignore[attr-defined]
        lambda spec, pricing, data_dir=None, **kw: {"total_usd": "12.50"}
    )
    stub.exceeds_cap = (  # type: ignore[attr-defined]
        lambda estimate, spec, policies=None: (
            f"estimate ${estimate['total_usd']} exceeds its budget $10.00 (fix: ... --force)"
        )
    )
    monkeypatch.setitem(sys.modules, "scheduler.estimate", stub)

    from scheduler import driver

    ran: list[str] = []

    def fake_run(plan: Plan, settings: Any, *callbacks: Any) -> dict[str, Any]:
        ran.append(plan.batch_id)
        return {"total": 1, "states": {"succeeded": 1}}

    monkeypatch.setattr(driver, "run", fake_run)
    path = tmp_path / "costly.yaml"
    task = {"id": "t0", "repo": str(source_dir(tmp_path)), "command": "true"}
    path.write_text(yaml.safe_dump({"name": "costly", "team": "t", "tasks": [task],
                                    "defaults": {"template": "minimal"}}))  # fmt: skip
    argv = ["run", str(path), "--backend", "fake", "--data-dir", str(tmp_path / "d")]
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert "$12.50" in err and "$10.00" in err and "--force" in err
    assert ran == []
    with pytest.raises(SystemExit) as exit_:  # --force goes on to run it
        main([*argv, "--force", "--no-dashboard", "--json"])
    assert exit_.value.code == 0 and len(ran) == 1
