"""The BudgetKeeper actor in a real local Ray: caps from the policies and the batch spec,
refusals that reach the gateway as `CapReached`, exhausted batches and teams, budget
events in the ledger, and spend already in the ledger honoured by a new keeper."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from accounting.charging import resource_charges
from accounting.errors import BudgetError
from accounting.policies import load_policies
from accounting.pricing import load_pricing
from accounting.writer import LedgerWriter
from sandbox.credentials import AttemptRef
from scheduler.budget import CapReached
from scheduler.budget_keeper import BudgetKeeper, batch_caps, budget_client, keeper_lookup
from scheduler.spec import parse_batch

pytestmark = [pytest.mark.ray]

TEAM = "keeper-team"
DAY_CAP = Decimal("0.001")  # 1,000,000 nano-USD per UTC day for TEAM


@pytest.fixture(scope="module")
def ray_up() -> Iterator[Any]:
    import ray

    ray.init(address="local", num_cpus=2, resources={"sandbox_slots": 2},
             namespace=f"pytest-{uuid.uuid4().hex[:6]}", include_dashboard=False,
             log_to_driver=False)  # fmt: skip
    try:
        yield ray
    finally:
        ray.shutdown()


def _policies() -> Any:
    base = load_policies()
    return base.model_validate(
        {**base.model_dump(), "teams": {TEAM: {"daily_usd": DAY_CAP, "monthly_usd": None}}}
    )


@pytest.fixture
def keeper(ray_up: Any, tmp_path: Path) -> Iterator[Any]:
    """A keeper of this test's own (not the named one), on the ledger under tmp_path."""
    handle = BudgetKeeper.remote(_policies(), str(tmp_path / "data"))
    yield handle
    ray_up.kill(handle)


def test_batch_caps_carry_only_the_tasks_with_a_budget_of_their_own(tmp_path: Path) -> None:
    spec = parse_batch({"name": "b", "team": TEAM, "budget": "3.00",
                        "defaults": {"budget": "0.10"},
                        "tasks": [{"id": "a", "repo": ".", "command": "true"},
                                  {"id": "b", "repo": ".", "command": "true", "budget": "0.5"}]},
                       source=tmp_path / "b.yaml")  # fmt: skip
    assert batch_caps(spec) == {
        "batch_id": spec.batch_id, "team": TEAM, "batch_cap_nusd": 3_000_000_000,
        "task_caps": {"b": 500_000_000}, "default_task_cap_nusd": 100_000_000,
    }  # fmt: skip


def test_a_refusal_reaches_the_gateway_as_cap_reached_and_exhausts_the_batch(
    ray_up: Any, keeper: Any
) -> None:
    ray = ray_up
    ray.get(keeper.register_batch.remote("b1", TEAM, 500, {"t2": 100}, 300))
    client = budget_client(lambda: keeper)
    t1, t2 = AttemptRef(TEAM, "b1", "t1", 1), AttemptRef(TEAM, "b1", "t2", 1)

    async def scenario() -> tuple[int, str, int]:
        held = await client.reserve(t1, 1000, min_nusd=10)  # clamped to the task's 300
        await client.settle(held.id, 250)
        with pytest.raises(CapReached) as small:
            await client.reserve(t2, 150, min_nusd=150)  # t2's own cap is 100
        rest = await client.reserve(t2, 1000, min_nusd=1)  # the batch has 250 left; t2 100
        await client.release(rest.id)
        return held.amount_nusd, small.value.cap, rest.amount_nusd

    assert asyncio.run(scenario()) == (300, "task", 100)
    assert not ray.get(keeper.batch_exhausted.remote("b1"))
    t3 = AttemptRef(TEAM, "b1", "t3", 1)
    held = ray.get(keeper.reserve.remote(t3, 250, min_nusd=250))  # the batch's last 250
    assert ray.get(keeper.reserve.remote(t3, 10, min_nusd=1)).cap == "batch"
    assert not ray.get(keeper.batch_exhausted.remote("b1"))  # what is held may come back
    ray.get(keeper.settle.remote(held.id, 250))
    assert ray.get(keeper.batch_exhausted.remote("b1"))  # 500 of 500 spent


