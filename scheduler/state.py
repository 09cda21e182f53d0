"""The fleet's pure logic: how an attempt's end becomes a task state, and what the ledger says.

No Ray, no Docker, no DuckDB here; everything is a function of plain data:

- `judge_result` / `judge_error`: one attempt's end (a runner result dict, or the
  exception `ray.get` raised) -> a `Verdict`: the state it stands for, why, and whether
  it was the infrastructure's fault (then the task deserves another attempt).
- `next_step`: a verdict, the attempt number and `max_attempts` -> a `Step`: requeue as
  the next attempt, or the task's terminal state.
- `recover_batch`: a batch's ledger events -> a `Recovery`: the spec that was submitted,
  the tasks already finished (terminal), and the others with the attempt they resume as.
- `running_intervals`, `peak_concurrency`, `mean_concurrency`: running attempts as time
  intervals, to check quotas and fair share from the ledger rather than from counters.
- `queue_policies`: `configs/policies.yaml` teams -> the queue's `TeamPolicy` records.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

from accounting.errors import LedgerError
from accounting.policies import Policies
from accounting.policies import TeamPolicy as TeamPolicyConfig
from accounting.schemas import EventKind, TaskState
from scheduler.queue import Capacity, TeamPolicy

__all__ = [
    "INFRA_ERRORS",
    "TERMINAL_STATES",
    "Interval",
    "Recovery",
    "Step",
    "Verdict",
    "free_capacity",
    "judge_error",
    "judge_result",
    "mean_concurrency",
    "next_step",
    "peak_concurrency",
    "queue_policies",
    "recover_batch",
    "running_intervals",
]

TERMINAL_STATES: Final = frozenset(
    {
        TaskState.SUCCEEDED,
        TaskState.FAILED,
        TaskState.OOM,
        TaskState.TIMED_OUT,
        TaskState.CANCELLED,
        TaskState.BUDGET_EXCEEDED,
        TaskState.STOPPED_BY_RULE,
        TaskState.REJECTED,
    }
)
"""States a task never leaves. `awaiting_review` is not one: a reviewer decides next."""

INFRA_ERRORS: Final = frozenset(
    {
        "NodeDiedError",
        "WorkerCrashedError",
        "LocalRayletDiedError",
        "OwnerDiedError",
        "ObjectLostError",
        "ObjectFetchTimedOutError",
        "ObjectReconstructionFailedError",
        "OutOfMemoryError",  # Ray's memory monitor killed the worker: the node's fault
        "RaySystemError",
        "RuntimeEnvSetupError",
        "TaskPlacementGroupRemoved",
    }
)
"""Ray exceptions (by class name, MRO included) that mean the infrastructure lost the attempt."""

_INFRA_SANDBOX_ERRORS: Final = frozenset({"SandboxError", "WorkspaceError", "EngineError"})
"""sandfleet errors an attempt may raise that another node may not have (ImageError is an
EngineError): retried."""


@dataclass(frozen=True, slots=True)
class Verdict:
    """What one attempt's end means: a state, the reason, and whose fault it was."""

    state: TaskState
    reason: str
    infra: bool = False


@dataclass(frozen=True, slots=True)
class Step:
    """What to do with the task after an attempt: requeue as `attempt`, or stop at `state`."""

    state: TaskState
    attempt: int
    reason: str

    @property
    def retry(self) -> bool:
        return self.state is TaskState.QUEUED


def judge_result(result: Mapping[str, Any]) -> Verdict:
    """A runner result dict (`scheduler.runner`) -> its verdict."""
    outcome = result.get("outcome")
    code = result.get("exit_code")
    if outcome == "succeeded":
        return Verdict(TaskState.SUCCEEDED, "the agent exited 0")
    if outcome == "failed":
        return Verdict(TaskState.FAILED, f"the agent exited {code}")
    if outcome == "oom":
        return Verdict(TaskState.OOM, "the out-of-memory killer ended the sandbox")
    if outcome == "timeout":
        return Verdict(TaskState.TIMED_OUT, f"killed at the timeout of {result.get('timeout_s')}s")
    if outcome == "budget_exceeded":
        why = result.get("error") or result.get("reason") or "a budget cap refused a reservation"
        return Verdict(TaskState.BUDGET_EXCEEDED, f"budget exceeded: {why}")
    if outcome == "stopped_by_rule":
        why = result.get("error") or result.get("reason") or "a streaming rule stopped it"
        return Verdict(TaskState.STOPPED_BY_RULE, str(why))
    if outcome == "error":
        kind = str(result.get("error_type") or "error")
        message = f"{kind}: {result.get('error')}"
        if kind in _INFRA_SANDBOX_ERRORS or kind == "ImageError":
            return Verdict(TaskState.FAILED, message, infra=True)
        return Verdict(TaskState.FAILED, message)
    return Verdict(TaskState.FAILED, f"the runner returned an unknown outcome {outcome!r}")


def _names(exc: BaseException) -> set[str]:
    return {k.__name__ for k in type(exc).__mro__}


