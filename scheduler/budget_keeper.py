"""`BudgetKeeper`: the cluster's one `BudgetBook`, as a named Ray actor (`budget`).

Named `budget` in namespace `sandfleet`, `num_cpus=0`, detached, on the head when the
cluster has the `sandfleet_head` resource; a threaded actor (the book is thread-safe).
Caps come from `configs/policies.yaml` (team per day and month, default batch and task
budgets) and from each batch spec (`register_batch`; `batch_caps(spec)` builds its
arguments). Every budget event goes to the `ledger` actor, batched, fire-and-forget.

A refusal crosses Ray as a `Refusal` value, not an exception (a `CapReached` does not
survive pickling); `budget_client()` turns it back into `CapReached` on the caller's
side, so the gateway sees exactly what a local book would raise. With `data_dir`, the
spend already in the ledger is loaded the first time a team or batch is seen (a keeper
started again mid-day, or a new `sandfleet run`, still honours the day's team cap).

`batch_exhausted(batch)` / `team_exhausted(team)` say when the FleetScheduler should stop
admitting: the spend already settled leaves nothing under the cap, or the cap refused a
reservation while nothing else was held on it (money held by calls and leases in
flight may still come back, so it alone never exhausts a cap).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, Final

import ray

from accounting.errors import BudgetError, SandfleetError
from accounting.policies import Policies, load_policies
from accounting.schemas import Event
from sandbox.credentials import AttemptRef
from scheduler.budget import (
    BudgetBook,
    BudgetClient,
    CapReached,
    Caps,
    Reservation,
    caps_from_policies,
)
from scheduler.ledger_actor import LEDGER_NAME, NAMESPACE, head_options
from scheduler.spec import NANO_USD_PER_USD, BatchSpec

__all__ = [
    "KEEPER_NAME",
    "BudgetKeeper",
    "Refusal",
    "batch_caps",
    "budget_client",
    "get_budget_keeper",
    "keeper_lookup",
    "unwrap",
]

log = logging.getLogger(__name__)

KEEPER_NAME: Final = "budget"
_FLUSH_EVERY_S: Final = 0.25
_MAX_PENDING: Final = 100_000  # events kept while no ledger answers; older ones are dropped


@dataclass(frozen=True)
class Refusal:
    """A `CapReached`, as a value that crosses Ray."""

    message: str
    cap: str
    key: str

    def error(self) -> CapReached:
        return CapReached(self.message, cap=self.cap, key=self.key)


def unwrap(value: Any) -> Any:
    """A keeper method's result, with a `Refusal` raised as its `CapReached`."""
    if isinstance(value, Refusal):
        raise value.error()
    return value


def _nusd(usd: Decimal | None) -> int | None:
    return None if usd is None else int(usd * NANO_USD_PER_USD)


def batch_caps(spec: BatchSpec) -> dict[str, Any]:
    """`register_batch` keyword arguments of a spec: its batch budget, its default task
    budget, and only the tasks whose own budget differs (a few KB for 100,000 tasks)."""
    default = _nusd(spec.defaults.budget)
    tasks = {t.task_id: t.budget_nusd for t in spec.task_specs() if t.budget_nusd != default}
    return {
        "batch_id": spec.batch_id,
        "team": spec.team,
        "batch_cap_nusd": _nusd(spec.budget),
        "task_caps": tasks,
        "default_task_cap_nusd": default,
    }


@dataclass(frozen=True)
class _Registered:
    team: str
    batch_cap: int | None
    task_caps: Mapping[str, int | None]
    default_task_cap: int | None


