"""`FleetBook`: the scheduler's books — batches, tasks, attempts, state changes. No Ray.

It owns the `FleetQueue` and every state transition of a task, and gathers the ledger
rows those transitions produce (`take_rows`). The `FleetScheduler` actor around it
only starts Ray tasks, waits for them, and ships the rows; everything that decides is
here, and is tested without Ray.

A task moves `queued` -> `running` (when its attempt reports in from a node) -> a
terminal state, or back to `queued` as the next attempt after an infrastructure
failure. Each transition is one `task_state` event; each attempt that ends is one
`tasks` row. A task's terminal state is recorded once: a finished task is never queued
or finished again.

Stopping: `cancel(target, outcome=...)` ends queued tasks at once and marks running
attempts to stop; a stopped attempt ends in that outcome (`cancelled`, or
`stopped_by_rule` with the rule's reason), never retried. Budgets: `exhaust_batch`
ends a batch's queued tasks `budget_exceeded`; `hold_team` parks a team's queued tasks
out of the queue (still `queued`, never admitted, no autoscaler demand) until
`release_team`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from accounting.errors import SchedulerError
from accounting.schemas import Event, TaskState, TaskSummary
from scheduler.plan import Plan
from scheduler.queue import Admission, Capacity, FleetQueue, QueueItem
from scheduler.records import attempt_summary, state_event, utcnow
from scheduler.spec import TaskSpec
from scheduler.state import TERMINAL_STATES, Step

__all__ = ["STOP_OUTCOMES", "Attempt", "FleetBook", "Task"]

STOP_OUTCOMES = frozenset(
    {TaskState.CANCELLED, TaskState.STOPPED_BY_RULE, TaskState.BUDGET_EXCEEDED}
)
"""The outcomes `cancel` may give what it stops."""

Clock = Callable[[], datetime]


@dataclass(slots=True)
class Task:
    spec: TaskSpec
    key: str  # "<batch>/<task>": task ids are unique only within a batch
    state: TaskState = TaskState.QUEUED
    attempt: int = 1


@dataclass(slots=True)
class Attempt:
    """One admitted attempt, from dispatch until it is judged (and swept)."""

    task: Task
    number: int
    cpus: float
    memory: int
    ref: Any = None
    node: str = ""
    started: datetime | None = None
    ended: bool = False
    cancelled: bool = False
    cancel_at: float | None = None
    forced: bool = False
    stop_state: TaskState = TaskState.CANCELLED  # the outcome when `cancelled`
    stop_reason: str = "cancelled"


@dataclass(slots=True)
class _Batch:
    plan: Plan
    tasks: dict[str, Task] = field(default_factory=dict)
    counts: Counter[TaskState] = field(default_factory=Counter)

    @property
    def done(self) -> bool:
        return sum(n for s, n in self.counts.items() if s in TERMINAL_STATES) == len(self.tasks)


class FleetBook:
    """Batches, tasks and attempts of one scheduler, and the rows their changes produce."""

    def __init__(self, queue: FleetQueue, *, node: str = "", clock: Clock = utcnow) -> None:
        self.queue = queue
        self.node = node
        self.clock = clock
        self.batches: dict[str, _Batch] = {}
        self.tasks: dict[str, Task] = {}
        self.active: dict[str, Attempt] = {}  # task key -> its attempt (running or sweeping)
        self.held: dict[str, QueueItem] = {}  # task key -> queued item parked off the queue
        self.held_teams: set[str] = set()
        self.exhausted: set[str] = set()  # batches whose budget ended their queued tasks
        self._events: list[Event] = []
        self._summaries: list[TaskSummary] = []

    # -- batches -----------------------------------------------------------------

    def check_new(self, batch_id: str) -> None:
        """Refuse a batch this scheduler already holds."""
        if batch_id in self.batches:
            raise SchedulerError(
                f"batch {batch_id} is already in the scheduler (fix: `sandfleet status "
                f"{batch_id}`; change the batch to run it again)"
            )

    def register(self, plan: Plan, todo: Mapping[str, int], done: Mapping[str, TaskState]) -> None:
        """Hold a batch: `todo` tasks queued as the given attempt, `done` ones finished."""
        self.check_new(plan.batch_id)
        batch = _Batch(plan)
        items = []
        for spec in plan.tasks:
            key = f"{spec.batch}/{spec.task_id}"
            state = done.get(spec.task_id, TaskState.QUEUED)
            task = Task(spec, key, state, todo.get(spec.task_id, 1))
            batch.tasks[spec.task_id] = task
            batch.counts[state] += 1
            self.tasks[key] = task
            if spec.task_id in todo:
                items.append(self._item(plan, task, task.attempt))
        self.batches[plan.batch_id] = batch
        for item in items:
            self._enqueue(item)

    def forget(self, batch_id: str) -> None:
        """Drop a finished batch (before resuming it anew)."""
        batch = self.batches.get(batch_id)
        if batch is None:
            return
        if not batch.done:
            raise SchedulerError(
                f"batch {batch_id} is running in this scheduler (fix: wait for it, or "
                f"`sandfleet cancel {batch_id}`)"
            )
        del self.batches[batch_id]
        self.exhausted.discard(batch_id)
        for task_id in batch.tasks:
            self.tasks.pop(f"{batch_id}/{task_id}", None)

    def done(self, batch_id: str) -> bool:
        batch = self.batches.get(batch_id)
        return batch is None or batch.done

    def plan_of(self, task: Task) -> Plan:
        return self.batches[task.spec.batch].plan

    @staticmethod
    def _item(plan: Plan, task: Task, attempt: int) -> QueueItem:
        res, s = plan.templates[task.spec.template].resources, task.spec
        return QueueItem(task.key, s.batch, s.team, s.priority, res.cpus, res.memory, attempt)

    # -- admission and transitions -----------------------------------------------

    def admit(self, capacity: Capacity) -> list[Attempt]:
        """Admit what fits; each becomes an Attempt the caller starts (then sets `ref`)."""
        out = []
        admitted: list[Admission] = self.queue.pop_admissible(capacity)
        for admission in admitted:
            item = admission.item
            attempt = Attempt(self.tasks[item.task_id], item.attempt, item.cpus, item.memory_bytes)
            self.active[item.task_id] = attempt
            out.append(attempt)
        return out

    def started(self, batch: str, task: str, number: int, node: str) -> bool:
        """An attempt reported in from `node`: `running`. False for a stale notice."""
        attempt = self.active.get(f"{batch}/{task}")
        if attempt is None or attempt.number != number or attempt.started or attempt.ended:
            return False
        attempt.node = node
        attempt.started = self.clock()
        self._set(attempt.task, TaskState.RUNNING, number, "started", node, attempt.started)
        return True

    def finish(self, attempt: Attempt, result: Mapping[str, Any] | None, step: Step) -> None:
        """An attempt was judged (and swept): its `tasks` row, then requeue or terminal."""
        task = attempt.task
        if task.state in TERMINAL_STATES:
            raise SchedulerError(f"task {task.key} is already {task.state.value}")
        node = str((result or {}).get("node") or attempt.node)
        if attempt.cancelled and (step.retry or attempt.stop_state is not TaskState.CANCELLED):
            step = Step(attempt.stop_state, attempt.number, attempt.stop_reason)
        if step.retry and task.spec.batch in self.exhausted:
            reason = f"{step.reason}; not retried: batch budget reached"
            step = Step(TaskState.BUDGET_EXCEEDED, attempt.number, reason)
        if result is not None and attempt.started is None:
            attempt.started = self.clock()  # the start notice lost the race with the result
            self._set(task, TaskState.RUNNING, attempt.number, "started", node, attempt.started)
        now = self.clock()
        self._summaries.append(
            attempt_summary(
                task.spec, attempt=attempt.number,
                outcome=TaskState.FAILED if step.retry else step.state,
                template=task.spec.template, result=result, node=node,
                started=attempt.started, time=now,
            )
        )  # fmt: skip
        self.active.pop(task.key, None)
        self.queue.release(task.key)
        if step.retry:
            self._set(task, TaskState.QUEUED, step.attempt, step.reason, self.node, now)
            self._enqueue(self._item(self.plan_of(task), task, step.attempt))
        else:
            self._set(task, step.state, attempt.number, step.reason, node, now, result)

    def cancel(
        self, target: str, *, outcome: TaskState = TaskState.CANCELLED, reason: str | None = None,
        attempt: int | None = None,
    ) -> tuple[int, list[Attempt]] | None:  # fmt: skip
        """Queued tasks of `target` -> `outcome` now; returns how many, and the running
        attempts to stop (they end in `outcome` with `reason`). With `attempt`, only that
        attempt of one task is stopped: None (refused, nothing changed) when it is not
        the task's current, unfinished attempt."""
        if outcome not in STOP_OUTCOMES:
            raise SchedulerError(
                f"cancel {target}: outcome {outcome.value!r} is not a way to stop a task "
                f"(fix: use one of {', '.join(sorted(s.value for s in STOP_OUTCOMES))})"
            )
        keys = self.resolve(target)
        if attempt is not None:
            current = self.active.get(keys[0]) if len(keys) == 1 else None
            if current is None or current.number != attempt or current.ended:
                return None
        why = reason or ("cancelled" if outcome is TaskState.CANCELLED else outcome.value)
        removed, to_stop = 0, []
        for key in keys:
            if attempt is None:
                removed += self._end_queued(key, outcome, reason or f"{why} while queued")
            running = self.active.get(key)
            if running is not None and not running.cancelled:
                running.cancelled = True
                running.stop_state, running.stop_reason = outcome, why
                to_stop.append(running)
        return removed, to_stop

    def _end_queued(self, key: str, state: TaskState, reason: str) -> int:
        """A queued (or held) task -> terminal `state` now; 1 if it was queued, else 0."""
        items = [*self.queue.cancel(task_id=key).removed]
        held = self.held.pop(key, None)
        if held is not None:
            items.append(held)
        for item in items:
            self._set(self.tasks[key], state, item.attempt, reason, self.node, self.clock())
        return len(items)

    # -- budgets -------------------------------------------------------------------------

    def exhaust_batch(self, batch_id: str, reason: str = "batch budget reached") -> int:
        """The batch's budget is spent: its queued tasks end `budget_exceeded` now (running
        attempts go on; the gateway stops them at the cap). Returns how many ended."""
        batch = self.batches.get(batch_id)
        if batch is None or batch.done:
            return 0
        self.exhausted.add(batch_id)
        return sum(
            self._end_queued(f"{batch_id}/{t}", TaskState.BUDGET_EXCEEDED, reason)
            for t, task in batch.tasks.items()
            if task.state is TaskState.QUEUED
        )

    def hold_team(self, team: str) -> int:
        """The team's budget is spent: park its queued tasks off the queue (they stay
        `queued`; nothing of the team is admitted) until `release_team`. Returns how many."""
        self.held_teams.add(team)
        n = 0
        for batch_id, batch in self.batches.items():
            if batch.plan.team != team or batch.done:
                continue
            for item in self.queue.cancel(batch=batch_id).removed:
                self.held[item.task_id] = item
                n += 1
        return n

    def release_team(self, team: str) -> int:
        """The team may spend again: its parked tasks go back in the queue."""
        self.held_teams.discard(team)
        back = [item for item in self.held.values() if item.team == team]
        for item in back:
            del self.held[item.task_id]
            self.queue.push(item)
        return len(back)

    def waiting_batches(self) -> list[str]:
        """Batches with queued tasks that their budget has not ended yet."""
        return [
            b for b, batch in self.batches.items()
            if batch.counts[TaskState.QUEUED] and b not in self.exhausted
        ]  # fmt: skip

    def waiting_teams(self) -> set[str]:
        """Teams with tasks queued or parked (whose budgets the scheduler asks about)."""
        teams = {item.team for item in self.held.values()}
        teams.update(t for t, stats in self.queue.stats().teams.items() if stats.queued)
        return teams

    def _enqueue(self, item: QueueItem) -> None:
        if item.team in self.held_teams:
            self.held[item.task_id] = item
        else:
            self.queue.push(item)

    def lost(self, task_id: str, batch: str, number: int) -> None:
        """An attempt the previous scheduler lost: its `tasks` row (outcome unknown: failed)."""
        task = self.tasks[f"{batch}/{task_id}"]
        self._summaries.append(
            attempt_summary(task.spec, attempt=number, outcome=TaskState.FAILED,
                            template=task.spec.template, result=None, node="",
                            started=None, time=self.clock())
        )  # fmt: skip

    def resolve(self, target: str) -> list[str]:
        """A batch id, `batch/task`, or a task id unique across batches -> task keys."""
        if target in self.batches:
            return [f"{target}/{t}" for t in self.batches[target].tasks]
        if target in self.tasks:
            return [target]
        keys = [k for k in self.tasks if k.split("/", 1)[1] == target]
        if len(keys) > 1:
            raise SchedulerError(
                f"task id {target!r} is in several batches (fix: cancel BATCH/{target})"
            )
        if not keys:
            raise SchedulerError(
                f"no batch or task {target!r} in the scheduler (fix: check `sandfleet status`)"
            )
        return keys

    def _set(self, task: Task, state: TaskState, attempt: int, reason: str, node: str,
             when: datetime, result: Mapping[str, Any] | None = None) -> None:  # fmt: skip
        previous = task.state
        self._events.append(
            state_event(task.spec, state=state, previous=previous, attempt=attempt,
                        reason=reason, node=node, time=when, result=result)
        )  # fmt: skip
        counts = self.batches[task.spec.batch].counts
        counts[previous] -= 1
        counts[state] += 1
        task.state, task.attempt = state, attempt

    # -- output --------------------------------------------------------------------

    def take_rows(self) -> list[tuple[str, list[Any]]]:
        """The rows gathered since the last call, per table, in order."""
        out: list[tuple[str, list[Any]]] = []
        if self._events:
            out.append(("events", self._events))
        if self._summaries:
            out.append(("tasks", self._summaries))
        self._events, self._summaries = [], []
        return out

    def snapshot(self, batch_id: str | None = None) -> dict[str, Any]:
        """Counts per batch and state; per team (of unfinished batches) tasks queued and
        running, and attempts admitted (running, or started and waiting in Ray)."""
        batches = {
            b: {
                "team": s.plan.team,
                "backend": s.plan.backend.value,
                "total": len(s.tasks),
                "states": {k.value: v for k, v in sorted(s.counts.items()) if v},
                "done": s.done,
            }
            for b, s in self.batches.items()
            if batch_id is None or b == batch_id
        }
        teams: dict[str, dict[str, int]] = {}
        for b in self.batches.values():
            if b.done:
                continue
            row = teams.setdefault(b.plan.team, {"queued": 0, "running": 0, "admitted": 0})
            row["queued"] += b.counts[TaskState.QUEUED]
            row["running"] += b.counts[TaskState.RUNNING]
        for team, stats in self.queue.stats().teams.items():
            if team in teams:
                teams[team]["admitted"] = stats.running  # running + started, not yet running
        return {"batches": batches, "teams": dict(sorted(teams.items()))}
