"""The ledger rows the scheduler writes, built as pure functions of plain data.

- `submitted_event`: `batch_submitted` with the whole spec record (what `resume` rebuilds
  the batch from), the task count and the run options (the backend).
- `state_event`: one `task_state` change (`state`, `previous`, `reason`, and for a
  terminal state the attempt's `outcome` and `exit_code`).
- `queued_events`: the first `queued` of every task of a batch, as one Arrow table
  (100,000 rows build in well under a second; records would take seconds).
- `attempt_summary`: the `tasks` row of one attempt, from the runner's result dict
  (its `costs`, tokens and LLM calls as the node's gateway metered them; 0 when absent).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa

from accounting.errors import SchemaError
from accounting.schemas import (
    DATA_SCHEMAS,
    Event,
    EventKind,
    TaskState,
    TaskSummary,
    canonical_json,
)
from scheduler.spec import BatchSpec, TaskSpec

__all__ = [
    "attempt_summary",
    "metered",
    "queued_events",
    "state_event",
    "submitted_event",
    "utcnow",
]


def utcnow() -> datetime:
    return datetime.now(UTC)


def submitted_event(
    spec: BatchSpec, *, tasks: int, options: Mapping[str, Any], node: str, time: datetime
) -> Event:
    return Event(
        time=time,
        team=spec.team,
        batch=spec.batch_id,
        task="",
        attempt=0,
        node=node,
        kind=EventKind.BATCH_SUBMITTED,
        payload={"spec": spec.to_record(), "tasks": tasks, "options": dict(options)},
    )


def state_event(
    task: TaskSpec,
    *,
    state: TaskState,
    previous: TaskState | None,
    attempt: int,
    reason: str,
    node: str,
    time: datetime,
    result: Mapping[str, Any] | None = None,
) -> Event:
    payload: dict[str, Any] = {
        "state": state.value,
        "previous": previous.value if previous is not None else "",
        "reason": reason,
    }
    if result is not None:
        payload["outcome"] = result.get("outcome")
        payload["exit_code"] = result.get("exit_code")
    return Event(
        time=time,
        team=task.team,
        batch=task.batch,
        task=task.task_id,
        attempt=attempt,
        node=node,
        kind=EventKind.TASK_STATE,
        payload=payload,
    )


def queued_events(
    tasks: Sequence[TaskSpec], *, attempts: Mapping[str, int] | None = None, reason: str,
    previous: Mapping[str, TaskState] | None = None, node: str, time: datetime,
) -> pa.Table:  # fmt: skip
    """One `queued` event per task (attempt 1, or `attempts[task_id]`), as an Arrow table."""
    n = len(tasks)
    attempts = attempts or {}
    previous = previous or {}
    payloads = [
        canonical_json(
            {
                "state": TaskState.QUEUED.value,
                "previous": previous[t.task_id].value if t.task_id in previous else "",
                "reason": reason,
            }
        )
        for t in tasks
    ]
    return pa.table(
        {
            "time": pa.array([time] * n, DATA_SCHEMAS["events"].field("time").type),
            "team": [t.team for t in tasks],
            "batch": [t.batch for t in tasks],
            "task": [t.task_id for t in tasks],
            "attempt": pa.array([attempts.get(t.task_id, 1) for t in tasks], pa.int32()),
            "node": [node] * n,
            "kind": [EventKind.TASK_STATE.value] * n,
            "payload": payloads,
        },
        schema=DATA_SCHEMAS["events"],
    )


def _started(result: Mapping[str, Any] | None, fallback: datetime | None) -> datetime | None:
    text = (result or {}).get("started_at")
    if isinstance(text, str) and text:
        try:
            return datetime.fromisoformat(text)
        except ValueError:
            return fallback
    return fallback


_COST_KINDS = ("compute", "llm", "storage", "network")


def _count(value: Any, what: str) -> int:
    """A metered amount (int nano-USD or a count) from a result dict; absent or None is 0."""
    if value is None or value == "":
        return 0
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise SchemaError(
            f"runner result: {what} = {value!r} is not an integer (fix: the node reports "
            "nano-USD and counts as integers, never floats)"
        )
    try:
        return int(value)
    except ValueError:
        raise SchemaError(f"runner result: {what} = {value!r} is not an integer") from None


def metered(result: Mapping[str, Any] | None) -> dict[str, int]:
    """The `tasks` row's cost, token and call columns from a runner result: `costs` holds
    `compute_nusd`, `llm_nusd`, `storage_nusd`, `network_nusd` (or `cost_*_nusd`); the
    tokens and calls are top-level (or in `costs`). Absent means 0."""
    r = result or {}
    costs = r.get("costs") or {}
    if not isinstance(costs, Mapping):
        raise SchemaError(f"runner result: costs = {costs!r} is not a mapping")
    out: dict[str, int] = {}
    for kind in _COST_KINDS:
        value = costs.get(f"{kind}_nusd", costs.get(f"cost_{kind}_nusd"))
        out[f"cost_{kind}_nusd"] = _count(value, f"costs.{kind}_nusd")
    out["cost_total_nusd"] = sum(out[f"cost_{k}_nusd"] for k in _COST_KINDS)
    for name in ("tokens_input", "tokens_output", "llm_calls"):
        out[name] = _count(r.get(name, costs.get(name)), name)
    return out


def attempt_summary(
    task: TaskSpec,
    *,
    attempt: int,
    outcome: TaskState,
    template: str,
    result: Mapping[str, Any] | None,
    node: str,
    started: datetime | None,
    time: datetime,
) -> TaskSummary:
    """The `tasks` row of one attempt; costs and tokens from the result (`metered`)."""
    r = result or {}
    began = _started(result, started)
    duration_s = r.get("duration_s")
    if not duration_s and began is not None:
        duration_s = max((time - began).total_seconds(), 0.0)
    return TaskSummary(
        time=time,
        team=task.team,
        batch=task.batch,
        task=task.task_id,
        attempt=attempt,
        node=str(r.get("node") or node),
        task_type=task.task_type,
        template=template,
        outcome=outcome,
        exit_code=r.get("exit_code"),
        oom=bool(r.get("oom", False)),
        timed_out=bool(r.get("timed_out", False)),
        started=began,
        duration_ms=round(float(duration_s or 0.0) * 1000),
        **metered(result),
        files_changed=int(r.get("files_changed") or 0),
        lines_added=int(r.get("insertions") or 0),
        lines_deleted=int(r.get("deletions") or 0),
        diff_sha256=str(r.get("diff_sha256") or ""),
    )
