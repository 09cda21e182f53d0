"""scheduler: the Ray side — batch specs, the fair-share queue, the actors (FleetScheduler,
LedgerActor, Monitor, BudgetKeeper, NodeGateway), the runner of one attempt, and the CLI."""

from __future__ import annotations

import importlib
from typing import Any

# Each public name and the module that defines it; imported on first use (PEP 562),
# so `import scheduler.<module>` never pays for the heavy ones.
_EXPORTS = {
    "Actions": "scheduler.monitor",
    "Admission": "scheduler.queue",
    "AttemptEvents": "scheduler.event_builder",
    "AttemptRequest": "scheduler.runner",
    "Backend": "scheduler.plan",
    "Backlog": "scheduler.queue",
    "BatchDefaults": "scheduler.spec",
    "BatchSpec": "scheduler.spec",
    "BudgetBook": "scheduler.budget",
    "BudgetClient": "scheduler.budget",
    "cancel": "scheduler.driver",
    "Cancelled": "scheduler.queue",
    "Capacity": "scheduler.queue",
    "CapReached": "scheduler.budget",
    "Caps": "scheduler.budget",
    "caps_from_policies": "scheduler.budget",
    "cluster_max_slots": "scheduler.autoscale",
    "compute_rate_nusd_per_s": "scheduler.budget",
    "DashboardServer": "scheduler.dashboard",
    "DemandPublisher": "scheduler.autoscale",
    "finding_id": "scheduler.stream_rules",
    "fleet_registry": "scheduler.metrics",
    "FleetBook": "scheduler.book",
    "FleetQueue": "scheduler.queue",
    "FleetScheduler": "scheduler.fleet",
    "free_capacity": "scheduler.state",
    "get_ledger": "scheduler.ledger_actor",
    "get_monitor": "scheduler.monitor_actor",
    "get_scheduler": "scheduler.fleet",
    "HEAD_RESOURCE": "scheduler.ledger_actor",
    "job_request": "scheduler.driver",
    "judge_error": "scheduler.state",
    "judge_result": "scheduler.state",
    "LEDGER_NAME": "scheduler.ledger_actor",
    "LedgerActor": "scheduler.ledger_actor",
    "live_status": "scheduler.driver",
    "LiveLimits": "scheduler.live_state",
    "LiveState": "scheduler.live_state",
    "load_batch": "scheduler.spec",
    "load_cluster_config": "scheduler.autoscale",
    "mean_concurrency": "scheduler.state",
    "METRICS": "scheduler.metrics",
    "Monitor": "scheduler.monitor_actor",
    "MONITOR_NAME": "scheduler.monitor_actor",
    "MonitorCore": "scheduler.monitor",
    "NAMESPACE": "scheduler.ledger_actor",
    "next_step": "scheduler.state",
    "parse_batch": "scheduler.spec",
    "peak_concurrency": "scheduler.state",
    "Plan": "scheduler.plan",
    "plan_batch": "scheduler.plan",
    "prepare": "scheduler.driver",
    "queue_policies": "scheduler.state",
    "QueueItem": "scheduler.queue",
    "QueueStats": "scheduler.queue",
    "recover_batch": "scheduler.state",
    "Recovery": "scheduler.state",
    "resume": "scheduler.driver",
    "RuleActions": "scheduler.monitor",
    "run": "scheduler.driver",
    "run_attempt": "scheduler.runner",
    "running_intervals": "scheduler.state",
    "SCHEDULER_NAME": "scheduler.fleet",
    "Settings": "scheduler.driver",
    "SLOT_RESOURCE": "scheduler.autoscale",
    "Step": "scheduler.state",
    "StreamRules": "scheduler.stream_rules",
    "sweep_sandboxes": "scheduler.runner",
    "TaskEntry": "scheduler.spec",
    "TaskSpec": "scheduler.spec",
    "TeamPolicy": "scheduler.queue",
    "TeamStats": "scheduler.queue",
    "TERMINAL_STATES": "scheduler.state",
    "Verdict": "scheduler.state",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
