"""`Monitor`: the cluster's live view and streaming rules, as a named Ray actor.

Named `monitor` in namespace `sandfleet`, `num_cpus=0`, detached, on the head when the
cluster offers the head resource. It wraps a `MonitorCore` (scheduler/monitor.py) and
serves it with a `DashboardServer` (host/port, default 127.0.0.1:8266); a ticker thread
runs the time-based rules every `tick_s`.

Wiring (done by the scheduler side):
- the `LedgerActor` tees what it appended, every 100 ms: `monitor.ingest_many.remote(batches)`
  (fire and forget: never `ray.get` it while holding the writer);
- findings go back to the ledger through the `ledger` actor (`append.remote`);
- `stop` actions call the `fleet-scheduler` actor's `cancel("batch/task")`.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Sequence
from typing import Any, Final

import pyarrow as pa
import ray

from accounting.policies import Policies, load_policies
from scheduler.dashboard import DEFAULT_HOST, DEFAULT_PORT, DashboardServer
from scheduler.ledger_actor import LEDGER_NAME, NAMESPACE, head_options
from scheduler.monitor import MonitorCore, RuleActions

__all__ = ["MONITOR_NAME", "Monitor", "get_monitor"]

log = logging.getLogger(__name__)

MONITOR_NAME: Final = "monitor"
SCHEDULER_NAME: Final = "fleet-scheduler"


class _LedgerSink:
    """Findings back to the cluster's ledger actor (fire and forget)."""

    def append(self, table: str, rows: Sequence[Any]) -> None:
        ray.get_actor(LEDGER_NAME, namespace=NAMESPACE).append.remote(table, list(rows))


def _cancel(task: str, attempt: int, reason: str) -> None:
    """Stop attempt `attempt` of `task` through the FleetScheduler: it ends
    `stopped_by_rule` with `reason` (the scheduler refuses a stale attempt)."""
    ray.get_actor(SCHEDULER_NAME, namespace=NAMESPACE).cancel.remote(
        task, outcome="stopped_by_rule", reason=reason, attempt=attempt or None
    )


@ray.remote(num_cpus=0, max_concurrency=8, max_restarts=-1, max_task_retries=0)  # type: ignore[call-overload]
class Monitor:
    """A `MonitorCore` served on `host:port`; see the module doc."""

    def __init__(
        self,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        policies: Policies | None = None,
        tick_s: float = 1.0,
        wire: bool = True,
        serve: bool = True,
    ) -> None:
        rules = (policies or load_policies()).anomalies
        self.core = MonitorCore(
            rules,
            actions=RuleActions.from_policies(rules, _cancel if wire else None),
            sink=_LedgerSink() if wire else None,
            background_actions=True,
        )
        # serve=False: the rules and their actions still run; only the web page is off
        self.server = DashboardServer(self.core, host, port) if serve else None
        if self.server is not None:
            self.server.start()
        self._stop = threading.Event()
        self._tick_s = tick_s
        self._ticker = threading.Thread(target=self._tick, name="monitor-tick", daemon=True)
        self._ticker.start()
        if wire:  # the ledger's tee looks for this Monitor now, not at its next lookup
            with contextlib.suppress(ValueError, AttributeError):  # no ledger (yet), or older
                ray.get_actor(LEDGER_NAME, namespace=NAMESPACE).monitor_started.remote()

    def _tick(self) -> None:
        while not self._stop.wait(self._tick_s):
            self.core.tick()

    def ingest(self, table: str, rows: Sequence[Any] | pa.Table) -> int:
        """Fold a batch of ledger rows in; returns how many new findings it made."""
        return len(self.core.ingest(rows, table))

    def ingest_many(self, batches: list[tuple[str, Sequence[Any] | pa.Table]]) -> int:
        """Several tables' batches, in order (the ledger's tee); new findings made."""
        return sum(len(self.core.ingest(rows, table)) for table, rows in batches)

    def url(self) -> str:
        return self.server.url if self.server is not None else ""

    def fleet(self) -> dict[str, Any]:
        return self.core.fleet()

    def close(self) -> None:
        """Stop the ticker, the server and the action worker (the actor stays)."""
        self._stop.set()
        self._ticker.join()
        if self.server is not None:
            self.server.stop()
        self.core.close()


def get_monitor(
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    policies: Policies | None = None,
    *,
    serve: bool = True,
) -> Any:
    """The cluster's Monitor actor, created (and serving) on first use."""
    return Monitor.options(  # type: ignore[attr-defined]
        name=MONITOR_NAME,
        namespace=NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
        **head_options(),
    ).remote(host, port, policies, serve=serve)
