"""Losing a node mid-attempt: the attempt reruns on another node as attempt 2, recorded so
in the ledger, and the lost attempt's container is reaped. A three-node
`ray.cluster_utils.Cluster` (head with no CPUs, two workers with one sandbox slot
each) and real Docker sandboxes."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray

from accounting.policies import load_policies
from scheduler.fleet import get_scheduler
from scheduler.ledger_actor import HEAD_RESOURCE
from scheduler.plan import Backend
from scheduler.testing import (
    containers_of,
    flush_ledger,
    kill_leftovers,
    make_plan,
    remove_containers,
    state_rows,
    stop_fleet,
    terminal_counts,
)

pytestmark = [pytest.mark.ray, pytest.mark.docker, pytest.mark.slow]

# Attempt 1 sleeps until its node is removed; attempt 2 finishes at once.
COMMAND = 'if [ "$SANDFLEET_ATTEMPT" = 1 ]; then sleep 300; fi; echo "ran as $SANDFLEET_ATTEMPT"'


@pytest.fixture
def three_nodes(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Any, list[Any]]]:
    from ray.cluster_utils import Cluster

    tmp = tempfile.mkdtemp(prefix="sfray-", dir="/tmp")
    monkeypatch.setenv("RAY_TMPDIR", tmp)
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cluster = None
    try:
        cluster = Cluster(
            initialize_head=True,
            connect=True,
            head_node_args={"num_cpus": 0, "resources": {HEAD_RESOURCE: 1},
                            "include_dashboard": False},
        )  # fmt: skip
        workers = [cluster.add_node(num_cpus=1, resources={"sandbox_slots": 1}) for _ in range(2)]
        cluster.wait_for_nodes()
        yield cluster, workers
    finally:
        if cluster is not None and ray.is_initialized():
            stop_fleet()
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
        kill_leftovers(tmp)
        shutil.rmtree(tmp, ignore_errors=True)


def test_node_loss_reruns_the_attempt_elsewhere_as_attempt_two(
    three_nodes: tuple[Any, list[Any]], data_dir: Path, tmp_path: Path, docker_client: Any,
    base_image: str, wait_for: Any,
) -> None:  # fmt: skip
    cluster, workers = three_nodes
    plan = make_plan(tmp_path, "node-loss", "demo", [COMMAND], backend=Backend.DOCKER)
    scheduler = get_scheduler(str(data_dir), policies=load_policies())
    try:
        ray.get(scheduler.submit.remote(plan))

        def running_node() -> str | None:
            flush_ledger()
            rows = state_rows(data_dir, plan.batch_id)
            nodes = [r["node"] for r in rows if r["state"] == "running"]
            return nodes[0] if nodes and containers_of(docker_client, plan.batch_id) else None

        wait_for(lambda: running_node() is not None, timeout=180,
                 what="attempt 1 running in its sandbox")  # fmt: skip
        victim_id = running_node()
        (victim,) = [w for w in workers if w.node_id == victim_id]
        cluster.remove_node(victim, allow_graceful=False)

        final = ray.get(scheduler.wait.remote(plan.batch_id, 240.0))["batches"][plan.batch_id]
        assert final["states"] == {"succeeded": 1}, final
        wait_for(lambda: not containers_of(docker_client, plan.batch_id), timeout=60,
                 what="the lost attempt's container to be reaped")  # fmt: skip
    finally:
        left = remove_containers(docker_client, plan.batch_id)
    assert left == []

    flush_ledger()
    rows = state_rows(data_dir, plan.batch_id)
    trail = [(r["state"], r["attempt"]) for r in rows]
    assert trail == [
        ("queued", 1), ("running", 1), ("queued", 2), ("running", 2), ("succeeded", 2),
    ], trail  # fmt: skip
    running = {r["attempt"]: r["node"] for r in rows if r["state"] == "running"}
    assert running[1] == victim_id and running[2] != victim_id
    requeue = next(r for r in rows if r["state"] == "queued" and r["attempt"] == 2)
    assert "retrying as attempt 2" in requeue["reason"]
    assert set(terminal_counts(rows).values()) == {1}