# A threaded actor: the book is thread-safe; events are sent by one flusher thread.
@ray.remote(num_cpus=0, max_concurrency=32, max_restarts=-1, max_task_retries=0)  # type: ignore[call-overload]
class BudgetKeeper:
    """Reservations and spend per task / batch / team; see the module doc."""

    def __init__(
        self,
        policies: Policies | None = None,
        data_dir: str | None = None,
        flush_interval_s: float = _FLUSH_EVERY_S,
    ) -> None:
        self._policies = policies if policies is not None else load_policies()
        self._data_dir = data_dir
        self._batches: dict[str, _Registered] = {}
        self._refused: dict[tuple[str, str], int] = {}  # (scope, key) -> what was left then
        self._seeded: set[tuple[str, str]] = set()
        self._pending: list[Event] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        node = ray.get_runtime_context().get_node_id()
        self._book = BudgetBook(self._caps_for, on_event=self._event, node=node)
        self._ledger: Any = None
        self._interval = flush_interval_s
        self._flusher = threading.Thread(target=self._flush_loop, name="budget-events", daemon=True)
        self._flusher.start()

    # -- caps ------------------------------------------------------------------------------

    def register_batch(
        self,
        batch_id: str,
        team: str,
        batch_cap_nusd: int | None = None,
        task_caps: Mapping[str, int | None] | None = None,
        default_task_cap_nusd: int | None = None,
    ) -> None:
        """A batch's own caps; None = the policies' default (`batch.budget_usd`,
        `task.budget_usd`). Registering again replaces them."""
        with self._lock:
            self._batches[batch_id] = _Registered(
                team, batch_cap_nusd, dict(task_caps or {}), default_task_cap_nusd
            )
            self._refused.pop(("batch", batch_id), None)
        self._seed(team, batch_id)

    def caps(self, ref: AttemptRef) -> Caps:
        return self._caps_for(ref)

    def _caps_for(self, ref: AttemptRef) -> Caps:
        base = caps_from_policies(self._policies, ref.team)
        reg = self._batches.get(ref.batch)
        if reg is None:
            return base
        task = reg.task_caps.get(ref.task, reg.default_task_cap)
        return Caps(
            task=task if task is not None else base.task,
            batch=reg.batch_cap if reg.batch_cap is not None else base.batch,
            team_day=base.team_day,
            team_month=base.team_month,
        )

    # -- the BudgetClient's methods (a refusal is returned, not raised) --------------------

    def reserve(
        self, ref: AttemptRef, want_nusd: int, *, min_nusd: int = 1, kind: str = "llm"
    ) -> Reservation | Refusal:
        return self._refusable(lambda: self._book.reserve(ref, want_nusd, min_nusd=min_nusd,
                                                          kind=kind))  # fmt: skip

    def settle(self, reservation_id: str, actual_nusd: int) -> Reservation:
        return self._book.settle(reservation_id, actual_nusd)

    def release(self, reservation_id: str) -> None:
        self._book.release(reservation_id)

    def record_spend(self, ref: AttemptRef, amount_nusd: int, *, kind: str = "egress") -> None:
        self._book.record_spend(ref, amount_nusd, kind=kind)

    def lease_compute(
        self, ref: AttemptRef, rate_nusd_per_s: Decimal, seconds: int, *, min_seconds: int = 1
    ) -> Reservation | Refusal:
        return self._refusable(
            lambda: self._book.lease_compute(ref, rate_nusd_per_s, seconds, min_seconds=min_seconds)
        )

    def renew_lease(self, reservation_id: str, seconds: int) -> Reservation | Refusal:
        return self._refusable(lambda: self._book.renew_lease(reservation_id, seconds))

    def _refusable(self, call: Callable[[], Reservation]) -> Reservation | Refusal:
        try:
            return call()
        except CapReached as e:
            cap = self._cap_of(e.cap, e.key)
            if cap is not None:
                left = cap - self._book.spent(e.cap, e.key) - self._book.held(e.cap, e.key)
                with self._lock:
                    self._refused[(e.cap, e.key)] = left
            return Refusal(str(e), e.cap, e.key)

    # -- what the scheduler asks ------------------------------------------------------------

    def remaining(self, ref: AttemptRef) -> dict[str, int | None]:
        return self._book.remaining(ref)

    def spent(self, scope: str, key: str) -> int:
        return self._book.spent(scope, key)

    def exhausted(self, batches: list[str], teams: list[str]) -> list[bool]:
        """`batch_exhausted` of each batch, then `team_exhausted` of each team: the
        scheduler's question of every half second, in one call."""
        return [self.batch_exhausted(b) for b in batches] + [self.team_exhausted(t) for t in teams]

    def batch_exhausted(self, batch_id: str) -> bool:
        """True once the batch's cap is spent, or refused with nothing in flight."""
        return self._exhausted("batch", batch_id)

    def team_exhausted(self, team: str) -> bool:
        """True once the team's cap of today (UTC) or of this month is spent, or refused
        with nothing in flight."""
        day, month = _periods()
        return self._exhausted("team_day", f"{team}/{day}") or self._exhausted(
            "team_month", f"{team}/{month}"
        )

    def _cap_of(self, scope: str, key: str) -> int | None:
        """The cap of a batch or team key (task caps are never asked about here)."""
        if scope == "batch":
            reg = self._batches.get(key)
            return self._caps_for(AttemptRef(reg.team if reg else "", key, "", 0)).batch
        if scope in ("team_day", "team_month"):
            caps = caps_from_policies(self._policies, key.split("/", 1)[0])
            return caps.team_day if scope == "team_day" else caps.team_month
        return None

    def _exhausted(self, scope: str, key: str) -> bool:
        cap = self._cap_of(scope, key)
        if cap is None:
            return False
        left = cap - self._book.spent(scope, key)
        if left <= 0:
            return True
        with self._lock:
            at_refusal = self._refused.get((scope, key))
        # refused, nothing in flight that may come back, and no more left than then
        return at_refusal is not None and self._book.held(scope, key) == 0 and left <= at_refusal

    # -- ledger: seed spend, send events ----------------------------------------------------

    def _seed(self, team: str, batch_id: str) -> None:
        """Load the spend the ledger already holds for keys this keeper has not seen."""
        if self._data_dir is None or not Path(self._data_dir, "ledger", "charges").exists():
            return
        day, month = _periods()
        keys = [("batch", batch_id), ("team_day", f"{team}/{day}"),
                ("team_month", f"{team}/{month}")]  # fmt: skip
        with self._lock:
            todo = [k for k in keys if k not in self._seeded]
            self._seeded.update(todo)
        if not todo:
            return
        from accounting.views import connect

        con = connect(self._data_dir)
        try:
            for scope, key in todo:
                if scope == "batch":
                    sql, args = "batch = ?", [batch_id]
                else:
                    fmt = "%Y-%m-%d" if scope == "team_day" else "%Y-%m"
                    period = key.split("/", 1)[1]
                    sql, args = f"team = ? AND strftime(time, '{fmt}') = ?", [team, period]
                row = con.execute(
                    f"SELECT coalesce(sum(cost_nusd), 0)::BIGINT FROM charges WHERE {sql}", args
                ).fetchone()
                if row and row[0]:
                    self._book.load_spent(scope, key, int(row[0]))
            if ("batch", batch_id) in todo:
                rows = con.execute(
                    "SELECT task, sum(cost_nusd)::BIGINT FROM charges WHERE batch = ? "
                    "AND cost_nusd IS NOT NULL GROUP BY task",
                    [batch_id],
                ).fetchall()
                for task, amount in rows:
                    self._book.load_spent("task", f"{batch_id}/{task}", int(amount))
        finally:
            con.close()

    def _event(self, event: Event) -> None:
        with self._lock:
            self._pending.append(event)
            if len(self._pending) > _MAX_PENDING:
                del self._pending[: len(self._pending) - _MAX_PENDING]

    def _flush_loop(self) -> None:
        while not self._stop.wait(self._interval):
            self.flush_events(wait=False)

    def flush_events(self, wait: bool = True) -> int:
        """Send the pending budget events to the ledger actor; returns how many were sent."""
        with self._lock:
            batch, self._pending = self._pending, []
        if not batch:
            return 0
        try:
            if self._ledger is None:
                self._ledger = ray.get_actor(LEDGER_NAME, namespace=NAMESPACE)
            ref = self._ledger.append.remote("events", batch)
            if wait:
                ray.get(ref)
        except (ValueError, ray.exceptions.RayError) as e:  # no ledger (yet): keep them
            log.warning("budget events wait for the ledger actor: %s", e)
            self._ledger = None
            with self._lock:
                self._pending[:0] = batch
            return 0
        return len(batch)

    def close(self) -> None:
        """Stop the flusher after sending what is pending."""
        self._stop.set()
        self._flusher.join(10)
        self.flush_events()