def test_a_batch_refused_with_nothing_in_flight_is_exhausted(ray_up: Any, keeper: Any) -> None:
    ray = ray_up
    ray.get(keeper.register_batch.remote("b4", TEAM, 100, None, None))
    ref = AttemptRef(TEAM, "b4", "t1", 1)
    ray.get(keeper.settle.remote(ray.get(keeper.reserve.remote(ref, 90, min_nusd=90)).id, 90))
    assert not ray.get(keeper.batch_exhausted.remote("b4"))  # 10 left
    assert ray.get(keeper.reserve.remote(ref, 50, min_nusd=50)).cap == "batch"
    assert ray.get(keeper.batch_exhausted.remote("b4"))  # 10 left can pay no call


def test_a_team_past_its_daily_cap_is_exhausted(ray_up: Any, keeper: Any) -> None:
    ray = ray_up
    assert not ray.get(keeper.team_exhausted.remote(TEAM))
    ref = AttemptRef(TEAM, "b2", "t1", 1)
    ray.get(keeper.register_batch.remote("b2", TEAM, None, None, 10**9))
    ray.get(keeper.record_spend.remote(ref, 1_000_000, kind="egress"))
    assert ray.get(keeper.team_exhausted.remote(TEAM))
    assert not ray.get(keeper.team_exhausted.remote("other-team"))
    # the scheduler's one call: batches first, then teams
    assert ray.get(keeper.exhausted.remote(["b2"], [TEAM, "other-team"])) == [False, True, False]


def test_a_missing_keeper_fails_closed(ray_up: Any) -> None:
    client = budget_client(keeper_lookup(), timeout_s=2)  # no keeper named `budget`
    with pytest.raises(BudgetError, match="no BudgetKeeper actor"):
        asyncio.run(client.reserve(AttemptRef(TEAM, "b", "t", 1), 10, min_nusd=1))


def test_budget_events_reach_the_ledger_and_its_spend_seeds_a_new_keeper(
    ray_up: Any, keeper: Any, tmp_path: Path
) -> None:
    from accounting.views import connect
    from scheduler.ledger_actor import LedgerActor

    ray = ray_up
    data_dir = tmp_path / "data"
    now = datetime.now(UTC)
    old = resource_charges(load_pricing(), {"cpu": Decimal(80)}, time=now, period_start=now,
                           team=TEAM, batch="b3", task="t1", attempt=1)  # fmt: skip
    with LedgerWriter(data_dir) as writer:
        writer.append("charges", old)
    spent_before = sum(c.cost_nusd for c in old)  # 80 core-seconds: 899,556 nano-USD
    ledger = LedgerActor.options(name="ledger", namespace="sandfleet").remote(str(data_dir))
    try:
        ray.get(keeper.register_batch.remote("b3", TEAM, None, None, None))
        assert ray.get(keeper.spent.remote("batch", "b3")) == spent_before
        assert ray.get(keeper.spent.remote("task", "b3/t1")) == spent_before
        refusal = ray.get(keeper.reserve.remote(AttemptRef(TEAM, "b3", "t2", 1), 200_000,
                                                min_nusd=200_000))  # fmt: skip
        assert refusal.cap == "team_day"  # only ~100,444 of the day's 1,000,000 is left
        assert ray.get(keeper.team_exhausted.remote(TEAM))
        ray.get(keeper.flush_events.remote())
        ray.get(ledger.flush.remote())
        con = connect(data_dir)
        try:
            rows = con.execute(
                "SELECT kind, json_extract_string(payload, '$.scope') FROM events "
                "WHERE batch = 'b3'"
            ).fetchall()
        finally:
            con.close()
        assert rows == [("budget_refused", "team_day")]
    finally:
        ray.get(ledger.close.remote())
        ray.kill(ledger)
