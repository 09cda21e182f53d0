"""A real batch grows the fake autoscaling cluster from 0 workers to several, and the
cluster returns to 0 once the queue drains (the scheduler clears its autoscaler
request). Uses the `fake_cluster` fixture (configs/cluster-fake.yaml: head with no CPUs,
up to 4 workers of 2 sandbox slots) and real Docker sandboxes."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from scheduler.autoscale import cluster_max_slots
from scheduler.driver import Settings, run
from scheduler.plan import Backend
from scheduler.testing import containers_of, make_plan, remove_containers, stop_fleet

pytestmark = [pytest.mark.ray, pytest.mark.docker, pytest.mark.slow]


def test_a_batch_scales_the_cluster_from_zero_to_several_workers_and_back(
    fake_cluster: Any, data_dir: Path, tmp_path: Path, docker_client: Any, base_image: str,
    wait_for: Any,
) -> None:  # fmt: skip
    assert fake_cluster.alive_workers() == 0
    max_slots = cluster_max_slots(fake_cluster.config)
    plan = make_plan(tmp_path, "autoscale", "autoscale", ["sleep 8"] * 8, backend=Backend.DOCKER)
    settings = Settings(data_dir=str(data_dir), max_slots=max_slots, poll_s=0.5)
    outcome: dict[str, Any] = {}

    def drive() -> None:
        try:
            outcome["final"] = run(plan, settings)
        except BaseException as e:  # reported by the test below
            outcome["error"] = e

    driver = threading.Thread(target=drive, daemon=True)
    peak = 0
    try:
        driver.start()
        while driver.is_alive():
            peak = max(peak, fake_cluster.alive_workers())
            driver.join(0.5)
        assert "error" not in outcome, outcome.get("error")
        assert outcome["final"]["states"] == {"succeeded": 8}
        assert peak >= 2, f"the cluster only grew to {peak} worker(s)"
        wait_for(lambda: fake_cluster.alive_workers() == 0, timeout=180,
                 what="the cluster to shrink back to 0 workers after the drain")  # fmt: skip
        assert containers_of(docker_client, plan.batch_id) == []
    finally:
        stop_fleet()
        remove_containers(docker_client, plan.batch_id)