def judge_error(exc: BaseException, *, cancelled_by_us: bool = False) -> Verdict:
    """The exception `ray.get(attempt)` raised -> its verdict.

    Cancelled by the scheduler: `cancelled`. Lost node, worker, owner or object, or a
    cancel nobody here asked for: infrastructure (retried). An exception the runner
    raised (`RayTaskError`): judged by its cause; a bug in sandfleet is `failed`, not
    retried (it would fail the same way again).
    """
    names = _names(exc)
    if cancelled_by_us:
        return Verdict(TaskState.CANCELLED, "cancelled")
    text = _short(exc)
    if "TaskCancelledError" in names:
        return Verdict(TaskState.FAILED, f"cancelled by someone else: {text}", infra=True)
    if names & INFRA_ERRORS:
        return Verdict(TaskState.FAILED, text, infra=True)
    cause = getattr(exc, "cause", None)
    if "RayTaskError" in names and isinstance(cause, BaseException):
        cause_names = _names(cause)
        if cause_names & (_INFRA_SANDBOX_ERRORS | INFRA_ERRORS):
            return Verdict(TaskState.FAILED, _short(cause), infra=True)
        return Verdict(TaskState.FAILED, f"the runner raised {_short(cause)}")
    return Verdict(TaskState.FAILED, f"the runner raised {text}")


def _short(exc: BaseException, limit: int = 500) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    head = lines[0] if lines else ""
    text = f"{type(exc).__name__}: {head}" if head else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def next_step(verdict: Verdict, attempt: int, max_attempts: int) -> Step:
    """Requeue after an infrastructure failure while attempts remain; otherwise stop."""
    if verdict.infra and attempt < max_attempts:
        return Step(
            TaskState.QUEUED,
            attempt + 1,
            f"{verdict.reason}; retrying as attempt {attempt + 1} of {max_attempts}",
        )
    if verdict.infra:
        return Step(
            TaskState.FAILED,
            attempt,
            f"{verdict.reason}; gave up after attempt {attempt} of {max_attempts}",
        )
    return Step(verdict.state, attempt, verdict.reason)


# -- the ledger, read back --------------------------------------------------------------


def _payload(row: Mapping[str, Any]) -> dict[str, Any]:
    value = row.get("payload")
    if isinstance(value, str):
        loaded = json.loads(value)
        return loaded if isinstance(loaded, dict) else {}
    return dict(value or {})


def _order(row: Mapping[str, Any]) -> tuple[Any, str, int]:
    return (row["time"], str(row.get("chain_id") or ""), int(row.get("event_seq") or 0))


@dataclass(frozen=True)
class Recovery:
    """A batch rebuilt from its ledger events.

    `done` maps each finished task to its terminal state; `todo` maps every other task to
    the attempt number it resumes as (one more than any attempt the ledger names, so an
    attempt number is never reused); `lost` lists the attempts that were running when
    the scheduler went away (their outcome is unknown).
    """

    batch: str
    spec: Mapping[str, Any]
    options: Mapping[str, Any]
    done: Mapping[str, TaskState]
    todo: Mapping[str, int]
    lost: tuple[tuple[str, int], ...] = field(default=())

    @property
    def finished(self) -> bool:
        return not self.todo


def recover_batch(batch: str, rows: Iterable[Mapping[str, Any]]) -> Recovery:
    """Rebuild `batch` from its `batch_submitted` and `task_state` events (any order).

    Rows need `time`, `task`, `attempt`, `kind`, `payload` (JSON text or a mapping) and,
    to break ties in time, `chain_id` and `event_seq`. A task's state is its last event.
    """
    submitted: Mapping[str, Any] | None = None
    last: dict[str, tuple[tuple[Any, str, int], TaskState, int]] = {}
    highest: dict[str, int] = {}
    for row in rows:
        kind = str(row.get("kind"))
        payload = _payload(row)
        if kind == EventKind.BATCH_SUBMITTED.value:
            if submitted is None or _order(row) > _order(submitted):
                submitted = {**row, "payload": payload}
            continue
        if kind != EventKind.TASK_STATE.value:
            continue
        task, attempt, key = str(row["task"]), int(row.get("attempt") or 0), _order(row)
        try:
            state = TaskState(payload.get("state"))
        except ValueError:
            raise LedgerError(
                f"batch {batch}: task {task}: unknown state {payload.get('state')!r} in the "
                "ledger (fix: run `sandfleet audit verify`; a newer sandfleet may have written it)"
            ) from None
        highest[task] = max(highest.get(task, 0), attempt)
        if task not in last or key >= last[task][0]:
            last[task] = (key, state, attempt)
    if submitted is None:
        raise LedgerError(
            f"batch {batch} has no batch_submitted event in the ledger (fix: check the batch "
            "id with `sandfleet status` and the --data-dir; it was never submitted there)"
        )
    payload = submitted["payload"]
    spec = payload.get("spec")
    if not isinstance(spec, Mapping):
        raise LedgerError(f"batch {batch}: its batch_submitted event holds no spec")
    tasks = spec.get("tasks")
    task_ids = (
        [str(t["id"]) for t in tasks if isinstance(t, Mapping) and "id" in t]
        if isinstance(tasks, list)
        else sorted(last)
    )
    done: dict[str, TaskState] = {}
    todo: dict[str, int] = {}
    lost: list[tuple[str, int]] = []
    for task in task_ids:
        entry = last.get(task)
        if entry is not None and entry[1] in TERMINAL_STATES:
            done[task] = entry[1]
            continue
        if entry is not None and entry[1] is TaskState.RUNNING:
            lost.append((task, entry[2]))
        todo[task] = highest.get(task, 0) + 1
    return Recovery(
        batch=batch,
        spec=spec,
        options=dict(payload.get("options") or {}),
        done=done,
        todo=todo,
        lost=tuple(lost),
    )


