"""Budgets with hard caps: reserve before spending, settle after (the BudgetKeeper's logic).

Caps (integer nano-USD, None = no cap) apply per task (all its attempts), per batch,
per team per UTC day and per team per UTC calendar month (`configs/policies.yaml`, or a
batch spec's own budget). Every amount counts against all four at once.

- `reserve(ref, want, min_nusd=...)` holds `min(want, what every cap can still pay)`;
  when that is below `min_nusd` it raises `CapReached` (a `BudgetError`) naming the cap.
  Remaining = cap - settled - reserved, so concurrent reservations can never together
  promise more than a cap.
- `settle(id, actual)` turns a reservation into spend (the actual amount, which a
  caller keeps <= the reservation by clamping its call to it); `release(id)` drops it.
- `record_spend(ref, amount)` adds spend that had no reservation (egress bytes).
- Compute is a renewable lease: `lease_compute(ref, rate, seconds)` reserves
  rate x seconds (clamped down to whole seconds the budget can pay); `renew_lease`
  settles the lease in full and reserves the next one.

`BudgetBook` is pure Python, thread-safe (one lock, never held across I/O). `BudgetClient`
is the gateway's async side of it: it calls a local book or a remote keeper (a Ray actor)
and FAILS CLOSED: a keeper that errors or does not answer in time refuses the call.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from accounting.errors import BudgetError
from accounting.policies import Policies
from accounting.pricing import NUSD_PER_USD, PriceList, unit_price_nusd
from accounting.schemas import Event, EventKind, UsageBucket
from sandbox.credentials import AttemptRef

__all__ = [
    "BudgetBook",
    "BudgetClient",
    "CapReached",
    "Caps",
    "Reservation",
    "caps_from_policies",
    "compute_rate_nusd_per_s",
    "format_usd",
]

SCOPES = ("task", "batch", "team_day", "team_month")


def format_usd(nusd: int | None) -> str:
    """Nano-USD as dollars with at least 2 decimals (`$2.00`, `$0.000001234`)."""
    if nusd is None:
        return "no cap"
    whole, frac = f"{Decimal(nusd) / NUSD_PER_USD:.9f}".split(".")
    return f"${whole}.{frac.rstrip('0').ljust(2, '0')}"


def _usd_to_nusd(usd: Decimal | None) -> int | None:
    return None if usd is None else int(usd * NUSD_PER_USD)


@dataclass(frozen=True, slots=True)
class Caps:
    """One task's four caps in nano-USD; None means no cap."""

    task: int | None = None
    batch: int | None = None
    team_day: int | None = None
    team_month: int | None = None


def caps_from_policies(
    policies: Policies,
    team: str,
    *,
    batch_usd: Decimal | None = None,
    task_usd: Decimal | None = None,
) -> Caps:
    """Caps from `configs/policies.yaml`; a batch spec's own budgets override the defaults."""
    tp = policies.team(team)
    return Caps(
        task=_usd_to_nusd(task_usd if task_usd is not None else policies.task.budget_usd),
        batch=_usd_to_nusd(batch_usd if batch_usd is not None else policies.batch.budget_usd),
        team_day=_usd_to_nusd(tp.daily_usd),
        team_month=_usd_to_nusd(tp.monthly_usd),
    )


def compute_rate_nusd_per_s(prices: PriceList, cpus: float, memory_bytes: int) -> Decimal:
    """Nano-USD per second of a sandbox's limits (cpus x core-second + GiB x GiB-second)."""
    cpu = unit_price_nusd(prices, UsageBucket.CPU) or Decimal(0)
    mem = unit_price_nusd(prices, UsageBucket.MEMORY) or Decimal(0)
    return Decimal(str(cpus)) * cpu + Decimal(memory_bytes) / 2**30 * mem


class CapReached(BudgetError):
    """A reservation was refused: `cap` (task, batch, team_day, team_month) cannot pay."""

    def __init__(self, message: str, *, cap: str, key: str):
        super().__init__(message)
        self.cap = cap
        self.key = key


@dataclass(frozen=True, slots=True)
class Reservation:
    """Money held for one call or lease until it settles."""

    id: str
    ref: AttemptRef
    amount_nusd: int
    kind: str  # llm, compute
    keys: tuple[tuple[str, str], ...]  # (scope, key) pairs it counts against
    seconds: int = 0  # compute leases: how long it pays for
    rate_nusd_per_s: Decimal = Decimal(0)


_EventSink = Callable[[Event], None]


