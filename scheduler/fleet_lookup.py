"""`get_scheduler`: the cluster's one `FleetScheduler` actor, created on first use.

Named `SCHEDULER_NAME` in namespace `sandfleet`, detached, on the head when the cluster
has the head resource, and started together with the cluster's budget keeper (the
runner's gateway fails closed without one). A scheduler that already records into
another data dir is refused.
"""

from __future__ import annotations

from typing import Any, Final

import ray

from accounting.errors import ConfigError
from accounting.policies import Policies
from scheduler.ledger_actor import NAMESPACE, head_options

__all__ = ["SCHEDULER_NAME", "get_scheduler"]

SCHEDULER_NAME: Final = "fleet-scheduler"


def get_scheduler(
    data_dir: str, *, policies: Policies | None = None, max_slots: int | None = None
) -> Any:
    """The cluster's scheduler actor, created on first use (on the head when it can be),
    with the cluster's budget keeper (the runner's gateway fails closed without one)."""
    from scheduler.fleet import FleetScheduler  # it imports this module's name

    try:
        from scheduler.budget_keeper import get_budget_keeper
    except ImportError:  # no keeper in this build: budgets are not enforced
        pass
    else:
        get_budget_keeper(policies, data_dir)
    handle = FleetScheduler.options(  # type: ignore[attr-defined]
        name=SCHEDULER_NAME,
        namespace=NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
        **head_options(),
    ).remote(data_dir, policies, max_slots)
    actual = ray.get(handle.data_dir.remote())
    if actual != data_dir:
        raise ConfigError(
            f"--data-dir {data_dir}: this Ray cluster's scheduler records into {actual} "
            f"(fix: pass --data-dir {actual}, or use another cluster)"
        )
    return handle