def _periods() -> tuple[str, str]:
    now = datetime.now(UTC)
    return f"{now:%Y-%m-%d}", f"{now:%Y-%m}"


def get_budget_keeper(policies: Policies | None = None, data_dir: str | None = None) -> Any:
    """The cluster's keeper, created on first use (detached, on the head when it can)."""
    return BudgetKeeper.options(  # type: ignore[attr-defined]
        name=KEEPER_NAME,
        namespace=NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
        **head_options(),
    ).remote(policies, data_dir)


def budget_client(keeper: Callable[[], Any], *, timeout_s: float = 5.0) -> BudgetClient:
    """A `BudgetClient` on the keeper actor that `keeper()` returns (looked up per call
    until found, so a keeper started later is used; a missing one fails closed)."""
    from ray.exceptions import RayTaskError

    async def call(method: str, *args: Any, **kwargs: Any) -> Any:
        try:
            result = await getattr(keeper(), method).remote(*args, **kwargs)
        except RayTaskError as e:
            if isinstance(e.cause, SandfleetError):
                raise e.cause from None
            raise
        return unwrap(result)

    return BudgetClient(call, timeout_s=timeout_s)


def keeper_lookup() -> Callable[[], Any]:
    """`budget_client`'s argument: the named keeper, cached once found."""
    found: list[Any] = []

    def lookup() -> Any:
        if not found:
            try:
                found.append(ray.get_actor(KEEPER_NAME, namespace=NAMESPACE))
            except ValueError:
                raise BudgetError(
                    f"no BudgetKeeper actor named {KEEPER_NAME!r} in namespace {NAMESPACE!r} "
                    "(fix: the driver starts it with scheduler.budget_keeper.get_budget_keeper)"
                ) from None
        return found[0]

    return lookup