class BudgetBook:
    """Spend and reservations per scope key; see the module doc. Thread-safe."""

    def __init__(
        self,
        caps_for: Callable[[AttemptRef], Caps],
        *,
        clock: Callable[[], float] = time.time,
        on_event: _EventSink | None = None,
        node: str = "",
    ):
        self._caps_for = caps_for
        self._clock = clock
        self._on_event = on_event
        self._node = node
        self._spent: dict[tuple[str, str], int] = {}
        self._held: dict[tuple[str, str], int] = {}
        self._open: dict[str, Reservation] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    # -- reading -------------------------------------------------------------------------

    def _keys(self, ref: AttemptRef) -> tuple[tuple[str, str], ...]:
        day = datetime.fromtimestamp(self._clock(), UTC)
        return (
            ("task", f"{ref.batch}/{ref.task}"),
            ("batch", ref.batch),
            ("team_day", f"{ref.team}/{day:%Y-%m-%d}"),
            ("team_month", f"{ref.team}/{day:%Y-%m}"),
        )

    def spent(self, scope: str, key: str) -> int:
        with self._lock:
            return self._spent.get((scope, key), 0)

    def held(self, scope: str, key: str) -> int:
        with self._lock:
            return self._held.get((scope, key), 0)

    def load_spent(self, scope: str, key: str, amount_nusd: int) -> None:
        """Seed spend already in the ledger (a keeper restarting mid-day)."""
        with self._lock:
            self._spent[(scope, key)] = self._spent.get((scope, key), 0) + amount_nusd

    def remaining(self, ref: AttemptRef) -> dict[str, int | None]:
        """Per scope: what its cap can still pay (None = no cap)."""
        caps = self._caps_for(ref)
        with self._lock:
            return {k[0]: self._left(getattr(caps, k[0]), k) for k in self._keys(ref)}

    def _left(self, cap: int | None, key: tuple[str, str]) -> int | None:
        if cap is None:
            return None
        return max(0, cap - self._spent.get(key, 0) - self._held.get(key, 0))

    # -- changing ------------------------------------------------------------------------

    def reserve(
        self, ref: AttemptRef, want_nusd: int, *, min_nusd: int = 1, kind: str = "llm"
    ) -> Reservation:
        """Hold up to `want_nusd`, at least `min_nusd`, or raise `CapReached`."""
        if want_nusd < 0 or min_nusd < 0 or min_nusd > want_nusd:
            raise BudgetError(f"bad reservation: want {want_nusd}, min {min_nusd} nano-USD")
        caps = self._caps_for(ref)
        keys = self._keys(ref)
        with self._lock:
            amount, binding = want_nusd, "task"
            for scope, key in keys:
                left = self._left(getattr(caps, scope), (scope, key))
                if left is not None and left < amount:
                    amount, binding = left, scope
            bkey = dict(keys)[binding]
            cap = getattr(caps, binding)
            refused = amount < min_nusd
            if refused:
                spent = self._spent.get((binding, bkey), 0)
                held = self._held.get((binding, bkey), 0)
            else:
                res = Reservation(
                    id=f"r{next(self._ids)}", ref=ref, amount_nusd=amount, kind=kind, keys=keys
                )
                self._hold(res, +1)
                self._open[res.id] = res
        if refused:
            self._emit(EventKind.BUDGET_REFUSED, ref, binding, cap, min_nusd, "", kind)
            raise CapReached(
                f"budget cap reached: {binding} {bkey} cap {format_usd(cap)} (spent "
                f"{format_usd(spent)}, reserved {format_usd(held)}); this call needs at least "
                f"{format_usd(min_nusd)}. The task stops as budget_exceeded; raise the "
                f"{binding} budget (batch spec or configs/policies.yaml) to go on",
                cap=binding,
                key=bkey,
            )
        self._emit(EventKind.BUDGET_RESERVED, ref, binding, cap, amount, res.id, res.kind)
        return res

    def _hold(self, res: Reservation, sign: int) -> None:
        for k in res.keys:
            self._held[k] = self._held.get(k, 0) + sign * res.amount_nusd

    def _take(self, reservation_id: str) -> Reservation:
        res = self._open.pop(reservation_id, None)
        if res is None:
            raise BudgetError(
                f"reservation {reservation_id!r} is unknown or already settled; "
                "settle or release each reservation exactly once"
            )
        self._hold(res, -1)
        return res

    def settle(self, reservation_id: str, actual_nusd: int) -> Reservation:
        """Turn the reservation into `actual_nusd` of spend; the rest is freed."""
        if actual_nusd < 0:
            raise BudgetError(f"actual spend {actual_nusd} must be >= 0")
        with self._lock:
            res = self._take(reservation_id)
            for k in res.keys:
                self._spent[k] = self._spent.get(k, 0) + actual_nusd
        self._emit(EventKind.BUDGET_SETTLED, res.ref, "task", None, actual_nusd, res.id, res.kind)
        return res

    def release(self, reservation_id: str) -> None:
        """Drop a reservation without spending (the call never went out)."""
        self.settle(reservation_id, 0)

    def record_spend(self, ref: AttemptRef, amount_nusd: int, *, kind: str = "egress") -> None:
        """Spend that had no reservation (metered after the fact, e.g. egress bytes)."""
        if amount_nusd < 0:
            raise BudgetError(f"spend {amount_nusd} must be >= 0")
        with self._lock:
            for k in self._keys(ref):
                self._spent[k] = self._spent.get(k, 0) + amount_nusd
        self._emit(EventKind.BUDGET_SETTLED, ref, "task", None, amount_nusd, kind, kind)

    def lease_compute(
        self, ref: AttemptRef, rate_nusd_per_s: Decimal, seconds: int, *, min_seconds: int = 1
    ) -> Reservation:
        """Reserve `seconds` of compute at `rate` (clamped to whole seconds it can pay)."""
        if rate_nusd_per_s <= 0:
            raise BudgetError(f"compute rate {rate_nusd_per_s} nano-USD/s must be > 0")
        want = math.ceil(rate_nusd_per_s * seconds)
        least = math.ceil(rate_nusd_per_s * min_seconds)
        res = self.reserve(ref, want, min_nusd=least, kind="compute")
        paid_s = min(seconds, int(Decimal(res.amount_nusd) / rate_nusd_per_s))
        lease = Reservation(
            id=res.id,
            ref=ref,
            amount_nusd=res.amount_nusd,
            kind="compute",
            keys=res.keys,
            seconds=paid_s,
            rate_nusd_per_s=rate_nusd_per_s,
        )
        with self._lock:
            self._open[res.id] = lease
        return lease

    def renew_lease(self, reservation_id: str, seconds: int) -> Reservation:
        """The lease ran its course: settle it in full and lease the next `seconds`."""
        with self._lock:
            lease = self._open.get(reservation_id)
        if lease is None or lease.kind != "compute":
            raise BudgetError(f"{reservation_id!r} is not an open compute lease")
        self.settle(reservation_id, lease.amount_nusd)
        return self.lease_compute(lease.ref, lease.rate_nusd_per_s, seconds)

    def _emit(
        self,
        kind: EventKind,
        ref: AttemptRef,
        scope: str,
        cap: int | None,
        amount: int,
        rid: str,
        usage: str,
    ) -> None:
        """One budget event; `usage` (llm, compute, egress) lets the stuck rule tell an LLM
        call in flight from a compute lease."""
        if self._on_event is None:
            return
        payload = {
            "scope": scope,
            "cap": cap,
            "amount_nusd": amount,
            "reservation": rid,
            "kind": usage,
        }
        self._on_event(
            Event(
                time=datetime.now(UTC),
                team=ref.team,
                batch=ref.batch,
                task=ref.task,
                attempt=ref.attempt,
                node=self._node,
                kind=kind,
                payload=payload,
            )
        )


