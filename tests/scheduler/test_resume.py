"""Resume after the scheduler is killed mid-batch: proved from the ledger (DuckDB over the
Parquet) — every task has exactly one terminal state, lost attempts ran again under a
new number, and no container is left. Real local Ray, real Docker sandboxes."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray

from accounting.policies import load_policies
from accounting.views import connect
from scheduler.fleet import SCHEDULER_NAME, get_scheduler
from scheduler.plan import Backend
from scheduler.testing import (
    containers_of,
    flush_ledger,
    last_states,
    local_ray,
    make_plan,
    remove_containers,
    state_rows,
    stop_fleet,
    terminal_counts,
    wait_actor_gone,
)

pytestmark = [pytest.mark.ray, pytest.mark.docker, pytest.mark.slow]


@pytest.fixture
def cluster(data_dir: Path) -> Iterator[str]:
    with local_ray(num_cpus=4, slots=4):
        try:
            yield str(data_dir)
        finally:
            stop_fleet()


def test_resume_after_a_scheduler_kill_finishes_every_task_exactly_once(
    cluster: str, tmp_path: Path, docker_client: Any, base_image: str, wait_for: Any
) -> None:
    data_dir = cluster
    plan = make_plan(tmp_path, "resume-batch", "demo", ["sleep 3"] * 12, backend=Backend.DOCKER)
    policies = load_policies()
    try:
        scheduler = get_scheduler(data_dir, policies=policies)
        ray.get(scheduler.submit.remote(plan))

        def midway() -> bool:
            states = ray.get(scheduler.status.remote(plan.batch_id))["batches"][plan.batch_id]
            counts = states["states"]
            return counts.get("succeeded", 0) >= 2 and counts.get("running", 0) >= 2

        wait_for(midway, timeout=180, what="some tasks done and some running")
        ray.kill(scheduler, no_restart=True)
        wait_actor_gone(SCHEDULER_NAME)

        flush_ledger()
        before = state_rows(data_dir, plan.batch_id)
        lost = {t for t, s in last_states(before).items() if s == "running"}
        finished_before = {t for t, s in last_states(before).items() if s == "succeeded"}
        assert lost and finished_before, "the kill did not land mid-batch"

        scheduler = get_scheduler(data_dir, policies=policies)
        status = ray.get(scheduler.resume.remote(plan.batch_id, None))
        assert status["batches"][plan.batch_id]["states"]["succeeded"] == len(finished_before)
        final = ray.get(scheduler.wait.remote(plan.batch_id, 240.0))["batches"][plan.batch_id]
        assert final["done"], final
        wait_for(lambda: not containers_of(docker_client, plan.batch_id), timeout=60,
                 what="no container of the batch left")  # fmt: skip
    finally:
        left = remove_containers(docker_client, plan.batch_id)
    assert left == []

    flush_ledger()
    rows = state_rows(data_dir, plan.batch_id)
    counts = terminal_counts(rows)
    assert set(counts) == {t.task_id for t in plan.tasks}, "a task was lost"
    assert set(counts.values()) == {1}, f"terminal states recorded twice: {counts}"
    assert Counter(last_states(rows).values()) == {"succeeded": 12}
    for task in lost:  # each lost attempt ran again under a new attempt number
        attempts = {r["attempt"] for r in rows if r["task"] == task and r["state"] == "running"}
        assert len(attempts) == 2 and max(attempts) > min(attempts), (task, attempts)
    for task in finished_before:  # finished tasks were not run again
        assert [r["state"] for r in rows if r["task"] == task].count("running") == 1
    with connect(data_dir) as con:
        dupes = con.execute(
            "SELECT task, attempt, count(*) FROM tasks GROUP BY ALL HAVING count(*) > 1"
        ).fetchall()
    assert dupes == [], "an attempt has two tasks rows"
