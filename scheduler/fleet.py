"""`FleetScheduler`: the named actor that queues, admits, dispatches and records attempts.

One per cluster (`fleet-scheduler` in namespace `sandfleet`, `num_cpus=0`, detached, on
the head when the cluster has the `sandfleet_head` resource). A threaded actor: method
calls (submit, resume, cancel, status, wait) and one loop thread share its state under
a lock. Each turn of the loop:

1. admits from the `FleetQueue` (priority, fair share, team quotas from
   configs/policies.yaml) what fits the cluster's free sandbox slots, CPUs and memory
   (plus a small lookahead, see `state.free_capacity`), and starts each as a
   `run_attempt` Ray task;
2. publishes the admissible backlog to the autoscaler (`DemandPublisher`), cleared when
   the queue drains;
3. collects finished attempts (`ray.wait`), judges them (`scheduler.state`): a result is
   a terminal state; an infrastructure failure is a new attempt; a cancelled or lost
   attempt's leftovers are swept from its node first;
4. writes the state changes (`task_state` events) and one `tasks` row per attempt
   through the `LedgerActor`.

A task is `queued` until its attempt reports in from its node (`running`, with the
node id), then terminal or `queued` again as the next attempt. `resume` rebuilds a
batch from the ledger after the scheduler was lost (see `scheduler.state.recover_batch`).

Budgets: when a `budget` actor (the `BudgetKeeper`) runs in the namespace, each batch
is registered with it on submit and resume, and before admitting (at most every
`_BUDGET_EVERY_S`, and at once after a submit) the scheduler asks it whether each
waiting batch and team is exhausted: an exhausted batch's queued tasks end
`budget_exceeded` ("batch budget reached"); an exhausted team's tasks wait, parked,
until it may spend again. A keeper that does not answer holds admission (fail closed).
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
from ray.exceptions import GetTimeoutError, RayError

from accounting.errors import BudgetError, ConfigError, SchedulerError
from accounting.policies import Policies, load_policies
from accounting.schemas import TaskState
from scheduler.autoscale import SLOT_RESOURCE, DemandPublisher
from scheduler.book import Attempt, FleetBook
from scheduler.ledger_actor import NAMESPACE, get_ledger, head_options
from scheduler.plan import Backend, Plan, plan_batch
from scheduler.queue import Capacity, FleetQueue
from scheduler.records import queued_events, submitted_event, utcnow
from scheduler.runner import attempt_options, attempt_request, on_node, run_attempt, sweep_sandboxes
from scheduler.spec import BatchSpec
from scheduler.state import (
    Step,
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

SCHEDULER_NAME: Final = "fleet-scheduler"
_TOTALS_EVERY_S: Final = 1.0
_SWEEP_TIMEOUT_S: Final = 120.0
_SEND_EVERY_S: Final = 0.25  # rows reach the ledger actor at most this late
_SEND_TABLES: Final = 256  # ... or once this many row batches wait
BUDGET_NAME: Final = "budget"  # the BudgetKeeper actor (scheduler.budget_keeper)
_BUDGET_EVERY_S: Final = 0.5  # how stale the keeper's answers may get before admitting
_BUDGET_LOOKUP_EVERY_S: Final = 2.0  # while no keeper runs, look for one this often
_BUDGET_TIMEOUT_S: Final = 10.0


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
        self._fixed_max = max_slots
        self._demand = DemandPublisher(max_slots or 0)
        self._demand.clear()  # a restarted scheduler must not inherit a stale floor
        self._tick_s = tick_s
        self._lookahead = lookahead
        self._cancel_grace_s = cancel_grace_s
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._inflight: dict[Any, Attempt] = {}  # run_attempt ref -> attempt
        self._sweeps: dict[Any, tuple[Attempt, dict[str, Any] | None, Step]] = {}
        self._outbox: list[tuple[str, Any]] = []  # rows not yet sent to the ledger
        self._sent_at = 0.0
        self._writes: list[Any] = []  # ledger calls not yet known to have succeeded
        self._totals = (0, 0.0, 0)
        self._totals_at = 0.0
        self._fault: str | None = None
        self._keeper: Any = None  # the `budget` actor, once found
        self._keeper_looked = -_BUDGET_LOOKUP_EVERY_S
        self._budget_at = -_BUDGET_EVERY_S  # when the keeper last answered
        self._budget_ok = True  # False: the keeper did not answer; admit nothing
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
        self._register_budget(plan)
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
            self._budget_at = -_BUDGET_EVERY_S  # ask about the new batch before admitting it
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
        swept = self._sweep_batch(plan) if recovery.todo else []
        if recovery.todo:
            self._register_budget(plan)
        with self._lock:
            self._book.register(plan, dict(recovery.todo), dict(recovery.done))
            self._budget_at = -_BUDGET_EVERY_S
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
            "keeper": self._keeper is not None,
            "held_teams": sorted(self._book.held_teams),
            "exhausted_batches": sorted(self._book.exhausted),
        }
        return snap

    def _write(self, rows: list[tuple[str, Any]], *, settle: bool = False,
               durable: bool = False) -> None:  # fmt: skip
        """Queue rows for the ledger and send them, in order, at most every `_SEND_EVERY_S`
        (one actor call carries many turns' rows; calls from one caller run in order).
        `settle` sends now and waits until every row is accepted; `durable` also waits
        until it is on disk. A refused write raises (here, or at the next settle)."""
        self._outbox.extend(rows)
        now = time.monotonic()
        due = now - self._sent_at >= _SEND_EVERY_S or len(self._outbox) > _SEND_TABLES
        if self._outbox and (due or settle or durable):
            self._writes.append(self._ledger.append_many.remote(self._outbox))
            self._outbox, self._sent_at = [], now
        if durable:
            self._writes.append(self._ledger.flush.remote())
        if settle or durable:
            writes, self._writes = self._writes, []
            ray.get(writes)
        elif len(self._writes) > 16:  # back-pressure, and surface errors early
            done, self._writes = ray.wait(self._writes, num_returns=len(self._writes), timeout=0)
            ray.get(done)

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
        self._check_budgets()
        with self._lock:
            self._expire_cancels()
            self._admit()
            self._demand.publish(self._book.queue.backlog(limit=self._demand.max_slots).demand)
            self._write(self._book.take_rows())
            refs = [*self._inflight, *self._sweeps]
            if not refs:
                self._changed.wait(self._tick_s)
                return
        ready, _ = ray.wait(refs, num_returns=1, timeout=self._tick_s)
        if ready:
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        with self._lock:
            pending = [b for b in self._book.batches if not self._book.done(b)]
            for ref in ready:
                if ref in self._inflight:
                    self._judge(self._inflight.pop(ref), ref)
                elif ref in self._sweeps:
                    self._swept(ref)
            finished = any(self._book.done(b) for b in pending)
            # A batch is reported done only once the ledger has accepted all of its rows.
            self._write(self._book.take_rows(), settle=finished)
            if ready:
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
        if self._fault or not self._budget_ok or not len(self._book.queue):
            return
        stale = time.monotonic() - self._budget_at >= _BUDGET_EVERY_S
        if self._keeper is not None and stale:
            return  # a batch arrived since the keeper last answered: ask it first
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

    # -- budgets ---------------------------------------------------------------------

    def _budget_keeper(self, *, now: bool = False) -> Any:
        """The `budget` actor, or None while none runs (looked for again every few seconds,
        or `now`)."""
        if self._keeper is not None:
            return self._keeper
        at = time.monotonic()
        if not now and at - self._keeper_looked < _BUDGET_LOOKUP_EVERY_S:
            return None
        self._keeper_looked = at
        try:
            self._keeper = ray.get_actor(BUDGET_NAME, namespace=NAMESPACE)
        except ValueError:
            return None
        return self._keeper

    def _register_budget(self, plan: Plan) -> None:
        """Tell the keeper (if one runs) the batch's caps before any of it is admitted."""
        keeper = self._budget_keeper(now=True)
        if keeper is None:
            return
        try:
            from scheduler.budget_keeper import batch_caps
        except ImportError:  # an older keeper module: the policies' default caps apply
            caps: dict[str, Any] = {"batch_id": plan.batch_id, "team": plan.team}
        else:
            caps = batch_caps(plan.spec)
        try:
            ray.get(keeper.register_batch.remote(**caps), timeout=_BUDGET_TIMEOUT_S)
        except (GetTimeoutError, RayError) as e:
            self._keeper = None
            raise BudgetError(
                f"batch {plan.batch_id}: the budget keeper did not register it ({e}); nothing "
                f"was started (fix: check the `{BUDGET_NAME}` actor with `ray list actors`, "
                "then run the batch again)"
            ) from None

    def _check_budgets(self) -> None:
        """Ask the keeper whether each waiting batch and team is exhausted; end or park
        their queued tasks. A keeper that does not answer holds admission."""
        with self._lock:
            if time.monotonic() - self._budget_at < _BUDGET_EVERY_S:
                return
            if not len(self._book.queue) and not self._book.held:
                return
            keeper = self._budget_keeper()
            if keeper is None:
                self._budget_ok = True
                return
            batches = self._book.waiting_batches()
            teams = sorted(self._book.waiting_teams())
        try:
            refs = [keeper.batch_exhausted.remote(b) for b in batches]
            refs += [keeper.team_exhausted.remote(t) for t in teams]
            answers = ray.get(refs, timeout=_BUDGET_TIMEOUT_S)
        except (GetTimeoutError, RayError) as e:
            log.warning("the budget keeper did not answer (%s): admitting nothing for now", e)
            with self._lock:
                self._keeper = None if not isinstance(e, GetTimeoutError) else self._keeper
                self._budget_ok = False
                self._budget_at = time.monotonic()
            return
        with self._lock:
            ended = False
            for batch_id, exhausted in zip(batches, answers[: len(batches)], strict=True):
                if exhausted:
                    self._book.exhaust_batch(batch_id)
                    ended = ended or self._book.done(batch_id)
            for team, exhausted in zip(teams, answers[len(batches) :], strict=True):
                if exhausted and team not in self._book.held_teams:
                    self._book.hold_team(team)
                elif not exhausted and team in self._book.held_teams:
                    self._book.release_team(team)
            self._budget_ok = True
            self._budget_at = time.monotonic()
            # A batch the budget ended is reported done only once the ledger has its rows.
            self._write(self._book.take_rows(), settle=ended)
            if ended:
                self._changed.notify_all()

    def _expire_cancels(self) -> None:
        now = time.monotonic()
        for attempt in self._inflight.values():
            late = attempt.cancel_at is not None and now - attempt.cancel_at >= self._cancel_grace_s
            if late and not attempt.forced:
                ray.cancel(attempt.ref, force=True)
                attempt.forced = True

    def _judge(self, attempt: Attempt, ref: Any) -> None:
        attempt.ended = True
        result: dict[str, Any] | None = None
        try:
            result = ray.get(ref)
            verdict = judge_result(result)
        except Exception as e:  # whatever ray.get raises is how this attempt ended
            verdict = judge_error(e, cancelled_by_us=attempt.cancelled)
        if attempt.cancelled and (verdict.infra or result is None):
            verdict = Verdict(attempt.stop_state, attempt.stop_reason)
        step = next_step(verdict, attempt.number, attempt.task.spec.max_attempts)
        plan = self._book.plan_of(attempt.task)
        if plan.backend is Backend.DOCKER and (verdict.infra or result is None):
            spec = attempt.task.spec
            sweep = sweep_sandboxes.options(**on_node(attempt.node)).remote(
                plan.backend, self._data_dir, spec.batch, spec.task_id, attempt.number
            )
            self._sweeps[sweep] = (attempt, result, step)
            return
        self._book.finish(attempt, result, step)

    def _swept(self, ref: Any) -> None:
        attempt, result, step = self._sweeps.pop(ref)
        try:
            swept = ray.get(ref)
        except Exception as e:  # the sweep's node may be gone too: say so, go on
            swept = {"failures": [f"sweep failed: {type(e).__name__}: {e}"]}
        failures = swept.get("failures") or []
        if result is None and swept.get("metered"):  # a cancelled runner: the node's metering
            result = {**swept["metered"], "node": attempt.node}
        if failures:
            step = Step(step.state, step.attempt, f"{step.reason}; left behind: {failures}")
        self._book.finish(attempt, result, step)

    def _sweep_batch(self, plan: Plan) -> list[str]:
        """Remove the batch's leftover containers and workspaces on every live node."""
        if plan.backend is not Backend.DOCKER:
            return []
        nodes = [n["NodeID"] for n in ray.nodes() if n.get("Alive")]
        refs = [
            sweep_sandboxes.options(**on_node(n, soft=False)).remote(
                plan.backend, self._data_dir, plan.batch_id
            )
            for n in nodes
        ]
        reports = ray.get(refs, timeout=_SWEEP_TIMEOUT_S)
        failures = [f for r in reports for f in r.get("failures", [])]
        if failures:
            raise SchedulerError(
                f"resume {plan.batch_id}: could not remove its leftovers: {failures[:5]} "
                "(fix: `sandfleet sandbox reap` on those nodes, then resume again)"
            )
        return [c for r in reports for c in r.get("containers", [])]


def get_scheduler(
    data_dir: str, *, policies: Policies | None = None, max_slots: int | None = None
) -> Any:
    """The cluster's scheduler actor, created on first use (on the head when it can be),
    with the cluster's budget keeper (the runner's gateway fails closed without one)."""
    try:
        from scheduler.budget_keeper import get_budget_keeper
    except ImportError:  # no keeper in this build: budgets are not enforced
        pass
    else:
        get_budget_keeper(policies, data_dir)
    handle = FleetScheduler.options(  # type: ignore[attr-defined]
        name=SCHEDULER_NAME,
        namespace=NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
        **head_options(),
    ).remote(data_dir, policies, max_slots)
    actual = ray.get(handle.data_dir.remote())
    if actual != data_dir:
        raise ConfigError(
            f"--data-dir {data_dir}: this Ray cluster's scheduler records into {actual} "
            f"(fix: pass --data-dir {actual}, or use another cluster)"
        )
    return handle
