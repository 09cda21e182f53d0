"""The fleet's pure logic: verdicts, retries, rebuilding a batch from its ledger events,
and running intervals. No Ray cluster, no Docker, no DuckDB."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import ray.exceptions as rex

from accounting.errors import LedgerError, SandboxError
from accounting.policies import Policies
from accounting.schemas import TaskState
from scheduler.state import (
    Interval,
    Verdict,
    free_capacity,
    judge_error,
    judge_result,
    mean_concurrency,
    next_step,
    peak_concurrency,
    queue_policies,
    recover_batch,
    running_intervals,
)

T0 = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def test_the_agents_own_exit_is_a_result_not_retried() -> None:
    verdict = judge_result({"outcome": "failed", "exit_code": 3})
    assert verdict == Verdict(TaskState.FAILED, "the agent exited 3")
    step = next_step(verdict, attempt=1, max_attempts=3)
    assert step.state is TaskState.FAILED and not step.retry and step.attempt == 1


@pytest.mark.parametrize(
    ("outcome", "state"),
    [("succeeded", TaskState.SUCCEEDED), ("oom", TaskState.OOM), ("timeout", TaskState.TIMED_OUT)],
)
def test_outcomes_map_to_their_states(outcome: str, state: TaskState) -> None:
    verdict = judge_result({"outcome": outcome, "exit_code": 0, "timeout_s": 5})
    assert verdict.state is state and not verdict.infra


def test_an_engine_or_sandbox_error_is_infrastructure_and_retried() -> None:
    for kind in ("SandboxError", "EngineError", "ImageError", "WorkspaceError"):
        verdict = judge_result({"outcome": "error", "error_type": kind, "error": "boom"})
        assert verdict.infra, kind
        step = next_step(verdict, attempt=1, max_attempts=2)
        assert step.retry and step.attempt == 2 and "retrying as attempt 2 of 2" in step.reason


def test_infrastructure_failures_stop_at_max_attempts_with_the_reason() -> None:
    verdict = judge_error(rex.NodeDiedError("node abc died"))
    step = next_step(verdict, attempt=3, max_attempts=3)
    assert step.state is TaskState.FAILED and not step.retry
    assert "NodeDiedError: node abc died" in step.reason
    assert "gave up after attempt 3" in step.reason


@pytest.mark.parametrize(
    "error",
    [
        rex.NodeDiedError("gone"),
        rex.WorkerCrashedError(),
        rex.OwnerDiedError("ab" * 14, None, "here"),
        rex.ObjectLostError("ab" * 14, None, "here"),
        rex.OutOfMemoryError("node memory"),
        rex.TaskCancelledError(),  # a cancel nobody here asked for
    ],
)
def test_ray_losing_the_attempt_is_infrastructure(error: BaseException) -> None:
    assert judge_error(error).infra


def test_a_cancel_we_asked_for_is_cancelled_never_retried() -> None:
    verdict = judge_error(rex.TaskCancelledError(), cancelled_by_us=True)
    assert verdict == Verdict(TaskState.CANCELLED, "cancelled")
    assert not next_step(verdict, 1, 3).retry


def test_a_runner_exception_is_judged_by_its_cause() -> None:
    infra = rex.RayTaskError("run_attempt", "tb", SandboxError("engine hiccup"))
    assert judge_error(infra).infra
    bug = rex.RayTaskError("run_attempt", "tb", TypeError("bad argument"))
    verdict = judge_error(bug)
    assert not verdict.infra and verdict.state is TaskState.FAILED
    assert "TypeError: bad argument" in verdict.reason


def _event(t: float, task: str, attempt: int, state: str, seq: int, team: str = "a") -> dict:
    return {
        "time": at(t),
        "team": team,
        "batch": "b-1",
        "task": task,
        "attempt": attempt,
        "kind": "task_state",
        "payload": json.dumps({"state": state}),
        "chain_id": "c1",
        "event_seq": seq,
    }


def _submitted(ids: list[str]) -> dict[str, Any]:
    spec = {"name": "b", "team": "a", "tasks": [{"id": i, "repo": "r"} for i in ids]}
    return {
        "time": at(0),
        "task": "",
        "attempt": 0,
        "kind": "batch_submitted",
        "payload": json.dumps({"spec": spec, "tasks": len(ids), "options": {"backend": "fake"}}),
        "chain_id": "c1",
        "event_seq": 0,
    }


def test_recovery_keeps_terminal_tasks_and_requeues_the_rest_as_a_new_attempt() -> None:
    rows = [
        _submitted(["done", "lost", "waiting", "retried"]),
        _event(1, "done", 1, "queued", 1),
        _event(1, "lost", 1, "queued", 2),
        _event(1, "waiting", 1, "queued", 3),
        _event(1, "retried", 1, "queued", 4),
        _event(2, "done", 1, "running", 5),
        _event(2, "lost", 1, "running", 6),
        _event(3, "done", 1, "succeeded", 7),
        _event(2, "retried", 1, "running", 8),
        _event(4, "retried", 2, "queued", 9),
    ]
    recovery = recover_batch("b-1", list(reversed(rows)))  # order of rows does not matter
    assert recovery.done == {"done": TaskState.SUCCEEDED}
    assert recovery.todo == {"lost": 2, "waiting": 2, "retried": 3}
    assert recovery.lost == (("lost", 1),)
    assert recovery.options == {"backend": "fake"}
    assert not recovery.finished


def test_recovery_of_a_finished_batch_has_nothing_to_do() -> None:
    rows = [_submitted(["x"]), _event(1, "x", 1, "queued", 1), _event(2, "x", 1, "cancelled", 2)]
    recovery = recover_batch("b-1", rows)
    assert recovery.finished and recovery.done == {"x": TaskState.CANCELLED}


def test_recovery_without_a_submitted_spec_is_refused_clearly() -> None:
    with pytest.raises(LedgerError, match="no batch_submitted event"):
        recover_batch("b-1", [_event(1, "x", 1, "queued", 1)])


def test_same_instant_events_are_ordered_by_their_sequence() -> None:
    rows = [_submitted(["x"]), _event(1, "x", 1, "running", 2), _event(1, "x", 1, "failed", 3)]
    assert recover_batch("b-1", rows).done == {"x": TaskState.FAILED}


def test_running_intervals_end_at_the_tasks_next_event() -> None:
    rows = [
        _event(0, "x", 1, "queued", 1),
        _event(1, "x", 1, "running", 2),
        _event(5, "x", 2, "queued", 3),
        _event(6, "x", 2, "running", 4),
        _event(9, "x", 2, "succeeded", 5),
        _event(2, "y", 1, "running", 6, team="b"),
    ]
    intervals = sorted(running_intervals(rows), key=lambda i: (i.task, i.attempt))
    assert intervals == [
        Interval("a", "x", 1, at(1), at(5)),
        Interval("a", "x", 2, at(6), at(9)),
        Interval("b", "y", 1, at(2), None),
    ]


def test_peak_concurrency_counts_an_end_and_a_start_at_one_instant_once() -> None:
    intervals = [
        Interval("a", "1", 1, at(0), at(2)),
        Interval("a", "2", 1, at(2), at(4)),  # starts as 1 ends: still one at a time
        Interval("a", "3", 1, at(3), at(5)),
        Interval("b", "4", 1, at(0), at(10)),
    ]
    assert peak_concurrency(intervals) == {"a": 2, "b": 1}


def test_mean_concurrency_is_time_weighted_over_the_window() -> None:
    intervals = [Interval("a", "1", 1, at(0), at(10)), Interval("a", "2", 1, at(5), None)]
    assert mean_concurrency(intervals, at(0), at(10)) == {"a": 1.5}


def test_policies_become_queue_policies_with_defaults_for_unlisted_teams() -> None:
    policies = Policies.model_validate(
        {
            "defaults": {"weight": 1, "max_sandboxes": 4, "max_cpus": 4, "max_memory": "8g",
                         "daily_usd": None, "monthly_usd": None},
            "teams": {"big": {"weight": 3, "max_sandboxes": 10}},
        }
    )  # fmt: skip
    teams, default = queue_policies(policies)
    assert teams["big"].weight == 3 and teams["big"].max_sandboxes == 10
    assert teams["big"].max_memory_bytes == 8 * 1024**3  # inherited from defaults
    assert default.max_sandboxes == 4 and default.max_cpus == 4


def test_free_capacity_subtracts_what_admitted_attempts_hold() -> None:
    total = (4, 8.0, 8 * 2**30)
    held = [(1.0, 2**30), (2.0, 2**30)]
    free = free_capacity(total, held)
    assert (free.slots, free.cpus, free.memory_bytes) == (2, 5.0, 6 * 2**30)


def test_the_lookahead_admits_a_few_more_than_the_cluster_holds_but_never_from_nothing() -> None:
    free = free_capacity((8, 8.0, 8 * 2**30), [(1.0, 2**30)] * 8, lookahead=0.25)
    assert free.slots == 2 and free.cpus == 2.0 and free.memory_bytes == 2 * 2**30
    assert free_capacity((1, 1.0, 2**30), [], lookahead=0.25).slots == 2  # at least one more
    assert free_capacity((0, 0.0, 0), [], lookahead=0.25).slots == 0  # no node: wait for one