@dataclass(frozen=True, slots=True)
class Interval:
    """One attempt's running time, from its `running` event to the task's next event."""

    team: str
    task: str
    attempt: int
    start: datetime
    end: datetime | None  # None: still running at the end of the events


def running_intervals(rows: Iterable[Mapping[str, Any]]) -> list[Interval]:
    """Every running stretch in `task_state` events (rows as in `recover_batch`, + `team`).

    Tasks are told apart by (batch, task) when rows carry `batch`.
    """
    by_task: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for row in rows:
        if str(row.get("kind")) != EventKind.TASK_STATE.value:
            continue
        by_task.setdefault((str(row.get("batch", "")), str(row["task"])), []).append(row)
    out: list[Interval] = []
    for (_, task), events in by_task.items():
        events.sort(key=_order)
        open_: Mapping[str, Any] | None = None
        for row in events:
            state = _payload(row).get("state")
            if open_ is not None:
                team, number = str(open_["team"]), int(open_["attempt"])
                out.append(Interval(team, task, number, open_["time"], row["time"]))
                open_ = None
            if state == TaskState.RUNNING.value:
                open_ = row
        if open_ is not None:
            out.append(
                Interval(str(open_["team"]), task, int(open_["attempt"]), open_["time"], None)
            )
    return out


def _edges(intervals: Iterable[Interval]) -> list[tuple[Any, int, str]]:
    # Ends sort before starts at the same instant: [start, end) intervals.
    edges: list[tuple[Any, int, str]] = []
    for iv in intervals:
        edges.append((iv.start, 1, iv.team))
        if iv.end is not None:
            edges.append((iv.end, 0, iv.team))
    edges.sort(key=lambda e: (e[0], e[1]))
    return edges


def peak_concurrency(intervals: Iterable[Interval]) -> dict[str, int]:
    """Per team, the most attempts running at one instant."""
    now: dict[str, int] = {}
    peak: dict[str, int] = {}
    for _, is_start, team in _edges(intervals):
        now[team] = now.get(team, 0) + (1 if is_start else -1)
        peak[team] = max(peak.get(team, 0), now[team])
    return peak


def mean_concurrency(
    intervals: Iterable[Interval], start: datetime, end: datetime
) -> dict[str, float]:
    """Per team, the time-weighted mean number of running attempts over [start, end)."""
    span = (end - start).total_seconds()
    if span <= 0:
        raise ValueError("mean_concurrency: end must be after start")
    area: dict[str, float] = {}
    for iv in intervals:
        s = max(iv.start, start)
        e = min(iv.end or end, end)
        if e > s:
            area[iv.team] = area.get(iv.team, 0.0) + (e - s).total_seconds()
    return {team: a / span for team, a in sorted(area.items())}


def free_capacity(
    total: tuple[int, float, int],
    held: Iterable[tuple[float, int]],
    *,
    lookahead: float = 0.0,
) -> Capacity:
    """What the scheduler may admit now: the cluster's (slots, CPUs, memory) minus what its
    admitted attempts hold (`held`: cpus, memory each), plus a lookahead.

    The lookahead (a fraction of the cluster, at least one slot) keeps a few admitted
    attempts waiting inside Ray, so a slot freed on a node starts the next attempt at
    once instead of after the scheduler's next turn. Quotas are unaffected: they count
    every admitted attempt, waiting or running.
    """
    slots, cpus, memory = total
    held = list(held)
    extra = max(1, math.ceil(slots * lookahead)) if slots > 0 and lookahead > 0 else 0
    scale = (slots + extra) / slots if slots > 0 else 0.0
    return Capacity(
        slots=max(0, slots + extra - len(held)),
        cpus=max(0.0, cpus * scale - sum(c for c, _ in held)),
        memory_bytes=max(0, int(memory * scale) - sum(m for _, m in held)),
    )


def queue_policies(policies: Policies) -> tuple[dict[str, TeamPolicy], TeamPolicy]:
    """`configs/policies.yaml` -> (listed teams, default) as the queue's `TeamPolicy`."""

    def convert(p: TeamPolicyConfig) -> TeamPolicy:
        return TeamPolicy(
            weight=p.weight,
            max_sandboxes=p.max_sandboxes,
            max_cpus=p.max_cpus,
            max_memory_bytes=p.max_memory,
        )

    teams = {name: convert(policies.team(name)) for name in sorted(policies.teams)}
    return teams, convert(policies.defaults)
