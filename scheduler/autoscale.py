"""Telling Ray's autoscaler how many sandbox slots the queue wants.

Tasks held in the scheduler's own queue are invisible to the autoscaler, so the
scheduler publishes its admissible demand (running + queued within quotas, from
`FleetQueue.backlog()`) as `request_resources(bundles=[slot] * n)`. That request is a
floor on the cluster's total capacity which outlives the scheduler (it sits in the
GCS), so it must be cleared (`bundles=[]`) when the queue drains, when the scheduler
closes, and when it (re)starts. `DemandPublisher` does exactly that, capped at the
cluster's maximum and sending only changes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from accounting.errors import ConfigError

__all__ = ["SLOT_RESOURCE", "DemandPublisher", "cluster_max_slots", "load_cluster_config"]

SLOT_RESOURCE = "sandbox_slots"

Request = Callable[[list[dict[str, float]]], None]


def _ray_request(bundles: list[dict[str, float]]) -> None:
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=bundles)


class DemandPublisher:
    """Keeps `request_resources` equal to the wanted slots, capped at `max_slots`.

    `request` defaults to Ray's `request_resources(bundles=...)` (the driver or actor
    must be connected to the cluster); tests may pass a recorder instead.
    """

    def __init__(
        self,
        max_slots: int,
        slot_bundle: Mapping[str, float] | None = None,
        request: Request | None = None,
    ) -> None:
        if max_slots < 0:
            raise ConfigError(f"max_slots {max_slots} is negative (fix: use the cluster's size)")
        self.max_slots = max_slots
        self.slot_bundle = dict(slot_bundle or {SLOT_RESOURCE: 1})
        self._request = request or _ray_request
        self._last: int | None = None

    @property
    def published(self) -> int | None:
        """Slots last sent to the autoscaler (`None` before the first call)."""
        return self._last

    def publish(self, slots: int) -> bool:
        """Ask for `slots` sandboxes (capped); returns whether a request was sent."""
        want = max(0, min(slots, self.max_slots))
        if want == self._last:
            return False
        self._request([dict(self.slot_bundle) for _ in range(want)])
        self._last = want
        return True

    def clear(self) -> None:
        """Drop the floor, whatever was published before (drain, close, restart)."""
        self._request([])
        self._last = 0

    def close(self) -> None:
        self.clear()

    def __enter__(self) -> DemandPublisher:
        self.clear()  # a restarted scheduler must not inherit a stale floor
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def load_cluster_config(path: str | Path) -> dict[str, Any]:
    """A Ray cluster YAML (cluster.yaml, configs/cluster-fake.yaml) as a dict."""
    from accounting.config import read_yaml

    data = read_yaml(Path(path))
    if not isinstance(data, dict) or not isinstance(data.get("available_node_types"), dict):
        raise ConfigError(f"{path}: not a Ray cluster config (fix: add available_node_types)")
    return data


def cluster_max_slots(config: Mapping[str, Any], resource: str = SLOT_RESOURCE) -> int:
    """The most sandbox slots the cluster can ever offer: the cap for `DemandPublisher`.

    Worker types are filled largest-first up to their own `max_workers` and the global
    `max_workers`; the head's slots (normally none) count too.
    """
    types = config["available_node_types"]
    head = config.get("head_node_type")
    room = int(config.get("max_workers", 0))
    total = int(types.get(head, {}).get("resources", {}).get(resource, 0)) if head else 0
    workers = sorted(
        (
            (int(t.get("resources", {}).get(resource, 0)), int(t.get("max_workers", 0)), name)
            for name, t in types.items()
            if name != head
        ),
        reverse=True,
    )
    for per_node, count, _ in workers:
        n = min(count, room)
        total += per_node * n
        room -= n
    return total
