"""The scheduler on a real local Ray (8 CPUs, 8 sandbox slots), proved from the ledger.

Big batches use the in-memory FakeBackend through real Ray and the real Parquet
ledger (each attempt still makes and removes a real workspace); the small batch and
the cancel run real Docker sandboxes of the minimal template.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml

from accounting.views import connect
from scheduler.driver import Settings, run
from scheduler.fleet import get_scheduler
from scheduler.plan import Backend
from scheduler.state import mean_concurrency, peak_concurrency, running_intervals
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

pytestmark = [pytest.mark.ray]

POLICIES = {
    "defaults": {"weight": 1, "max_sandboxes": 16, "max_cpus": 16, "max_memory": "32g",
                 "daily_usd": None, "monthly_usd": None},
    "teams": {"heavy": {"weight": 3}, "light": {"weight": 1}, "capped": {"max_sandboxes": 2}},
}  # fmt: skip


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    with local_ray(num_cpus=8, slots=8) as tmp:
        yield tmp


@pytest.fixture
def policies_path(tmp_path: Path) -> Path:
    path = tmp_path / "policies.yaml"
    path.write_text(yaml.safe_dump(POLICIES))
    return path


@pytest.fixture
def settings(cluster: str, data_dir: Path, policies_path: Path) -> Iterator[Settings]:
    yield Settings(data_dir=str(data_dir), policies_path=str(policies_path), poll_s=0.2)
    stop_fleet()  # its gateways, keeper and ledger too: the next test has its own data dir
    wait_actor_gone("budget")


@pytest.mark.slow
def test_a_thousand_tasks_of_two_teams_finish_each_with_one_outcome_in_fair_shares(
    settings: Settings, tmp_path: Path, policies_path: Path, wait_for: Any
) -> None:
    heavy = make_plan(tmp_path, "heavy-batch", "heavy", ["true"] * 500,
                      backend=Backend.FAKE, policies_path=policies_path)  # fmt: skip
    light = make_plan(tmp_path, "light-batch", "light", ["true"] * 500,
                      backend=Backend.FAKE, policies_path=policies_path)  # fmt: skip
    from accounting.policies import load_policies

    scheduler = get_scheduler(settings.data_dir, policies=load_policies(policies_path))
    ray.get([scheduler.submit.remote(heavy), scheduler.submit.remote(light)])
    for plan in (heavy, light):
        wait_for(lambda p=plan: ray.get(scheduler.wait.remote(p.batch_id, 5.0))["batches"]
                 [p.batch_id]["done"], timeout=600, what=f"{plan.batch_id} to finish")  # fmt: skip

    flush_ledger()
    rows = {p.team: state_rows(settings.data_dir, p.batch_id) for p in (heavy, light)}
    for team, plan in (("heavy", heavy), ("light", light)):
        counts = terminal_counts(rows[team])
        assert set(counts) == {t.task_id for t in plan.tasks}
        assert set(counts.values()) == {1}, "a task has more than one terminal state"
        assert set(last_states(rows[team]).values()) == {"succeeded"}
    with connect(settings.data_dir) as con:
        per_attempt = con.execute(
            "SELECT count(*), count(DISTINCT (batch, task, attempt)) FROM tasks"
        ).fetchone()
    assert per_attempt == (1000, 1000), "not exactly one tasks row per attempt"

    # Fair share, from the ledger: while both teams had work queued, heavy (weight 3)
    # held three quarters of the running sandboxes and light (weight 1) one quarter.
    intervals = running_intervals([*rows["heavy"], *rows["light"]])
    start = min(i.start for i in intervals)
    end = min(max(i.start for i in intervals if i.team == team) for team in ("heavy", "light"))
    mean = mean_concurrency(intervals, start, end)
    share = mean["heavy"] / (mean["heavy"] + mean["light"])
    assert 0.65 <= share <= 0.85, f"heavy's share of running sandboxes was {share:.2f}"


def test_a_team_never_runs_more_sandboxes_than_its_quota(
    settings: Settings, tmp_path: Path, policies_path: Path
) -> None:
    plan = make_plan(tmp_path, "capped-batch", "capped", ["true"] * 30,
                     backend=Backend.FAKE, policies_path=policies_path)  # fmt: skip
    final = run(plan, settings)
    assert final["states"] == {"succeeded": 30}
    rows = state_rows(settings.data_dir, plan.batch_id)
    peak = peak_concurrency(running_intervals(rows))
    assert peak == {"capped": 2}, f"team 'capped' (quota 2, 8 free slots) peaked at {peak}"


@pytest.mark.docker
def test_ten_real_sandboxes_run_and_an_agent_failure_is_not_retried(
    settings: Settings, tmp_path: Path, policies_path: Path, docker_client: Any, base_image: str
) -> None:
    commands = ["true"] * 7 + ["exit 3", "echo changed > README", "cat README"]
    plan = make_plan(tmp_path, "docker-batch", "demo", commands,
                     backend=Backend.DOCKER, policies_path=policies_path)  # fmt: skip
    try:
        final = run(plan, settings)
    finally:
        left = remove_containers(docker_client, plan.batch_id)
    assert left == [], f"containers left behind: {left}"
    assert final["states"] == {"succeeded": 9, "failed": 1}
    rows = state_rows(settings.data_dir, plan.batch_id)
    assert set(terminal_counts(rows).values()) == {1}
    with connect(settings.data_dir) as con:
        tasks = con.execute(
            "SELECT task, attempt, outcome, exit_code, node, files_changed, diff_sha256 "
            "FROM tasks ORDER BY task"
        ).fetchall()
    assert len(tasks) == 10 and {t[1] for t in tasks} == {1}  # one attempt each, none retried
    by_task = {t[0]: t for t in tasks}
    assert by_task["t0007"][2:4] == ("failed", 3)
    assert by_task["t0008"][5] == 1 and by_task["t0008"][6]  # the edit is in the diff
    running = [r for r in rows if r["state"] == "running"]
    assert len(running) == 10 and all(r["node"] for r in running)


@pytest.mark.docker
def test_cancelling_a_batch_stops_its_sandboxes_and_leaves_no_container(
    settings: Settings, tmp_path: Path, policies_path: Path, docker_client: Any, base_image: str,
    wait_for: Any,
) -> None:  # fmt: skip
    from accounting.policies import load_policies

    plan = make_plan(tmp_path, "cancel-batch", "capped", ["sleep 300"] * 4,
                     backend=Backend.DOCKER, policies_path=policies_path)  # fmt: skip
    scheduler = get_scheduler(settings.data_dir, policies=load_policies(policies_path))
    try:
        ray.get(scheduler.submit.remote(plan))
        wait_for(lambda: len(containers_of(docker_client, plan.batch_id)) == 2,
                 timeout=120, what="two sandboxes running (quota 2)")  # fmt: skip
        done = ray.get(scheduler.cancel.remote(plan.batch_id))
        assert done == {"target": plan.batch_id, "cancelled_queued": 2, "cancelling_running": 2}
        status = ray.get(scheduler.wait.remote(plan.batch_id, 120.0))
        assert status["batches"][plan.batch_id]["states"] == {"cancelled": 4}
        left = containers_of(docker_client, plan.batch_id)
    finally:
        remove_containers(docker_client, plan.batch_id)
    assert left == [], f"containers left behind after cancel: {left}"
    flush_ledger()
    rows = state_rows(settings.data_dir, plan.batch_id)
    assert Counter(last_states(rows).values()) == {"cancelled": 4}
    assert set(terminal_counts(rows).values()) == {1}
