"""Sweeping what lost or cancelled attempts left on their nodes, for the `FleetScheduler`.

An attempt of a Docker batch that ended without a result (cancelled, its node or worker
lost) or with an infrastructure failure may have left a container or a workspace behind.
Before its task is finished (or requeued) its node is swept (`sweep_sandboxes`, placed
on that node when it still lives): `Sweeps.start` sends the sweep, and `Sweeps.done`
finishes the attempt in the book once the sweep is back, noting what could not be
removed. `sweep_batch` removes a whole batch's leftovers on every live node (resume).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Final

import ray

from accounting.errors import SchedulerError
from scheduler.book import Attempt, FleetBook
from scheduler.plan import Backend, Plan
from scheduler.runner import on_node, sweep_sandboxes
from scheduler.state import Step

__all__ = ["SWEEP_TIMEOUT_S", "Sweeps", "sweep_batch"]

SWEEP_TIMEOUT_S: Final = 120.0


class Sweeps:
    """Attempts whose node is being swept: sweep ref -> (attempt, its result, its step)."""

    def __init__(self, data_dir: str) -> None:
        self._data_dir = data_dir
        self._pending: dict[Any, tuple[Attempt, dict[str, Any] | None, Step]] = {}

    def __contains__(self, ref: Any) -> bool:
        return ref in self._pending

    def __iter__(self) -> Iterator[Any]:
        return iter(self._pending)

    def __len__(self) -> int:
        return len(self._pending)

    def batch_of(self, ref: Any) -> str:
        """The batch of the attempt whose node the sweep `ref` sweeps."""
        return self._pending[ref][0].task.spec.batch

    def start(
        self, attempt: Attempt, plan: Plan, result: dict[str, Any] | None, step: Step
    ) -> None:
        """Sweep the attempt's node; the attempt is finished when the sweep is back."""
        spec = attempt.task.spec
        sweep = sweep_sandboxes.options(**on_node(attempt.node)).remote(
            plan.backend, self._data_dir, spec.batch, spec.task_id, attempt.number
        )
        self._pending[sweep] = (attempt, result, step)

    def done(self, ref: Any, book: FleetBook) -> None:
        """The sweep `ref` is back: finish its attempt in `book` (under the scheduler's lock)."""
        attempt, result, step = self._pending.pop(ref)
        try:
            swept = ray.get(ref)
        except Exception as e:  # the sweep's node may be gone too: say so, go on
            swept = {"failures": [f"sweep failed: {type(e).__name__}: {e}"]}
        failures = swept.get("failures") or []
        if result is None and swept.get("metered"):  # a cancelled runner: the node's metering
            result = {**swept["metered"], "node": attempt.node}
        if failures:
            step = Step(step.state, step.attempt, f"{step.reason}; left behind: {failures}")
        book.finish(attempt, result, step)


def sweep_batch(plan: Plan, data_dir: str) -> list[str]:
    """Remove the batch's leftover containers and workspaces on every live node."""
    if plan.backend is not Backend.DOCKER:
        return []
    nodes = [n["NodeID"] for n in ray.nodes() if n.get("Alive")]
    refs = [
        sweep_sandboxes.options(**on_node(n, soft=False)).remote(
            plan.backend, data_dir, plan.batch_id
        )
        for n in nodes
    ]
    reports = ray.get(refs, timeout=SWEEP_TIMEOUT_S)
    failures = [f for r in reports for f in r.get("failures", [])]
    if failures:
        raise SchedulerError(
            f"resume {plan.batch_id}: could not remove its leftovers: {failures[:5]} "
            "(fix: `sandfleet sandbox reap` on those nodes, then resume again)"
        )
    return [c for r in reports for c in r.get("containers", [])]