class BudgetClient:
    """The gateway's async budget: calls a keeper and fails closed.

    `call(method, *args, **kwargs)` runs one `BudgetBook` method on the keeper and returns
    its result or an awaitable of it (a Ray ObjectRef is awaitable). Any error other than
    a `BudgetError`, or no answer within `timeout_s`, becomes a `BudgetError`: the call
    that needed the money is not forwarded.
    """

    def __init__(self, call: Callable[..., Any], *, timeout_s: float = 5.0):
        self._call = call
        self.timeout_s = timeout_s

    @classmethod
    def local(cls, book: BudgetBook, *, timeout_s: float = 5.0) -> BudgetClient:
        return cls(lambda name, *a, **kw: getattr(book, name)(*a, **kw), timeout_s=timeout_s)

    async def _run(self, method: str, *args: Any, **kwargs: Any) -> Any:
        try:
            result = self._call(method, *args, **kwargs)
            if inspect.isawaitable(result):
                result = await asyncio.wait_for(result, self.timeout_s)
            return result
        except BudgetError:
            raise
        except TimeoutError:
            raise BudgetError(
                f"the budget keeper did not answer {method} within {self.timeout_s}s; failing "
                "closed (nothing was spent). Check that the BudgetKeeper actor is running"
            ) from None
        except Exception as e:  # an unreachable keeper must refuse, whatever the transport said
            raise BudgetError(
                f"the budget keeper cannot be reached ({type(e).__name__}: {e}); failing "
                "closed (nothing was spent). Check that the BudgetKeeper actor is running"
            ) from e

    async def reserve(
        self, ref: AttemptRef, want_nusd: int, *, min_nusd: int, kind: str = "llm"
    ) -> Reservation:
        res = await self._run("reserve", ref, want_nusd, min_nusd=min_nusd, kind=kind)
        return res

    async def settle(self, reservation_id: str, actual_nusd: int) -> None:
        await self._run("settle", reservation_id, actual_nusd)

    async def release(self, reservation_id: str) -> None:
        await self._run("release", reservation_id)

    async def record_spend(self, ref: AttemptRef, amount_nusd: int, *, kind: str) -> None:
        await self._run("record_spend", ref, amount_nusd, kind=kind)
