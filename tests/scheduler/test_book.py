"""`FleetBook`: every task transition the scheduler makes, without Ray."""

from __future__ import annotations

import itertools
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from accounting.errors import SchedulerError
from accounting.policies import Policies
from accounting.schemas import TaskState
from scheduler.book import FleetBook
from scheduler.plan import Backend, Plan, plan_batch
from scheduler.queue import Capacity, FleetQueue
from scheduler.spec import parse_batch
from scheduler.state import Step, queue_policies

POLICIES = Policies.model_validate(
    {
        "defaults": {"weight": 1, "max_sandboxes": 2, "max_cpus": 8, "max_memory": "8g",
                     "daily_usd": None, "monthly_usd": None},
    }
)  # fmt: skip


def _plan(name: str, n: int, tmp_path: Path) -> Plan:
    data = {
        "name": name,
        "team": "t",
        "defaults": {"template": "minimal", "max_attempts": 2},
        "tasks": [{"id": f"k{i}", "repo": ".", "command": "true"} for i in range(n)],
    }
    spec = parse_batch(data, source=tmp_path / f"{name}.yaml")
    return plan_batch(spec, backend=Backend.FAKE, policies=POLICIES)


@pytest.fixture
def book() -> FleetBook:
    teams, default = queue_policies(POLICIES)
    ticks = itertools.count()
    start = datetime(2026, 5, 1, tzinfo=UTC)
    return FleetBook(FleetQueue(teams, default), node="head",
                     clock=lambda: start + timedelta(seconds=next(ticks)))  # fmt: skip


def _states(book: FleetBook) -> list[tuple[str, int, str]]:
    rows = [r for table, rs in book.take_rows() if table == "events" for r in rs]
    return [(r.task, r.attempt, r.payload["state"]) for r in rows]


def test_admission_respects_the_team_quota(book: FleetBook, tmp_path: Path) -> None:
    plan = _plan("b", 5, tmp_path)
    book.register(plan, {f"k{i}": 1 for i in range(5)}, {})
    admitted = book.admit(Capacity(slots=10))
    assert [a.task.spec.task_id for a in admitted] == ["k0", "k1"]  # max_sandboxes 2
    assert book.snapshot()["teams"]["t"] == {"queued": 5, "running": 0, "admitted": 2}
    book.started(plan.batch_id, "k0", 1, "node-1")
    assert book.snapshot()["teams"]["t"] == {"queued": 4, "running": 1, "admitted": 2}


def test_an_attempt_goes_running_then_terminal_with_a_tasks_row(
    book: FleetBook, tmp_path: Path
) -> None:
    plan = _plan("b", 1, tmp_path)
    book.register(plan, {"k0": 1}, {})
    (attempt,) = book.admit(Capacity(slots=1))
    assert book.started(plan.batch_id, "k0", 1, "node-1")
    book.finish(attempt, {"outcome": "succeeded", "exit_code": 0, "node": "node-1"},
                Step(TaskState.SUCCEEDED, 1, "the agent exited 0"))  # fmt: skip
    rows = dict(book.take_rows())
    assert [(e.payload["state"], e.node) for e in rows["events"]] == [
        ("running", "node-1"),
        ("succeeded", "node-1"),
    ]
    (summary,) = rows["tasks"]
    assert summary.outcome is TaskState.SUCCEEDED and summary.exit_code == 0
    assert book.done(attempt.task.spec.batch)


def test_an_infrastructure_failure_requeues_the_next_attempt(
    book: FleetBook, tmp_path: Path
) -> None:
    plan = _plan("b", 1, tmp_path)
    book.register(plan, {"k0": 1}, {})
    (first,) = book.admit(Capacity(slots=1))
    book.started(plan.batch_id, "k0", 1, "node-1")
    book.finish(first, None, Step(TaskState.QUEUED, 2, "NodeDiedError; retrying as attempt 2"))
    (second,) = book.admit(Capacity(slots=1))
    assert second.number == 2
    book.started(plan.batch_id, "k0", 2, "node-2")
    book.finish(second, {"outcome": "succeeded", "node": "node-2"},
                Step(TaskState.SUCCEEDED, 2, "ok"))  # fmt: skip
    assert _states(book) == [
        ("k0", 1, "running"), ("k0", 2, "queued"), ("k0", 2, "running"), ("k0", 2, "succeeded"),
    ]  # fmt: skip


def test_a_late_start_notice_is_ignored_and_a_missed_one_is_filled_in(
    book: FleetBook, tmp_path: Path
) -> None:
    plan = _plan("b", 1, tmp_path)
    book.register(plan, {"k0": 1}, {})
    (attempt,) = book.admit(Capacity(slots=1))
    book.finish(attempt, {"outcome": "failed", "exit_code": 1, "node": "n"},
                Step(TaskState.FAILED, 1, "the agent exited 1"))  # fmt: skip
    assert not book.started(plan.batch_id, "k0", 1, "n")  # arrived after the result
    assert _states(book) == [("k0", 1, "running"), ("k0", 1, "failed")]


def test_a_terminal_state_is_never_recorded_twice(book: FleetBook, tmp_path: Path) -> None:
    plan = _plan("b", 1, tmp_path)
    book.register(plan, {"k0": 1}, {})
    (attempt,) = book.admit(Capacity(slots=1))
    book.finish(attempt, {"outcome": "succeeded"}, Step(TaskState.SUCCEEDED, 1, "ok"))
    with pytest.raises(SchedulerError, match="already succeeded"):
        book.finish(attempt, {"outcome": "succeeded"}, Step(TaskState.SUCCEEDED, 1, "ok"))


def test_cancel_ends_queued_tasks_now_and_returns_running_attempts(
    book: FleetBook, tmp_path: Path
) -> None:
    plan = _plan("b", 3, tmp_path)
    book.register(plan, {f"k{i}": 1 for i in range(3)}, {})
    (running,) = book.admit(Capacity(slots=1))
    removed, to_stop = book.cancel(plan.batch_id)
    assert removed == 2 and to_stop == [running] and running.cancelled
    # the running attempt ends as cancelled even if the runner reported an infra error
    book.finish(running, None, Step(TaskState.QUEUED, 2, "WorkerCrashedError"))
    assert book.snapshot()["batches"][plan.batch_id]["states"] == {"cancelled": 3}


def test_a_task_id_in_two_batches_must_be_named_with_its_batch(
    book: FleetBook, tmp_path: Path
) -> None:
    a, b = _plan("a", 1, tmp_path), _plan("b", 1, tmp_path)
    book.register(a, {"k0": 1}, {})
    book.register(b, {"k0": 1}, {})
    with pytest.raises(SchedulerError, match="several batches"):
        book.cancel("k0")
    assert book.cancel(f"{a.batch_id}/k0") == (1, [])


def test_a_resumed_batch_keeps_finished_tasks_and_queues_the_rest(
    book: FleetBook, tmp_path: Path
) -> None:
    plan = _plan("b", 3, tmp_path)
    book.register(plan, {"k1": 2, "k2": 1}, {"k0": TaskState.SUCCEEDED})
    assert book.snapshot()["batches"][plan.batch_id]["states"] == {"queued": 2, "succeeded": 1}
    numbers = sorted((a.task.spec.task_id, a.number) for a in book.admit(Capacity(slots=5)))
    assert numbers == [("k1", 2), ("k2", 1)]
    with pytest.raises(SchedulerError, match="already in the scheduler"):
        book.register(plan, {}, {})
    assert json.dumps(book.snapshot())  # plain data, for the driver
