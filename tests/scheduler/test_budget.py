"""Budgets: reserve-then-settle against four hard caps, leases, and failing closed."""

from __future__ import annotations

import asyncio
import threading
from decimal import Decimal

import pytest

from accounting.errors import BudgetError
from accounting.policies import load_policies
from accounting.pricing import load_pricing
from accounting.schemas import Event
from sandbox.credentials import AttemptRef
from scheduler.budget import (
    BudgetBook,
    BudgetClient,
    CapReached,
    Caps,
    caps_from_policies,
    compute_rate_nusd_per_s,
    format_usd,
)

NOW = 1_800_000_000.0  # 2027-01-15 UTC
REF = AttemptRef("team-a", "b1", "t1", 1)


def book(caps: Caps, events: list[Event] | None = None) -> BudgetBook:
    sink = events.append if events is not None else None
    return BudgetBook(lambda ref: caps, clock=lambda: NOW, on_event=sink)


def test_a_reservation_is_clamped_to_what_the_tightest_cap_can_pay() -> None:
    b = book(Caps(task=1000, batch=600, team_day=5000))
    res = b.reserve(REF, 900, min_nusd=100)
    assert res.amount_nusd == 600
    assert b.remaining(REF) == {"task": 400, "batch": 0, "team_day": 4400, "team_month": None}


def test_refusal_names_the_cap_that_cannot_pay() -> None:
    events: list[Event] = []
    b = book(Caps(task=1000, team_month=50), events)
    with pytest.raises(CapReached) as e:
        b.reserve(REF, 500, min_nusd=100)
    assert e.value.cap == "team_month"
    assert "team_month team-a/2027-01 cap $0.00000005" in str(e.value)
    assert isinstance(e.value, BudgetError)
    assert events[-1].kind == "budget_refused" and events[-1].payload["scope"] == "team_month"


def test_settle_turns_a_reservation_into_actual_spend_and_frees_the_rest() -> None:
    b = book(Caps(task=1000))
    res = b.reserve(REF, 800, min_nusd=1)
    b.settle(res.id, 300)
    assert b.spent("task", "b1/t1") == 300 and b.held("task", "b1/t1") == 0
    assert b.remaining(REF)["task"] == 700
    with pytest.raises(BudgetError, match="already settled"):
        b.settle(res.id, 300)


def test_release_spends_nothing() -> None:
    b = book(Caps(task=1000))
    b.release(b.reserve(REF, 800).id)
    assert b.remaining(REF)["task"] == 1000


def test_all_attempts_of_a_task_share_its_cap() -> None:
    b = book(Caps(task=1000))
    b.settle(b.reserve(REF, 700).id, 700)
    retry = AttemptRef("team-a", "b1", "t1", 2)
    assert b.reserve(retry, 700).amount_nusd == 300


def test_egress_spend_without_a_reservation_counts_against_the_caps() -> None:
    b = book(Caps(task=1000))
    b.record_spend(REF, 250)
    assert b.remaining(REF)["task"] == 750


def test_fifty_concurrent_calls_at_the_budget_edge_never_exceed_the_cap() -> None:
    cap = 10_000
    b = book(Caps(task=cap, batch=cap * 10))
    b.settle(b.reserve(REF, 9_000).id, 9_000)  # the task is near its edge
    start = threading.Barrier(50)
    refused: list[str] = []

    def call() -> None:
        start.wait()
        try:
            res = b.reserve(REF, 300, min_nusd=40)  # worst case 300, at least 40 to start
        except CapReached as e:
            refused.append(e.cap)
            return
        b.settle(res.id, res.amount_nusd)  # the call used all it was allowed

    threads = [threading.Thread(target=call) for _ in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert b.spent("task", "b1/t1") <= cap
    assert b.spent("task", "b1/t1") > cap - 40  # the edge was used, not wasted
    assert refused and set(refused) == {"task"}
    assert b.held("task", "b1/t1") == 0


def test_compute_lease_is_clamped_to_whole_seconds_and_renews() -> None:
    b = book(Caps(task=1_000))
    lease = b.lease_compute(REF, Decimal("7.5"), 100)
    assert (lease.amount_nusd, lease.seconds) == (750, 100)
    nxt = b.renew_lease(lease.id, 100)  # first lease settled in full
    assert b.spent("task", "b1/t1") == 750
    assert nxt.amount_nusd == 250 and nxt.seconds == 33
    with pytest.raises(CapReached):
        b.renew_lease(nxt.id, 100)  # 250 settled, nothing left for another second


def test_caps_come_from_policies_and_a_batch_can_override_them() -> None:
    policies = load_policies()
    caps = caps_from_policies(policies, "demo")
    assert caps == Caps(
        task=2 * 10**9, batch=100 * 10**9, team_day=5 * 10**9, team_month=20 * 10**9
    )
    own = caps_from_policies(policies, "demo", batch_usd=Decimal("7.5"), task_usd=Decimal("0.1"))
    assert (own.batch, own.task) == (7_500_000_000, 100_000_000)


def test_compute_rate_prices_cpus_and_memory() -> None:
    rate = compute_rate_nusd_per_s(load_pricing(), 2.0, 2**30)
    # 2 x 0.04048 $/h + 1 x 0.004445 $/h, in nano-USD per second
    assert abs(rate - Decimal("0.085405") * 10**9 / 3600) < Decimal("0.00001")


def test_format_usd_keeps_cents() -> None:
    assert format_usd(2 * 10**9) == "$2.00"
    assert format_usd(1234) == "$0.000001234"
    assert format_usd(None) == "no cap"


def test_client_passes_refusals_through() -> None:
    client = BudgetClient.local(book(Caps(task=10)))
    with pytest.raises(CapReached):
        asyncio.run(client.reserve(REF, 100, min_nusd=50))


def test_client_fails_closed_when_the_keeper_errors() -> None:
    def broken(method: str, *args: object, **kwargs: object) -> object:
        raise ConnectionError("actor died")

    with pytest.raises(BudgetError, match=r"cannot be reached.*failing closed"):
        asyncio.run(BudgetClient(broken).reserve(REF, 100, min_nusd=1))


def test_client_fails_closed_when_the_keeper_does_not_answer() -> None:
    async def run() -> None:
        never: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        client = BudgetClient(lambda method, *a, **kw: never, timeout_s=0.05)
        await client.reserve(REF, 100, min_nusd=1)

    with pytest.raises(BudgetError, match="did not answer"):
        asyncio.run(run())
