"""DemandPublisher: the autoscaler request follows the queue; a fake cluster grows and shrinks."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from accounting.errors import ConfigError
from scheduler.autoscale import DemandPublisher, cluster_max_slots, load_cluster_config
from scheduler.queue import Capacity, FleetQueue, QueueItem, TeamPolicy

REPO = Path(__file__).resolve().parents[2]
FAKE_CLUSTER_YAML = REPO / "configs" / "cluster-fake.yaml"


class Recorder:
    def __init__(self) -> None:
        self.calls: list[list[dict[str, float]]] = []

    def __call__(self, bundles: list[dict[str, float]]) -> None:
        self.calls.append(bundles)


def test_publisher_sends_one_slot_bundle_per_wanted_sandbox() -> None:
    rec = Recorder()
    pub = DemandPublisher(max_slots=10, request=rec)
    assert pub.publish(3) is True
    assert rec.calls == [[{"sandbox_slots": 1}] * 3]


def test_publisher_sends_only_changes() -> None:
    rec = Recorder()
    pub = DemandPublisher(max_slots=10, request=rec)
    pub.publish(3)
    assert pub.publish(3) is False
    pub.publish(4)
    assert [len(c) for c in rec.calls] == [3, 4]


def test_publisher_caps_demand_at_the_cluster_maximum() -> None:
    rec = Recorder()
    pub = DemandPublisher(max_slots=8, request=rec)
    pub.publish(100_000)
    pub.publish(50)  # still capped at 8: no new request
    assert [len(c) for c in rec.calls] == [8]
    assert pub.published == 8


def test_drained_queue_clears_the_request_with_no_bundles() -> None:
    rec = Recorder()
    pub = DemandPublisher(max_slots=8, request=rec)
    pub.publish(5)
    pub.publish(0)
    assert rec.calls[-1] == []


def test_publisher_clears_on_start_and_on_close() -> None:
    rec = Recorder()
    with DemandPublisher(max_slots=8, request=rec) as pub:
        assert rec.calls == [[]]
        pub.publish(2)
    assert rec.calls[-1] == []
    assert pub.published == 0


def test_publisher_uses_a_custom_slot_bundle() -> None:
    rec = Recorder()
    DemandPublisher(max_slots=4, slot_bundle={"sandbox_slots": 1, "CPU": 1}, request=rec).publish(2)
    assert rec.calls == [[{"sandbox_slots": 1, "CPU": 1}] * 2]


def test_negative_cluster_size_is_refused() -> None:
    with pytest.raises(ConfigError, match="max_slots"):
        DemandPublisher(max_slots=-1, request=Recorder())


def test_cluster_max_slots_of_the_shipped_configs() -> None:
    assert cluster_max_slots(load_cluster_config(FAKE_CLUSTER_YAML)) == 4 * 2
    # 80 spot + 20 on-demand workers of 8 slots, under the global max_workers of 100
    assert cluster_max_slots(load_cluster_config(REPO / "cluster.yaml")) == 100 * 8


def test_cluster_max_slots_respects_the_global_worker_cap() -> None:
    config = {
        "max_workers": 3,
        "head_node_type": "head",
        "available_node_types": {
            "head": {"resources": {"CPU": 0}},
            "small": {"resources": {"sandbox_slots": 1}, "max_workers": 10},
            "big": {"resources": {"sandbox_slots": 4}, "max_workers": 2},
        },
    }
    assert cluster_max_slots(config) == 2 * 4 + 1 * 1


def test_queue_backlog_drives_the_publisher() -> None:
    rec = Recorder()
    pub = DemandPublisher(max_slots=8, request=rec)
    q = FleetQueue({"a": TeamPolicy(max_sandboxes=3)})
    q.push_many(QueueItem(f"t{i}", "b", "a") for i in range(10))
    pub.publish(q.backlog().demand)  # quota 3: ask for 3, not 10
    admitted = q.pop_admissible(Capacity(slots=8))
    pub.publish(q.backlog().demand)  # 3 running, 0 more admissible: unchanged
    for a in admitted:
        q.release(a.item.task_id)
    q.cancel(batch="b")
    pub.publish(q.backlog().demand)
    assert [len(c) for c in rec.calls] == [3, 0]


@pytest.mark.ray
@pytest.mark.slow
def test_backlog_grows_the_fake_cluster_and_clearing_it_shrinks_it_to_zero(
    fake_cluster: Any, wait_for: Callable[..., None]
) -> None:
    max_slots = cluster_max_slots(fake_cluster.config)
    assert fake_cluster.alive_workers() == 0
    with DemandPublisher(max_slots=max_slots) as pub:
        pub.publish(6)  # 3 workers of 2 slots
        wait_for(lambda: fake_cluster.alive_workers() >= 2, timeout=120, what=">= 2 workers")
        pub.publish(0)
        wait_for(lambda: fake_cluster.alive_workers() == 0, timeout=180, what="0 workers")
