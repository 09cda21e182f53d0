"""`FleetScheduler`: the named actor that queues, admits, dispatches and records attempts.

One per cluster (`fleet-scheduler` in namespace `sandfleet`, `num_cpus=0`, detached, on
the head when the cluster has the `sandfleet_head` resource; `get_scheduler`, from
`fleet_lookup`, finds or starts it). A threaded actor: method calls (submit, resume,
cancel, status, wait) and one loop thread share its state under a lock. Each turn of
the loop:

1. admits from the `FleetQueue` (priority, fair share, team quotas from
   configs/policies.yaml) what fits the cluster's free sandbox slots, CPUs and memory
   (plus a small lookahead, see `state.free_capacity`), and starts each as a
   `run_attempt` Ray task;
2. publishes the admissible backlog to the autoscaler (`DemandPublisher`), cleared when
   the queue drains;
3. collects finished attempts (`ray.wait`), judges them (`scheduler.state`): a result is
   a terminal state; an infrastructure failure is a new attempt; a cancelled or lost
   attempt's leftovers are swept from its node first (`fleet_sweep`);
4. writes the state changes (`task_state` events) and one `tasks` row per attempt
   through the `LedgerActor`, a few large calls a second (`fleet_outbox.LedgerOutbox`).

A task is `queued` until its attempt reports in from its node (`running`, with the
node id), then terminal or `queued` again as the next attempt. `resume` rebuilds a
batch from the ledger after the scheduler was lost (see `scheduler.state.recover_batch`).

Budgets: when a `budget` actor (the `BudgetKeeper`) runs in the namespace, each batch
is registered with it on submit and resume, and the scheduler keeps asking it whether
each waiting batch and team is exhausted (`scheduler.fleet_budget.BudgetGate`, which
never blocks the loop): an exhausted batch's queued tasks end `budget_exceeded` ("batch
budget reached"); an exhausted team's tasks wait, parked, until it may spend again.
Nothing is admitted on answers older than half a second, before the keeper answered
about a new batch, or while it does not answer (fail closed).
`cancel(..., outcome="stopped_by_rule", reason=..., attempt=n)` is how the Monitor stops
an attempt by rule.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, Final

import ray

from accounting.errors import SchedulerError
from accounting.policies import Policies, load_policies
from accounting.schemas import TaskState
from scheduler.autoscale import SLOT_RESOURCE, DemandPublisher
from scheduler.book import Attempt, FleetBook
from scheduler.fleet_budget import BUDGET_NAME, BudgetGate
from scheduler.fleet_lookup import SCHEDULER_NAME, get_scheduler
from scheduler.fleet_outbox import LedgerOutbox
from scheduler.fleet_sweep import Sweeps, sweep_batch
from scheduler.ledger_actor import get_ledger
from scheduler.plan import Backend, Plan, plan_batch
from scheduler.queue import Capacity, FleetQueue
from scheduler.records import queued_events, submitted_event, utcnow
from scheduler.runner import attempt_options, attempt_request, run_attempt
from scheduler.spec import BatchSpec
from scheduler.state import (
    Verdict,
    free_capacity,
    judge_error,
    judge_result,
    next_step,
    queue_policies,
    recover_batch,
)

__all__ = ["BUDGET_NAME", "SCHEDULER_NAME", "FleetScheduler", "get_scheduler"]

log = logging.getLogger(__name__)

_TOTALS_EVERY_S: Final = 1.0


# A threaded actor: the loop thread, method calls and start notices share it under a lock.
@ray.remote(num_cpus=0, max_concurrency=32, max_restarts=-1, max_task_retries=0)  # type: ignore[call-overload]
class FleetScheduler:
    """Queue, admission, dispatch, retries, cancel and resume (see the module doc)."""

    def __init__(
        self,
        data_dir: str,
        policies: Policies | None = None,
        max_slots: int | None = None,
        tick_s: float = 0.05,
        cancel_grace_s: float = 30.0,
        lookahead: float = 0.25,
    ) -> None:
        self._data_dir = data_dir
        self._policies = policies or load_policies()
        teams, default = queue_policies(self._policies)
        ctx = ray.get_runtime_context()
        self._me = (SCHEDULER_NAME, ctx.get_actor_id())
        self._node = ctx.get_node_id()
        self._book = FleetBook(FleetQueue(teams, default), node=self._node)
        self._ledger = get_ledger(data_dir)
        self._outbox = LedgerOutbox(self._ledger)
        self._fixed_max = max_slots
        self._demand = DemandPublisher(max_slots or 0)
        self._demand.clear()  # a restarted scheduler must not inherit a stale floor
        self._tick_s = tick_s
        self._lookahead = lookahead
        self._cancel_grace_s = cancel_grace_s
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._budget = BudgetGate(self._lock)
        self._inflight: dict[Any, Attempt] = {}  # run_attempt ref -> attempt
        self._sweeps = Sweeps(data_dir)
        self._totals = (0, 0.0, 0)
        self._totals_at = 0.0
        self._fault: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="fleet-loop", daemon=True)
        self._thread.start()

    # -- the API -------------------------------------------------------------------

    def submit(self, plan: Plan) -> dict[str, Any]:
        """Queue every task of a planned batch; the spec and the queued states are durable
        in the ledger before anything is admitted."""
        with self._lock:
            self._raise_fault()
            self._book.check_new(plan.batch_id)
        self._budget.register(plan)
        with self._lock:
            self._raise_fault()
            self._book.check_new(plan.batch_id)
            now = utcnow()
            submitted = submitted_event(plan.spec, tasks=len(plan.tasks),
                                        options={"backend": plan.backend.value},
                                        node=self._node, time=now)  # fmt: skip
            table = queued_events(plan.tasks, reason="submitted", node=self._node, time=now)
            self._write([("events", [submitted]), ("events", table)], durable=True)
            self._book.register(plan, {t.task_id: 1 for t in plan.tasks}, {})
            self._budget.invalidate()  # ask about the new batch before admitting it
            self._changed.notify_all()
            return self._status(plan.batch_id)

    def resume(self, batch_id: str, backend: str | None = None) -> dict[str, Any]:
        """Rebuild `batch_id` from the ledger, sweep its orphans, requeue what is unfinished."""
        from scheduler.history import batch_events

        with self._lock:
            self._raise_fault()
            self._book.forget(batch_id)  # refuses a batch still running here
        ray.get(self._ledger.flush.remote())
        recovery = recover_batch(batch_id, batch_events(self._data_dir, batch_id))
        spec = BatchSpec.from_record(dict(recovery.spec))
        kind = backend or str(recovery.options.get("backend") or Backend.DOCKER.value)
        plan = plan_batch(spec, backend=kind, policies=self._policies)
        swept = sweep_batch(plan, self._data_dir) if recovery.todo else []
        if recovery.todo:
            self._budget.register(plan)
        with self._lock:
            self._book.register(plan, dict(recovery.todo), dict(recovery.done))
            self._budget.invalidate()
            for task_id, number in recovery.lost:
                self._book.lost(task_id, batch_id, number)
            rows = self._book.take_rows()
            if recovery.todo:
                by_id = {t.task_id: t for t in plan.tasks}
                table = queued_events(
                    [by_id[t] for t in recovery.todo], attempts=dict(recovery.todo),
                    previous={t: TaskState.RUNNING for t, _ in recovery.lost},
                    reason="requeued by resume (the scheduler that ran it was lost)",
                    node=self._node, time=utcnow(),
                )  # fmt: skip
                rows.append(("events", table))
            self._write(rows, durable=True)
            self._changed.notify_all()
            return {**self._status(batch_id), "swept": swept}

    def cancel(
        self, target: str, *, outcome: str | TaskState = TaskState.CANCELLED,
        reason: str | None = None, attempt: int | None = None,
    ) -> dict[str, Any] | bool:  # fmt: skip
        """Cancel a batch, a task id, or `batch/task`: queued -> `outcome` at once; running
        -> its attempt is cancelled (its sandbox stopped and swept, then `outcome` with
        `reason`, never retried). `outcome` is `cancelled` (a person), `stopped_by_rule`
        (the Monitor) or `budget_exceeded`. With `attempt`, only that attempt of one task
        is stopped; False (nothing done) when it is not the task's current attempt."""
        try:
            state = TaskState(outcome)
        except ValueError:
            raise SchedulerError(
                f"cancel {target}: unknown outcome {outcome!r} (fix: cancelled, "
                "stopped_by_rule or budget_exceeded)"
            ) from None
        with self._lock:
            done = self._book.cancel(target, outcome=state, reason=reason, attempt=attempt)
            if done is None:
                log.info("cancel %s attempt %s refused: not its current attempt", target, attempt)
                return False
            removed, attempts = done
            for attempt_ in attempts:
                attempt_.cancel_at = time.monotonic()
                if not attempt_.ended:
                    ray.cancel(attempt_.ref, force=False)
            self._write(self._book.take_rows(), settle=True)
            self._changed.notify_all()
        return {"target": target, "cancelled_queued": removed, "cancelling_running": len(attempts)}

    def attempt_started(self, batch: str, task: str, number: int, node: str) -> None:
        """Called by `run_attempt` on its node: record `running` with the node."""
        with self._lock:
            self._book.started(batch, task, number, node)

    def status(self, batch_id: str | None = None) -> dict[str, Any]:
        """Counts per batch and state, per team, and the cluster's slots."""
        with self._lock:
            return self._status(batch_id)

    def wait(self, batch_id: str, timeout_s: float = 1.0) -> dict[str, Any]:
        """Block until the batch is done (or `timeout_s`); return its status."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while not self._book.done(batch_id) and not self._fault:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._changed.wait(left)
            return self._status(batch_id)

    def data_dir(self) -> str:
        return self._data_dir

    def pid(self) -> int:
        return os.getpid()

    def close(self) -> None:
        """Stop the loop and clear the autoscaler request (the actor stays)."""
        self._stop.set()
        self._thread.join(timeout=30)
        with self._lock:
            self._write(self._book.take_rows(), settle=True)
            self._demand.clear()

    # -- helpers -----------------------------------------------------------------------

    def _status(self, batch_id: str | None) -> dict[str, Any]:
        snap = self._book.snapshot(batch_id)
        snap["cluster"] = {
            "slots": self._totals[0],
            "in_use": len(self._inflight),
            "demand": self._demand.published or 0,
        }
        snap["fault"] = self._fault
        snap["budget"] = {
            "keeper": self._budget.has_keeper,
            "held_teams": sorted(self._book.held_teams),
            "exhausted_batches": sorted(self._book.exhausted),
        }
        return snap

    def _write(self, rows: list[tuple[str, Any]], *, settle: bool = False,
               durable: bool = False) -> None:  # fmt: skip
        """Queue rows for the ledger; see `LedgerOutbox.send` for `settle` and `durable`."""
        self._outbox.add(rows)
        self._outbox.send(settle=settle, durable=durable)

    def _raise_fault(self) -> None:
        if self._fault:
            raise SchedulerError(f"the scheduler stopped: {self._fault}")

    # -- the loop ------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._turn()
            except Exception as e:  # recorded and reported by status()/wait(), never hidden
                log.exception("fleet scheduler loop failed")
                with self._lock:
                    self._fault = f"{type(e).__name__}: {e}"
                    self._changed.notify_all()
                return

    def _turn(self) -> None:
        ended = self._budget.poll(self._book)
        with self._lock:
            if ended:  # a batch the budget ended is reported done once the ledger has its rows
                self._write(self._book.take_rows(), settle=True)
                self._changed.notify_all()
            self._expire_cancels()
            self._admit()
            self._demand.publish(self._book.queue.backlog(limit=self._demand.max_slots).demand)
            self._write(self._book.take_rows())
            refs = [*self._inflight, *self._sweeps, *self._budget.refs()]
            if not refs:
                self._changed.wait(self._tick_s)
                return
        ready, _ = ray.wait(refs, num_returns=1, timeout=self._tick_s)
        if ready:
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        # Only this thread adds to or takes from `_inflight` and `_sweeps`.
        attempts = [ref for ref in ready if ref in self._inflight]
        outcomes = _outcomes(attempts)
        swept = [ref for ref in ready if ref in self._sweeps]
        if not attempts and not swept:
            return
        with self._lock:
            touched = {self._inflight[ref].task.spec.batch for ref in attempts}
            touched.update(self._sweeps.batch_of(ref) for ref in swept)
            pending = [b for b in touched if not self._book.done(b)]
            for ref, (result, error) in zip(attempts, outcomes, strict=True):
                self._judge(self._inflight.pop(ref), result, error)
            for ref in swept:
                self._sweeps.done(ref, self._book)
            finished = any(self._book.done(b) for b in pending)
            # A batch is reported done only once the ledger has accepted all of its rows.
            self._write(self._book.take_rows(), settle=finished)
            if finished:  # what `wait` waits for
                self._changed.notify_all()

    def _capacity(self) -> Capacity:
        now = time.monotonic()
        if now - self._totals_at >= _TOTALS_EVERY_S:
            res = ray.cluster_resources()
            self._totals = (
                int(res.get(SLOT_RESOURCE, 0)),
                float(res.get("CPU", 0)),
                int(res.get("memory", 0)),
            )
            self._totals_at = now
            if self._fixed_max is None:
                self._demand.max_slots = self._totals[0]
        held = [(a.cpus, a.memory) for a in self._inflight.values()]
        return free_capacity(self._totals, held, lookahead=self._lookahead)

    def _admit(self) -> None:
        if self._fault or not len(self._book.queue) or not self._budget.may_admit():
            return  # (or the budget keeper must answer first: see `fleet_budget`)
        capacity = self._capacity()
        if capacity.slots <= 0:
            return
        for attempt in self._book.admit(capacity):
            task = attempt.task
            plan = self._book.plan_of(task)
            request = attempt_request(plan, task.spec, attempt.number, self._data_dir)
            options = attempt_options(
                plan.templates[task.spec.template], name=f"{task.key}#{attempt.number}"
            )
            attempt.ref = run_attempt.options(**options).remote(request, self._me)
            self._inflight[attempt.ref] = attempt

    def _expire_cancels(self) -> None:
        now = time.monotonic()
        for attempt in self._inflight.values():
            late = attempt.cancel_at is not None and now - attempt.cancel_at >= self._cancel_grace_s
            if late and not attempt.forced:
                ray.cancel(attempt.ref, force=True)
                attempt.forced = True

    def _judge(self, attempt: Attempt, result: Any, error: Exception | None) -> None:
        """An attempt's Ray task ended with `result`, or `error` (what `ray.get` raised)."""
        attempt.ended = True
        if error is None:
            try:
                verdict = judge_result(result)
            except Exception as e:  # a malformed result: judged as the error it raised
                error = e
        if error is not None:
            verdict = judge_error(error, cancelled_by_us=attempt.cancelled)
        if attempt.cancelled and (verdict.infra or result is None):
            verdict = Verdict(attempt.stop_state, attempt.stop_reason)
        step = next_step(verdict, attempt.number, attempt.task.spec.max_attempts)
        plan = self._book.plan_of(attempt.task)
        if plan.backend is Backend.DOCKER and (verdict.infra or result is None):
            self._sweeps.start(attempt, plan, result, step)
            return
        self._book.finish(attempt, result, step)


def _outcomes(refs: list[Any]) -> list[tuple[Any, Exception | None]]:
    """(result, None) or (None, what `ray.get` raised) for each finished ref: one call for
    all of them, and one per ref only when some of them raised."""
    if not refs:
        return []
    try:
        return [(result, None) for result in ray.get(refs)]
    except Exception:  # one of them raised: sort them out one by one
        return [_outcome(ref) for ref in refs]


def _outcome(ref: Any) -> tuple[Any, Exception | None]:
    try:
        return ray.get(ref), None
    except Exception as e:  # whatever ray.get raises is how this attempt ended
        return None, e
