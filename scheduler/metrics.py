"""Prometheus metrics of the fleet, read from the Monitor's live state at scrape time.

`fleet_registry(state, lock)` returns a `CollectorRegistry` of its own (never the global
one) holding one collector that, on each scrape, reads `scheduler.live_state.LiveState`
under `lock`. Counters come from the live state's cumulative totals (exact integers;
money in nano-USD, exposed in USD), so every series is derived from the ledger's event
stream, and a Monitor restarted over a replayed ledger exposes the same totals.

Names carry their unit and `_total` for counters, as Prometheus expects; `METRICS`
lists every family (the Grafana dashboard test checks it uses only these).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from accounting.schemas import TaskState
from scheduler.live_state import LiveState

__all__ = ["METRICS", "FleetCollector", "fleet_registry", "series_names"]

_NANO = 1e9

METRICS: dict[str, tuple[str, str]] = {
    "sandfleet_tasks": ("gauge", "Tasks by their latest state and team."),
    "sandfleet_active_sandboxes": ("gauge", "Sandboxes running an attempt now, by team."),
    "sandfleet_queue_depth": ("gauge", "Tasks queued and not yet admitted, by team."),
    "sandfleet_provisioning_seconds": (
        "histogram",
        "Seconds from an attempt reaching its node to its sandbox's first activity.",
    ),
    "sandfleet_llm_tokens": ("counter", "LLM tokens by team, model and exclusive usage bucket."),
    "sandfleet_llm_calls": ("counter", "LLM calls by team, model and status."),
    "sandfleet_llm_spend_usd": ("counter", "LLM spend in USD by team and model."),
    "sandfleet_charges_usd": (
        "counter",
        "Every priced charge the ledger received, in USD, by team and service category.",
    ),
    "sandfleet_egress_decisions": ("counter", "Egress connections by team and decision."),
    "sandfleet_anomalies": ("counter", "Anomaly findings by rule and action."),
    "sandfleet_events": ("counter", "Ledger events the Monitor received, by kind."),
    "sandfleet_monitor_last_event_timestamp_seconds": (
        "gauge",
        "Unix time of the newest event the Monitor has seen.",
    ),
}
"""Family name (without `_total` / `_bucket` suffixes) -> (type, help)."""


def series_names() -> set[str]:
    """Every sample name the families can expose (with `_total`, `_bucket`, ...)."""
    out: set[str] = set()
    for name, (kind, _help) in METRICS.items():
        if kind == "counter":
            out |= {f"{name}_total", f"{name}_created"}
        elif kind == "histogram":
            out |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
        else:
            out.add(name)
    return out


def _gauge(name: str, labels: list[str]) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, METRICS[name][1], labels=labels)


def _counter(name: str, labels: list[str]) -> CounterMetricFamily:
    return CounterMetricFamily(name, METRICS[name][1], labels=labels)


class FleetCollector(Collector):
    """Reads a `LiveState` under a lock and yields every family of `METRICS`."""

    def __init__(
        self, state: Callable[[], LiveState], lock: AbstractContextManager[object]
    ) -> None:
        self._state = state
        self._lock = lock

    def describe(self) -> Iterator[Metric]:
        return iter(())  # families are built at collect time; no early registry check

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            families = self._families(self._state())
        yield from families

    def _families(self, s: LiveState) -> list[Metric]:
        tasks = _gauge("sandfleet_tasks", ["team", "state"])
        queue = _gauge("sandfleet_queue_depth", ["team"])
        teams = sorted({team for team, _ in s.counts})
        for (team, state), n in sorted(s.counts.items()):
            tasks.add_metric([team, state.value], n)
        for team in teams:
            queue.add_metric([team], s.counts.get((team, TaskState.QUEUED), 0))
        active = _gauge("sandfleet_active_sandboxes", ["team"])
        by_team: dict[str, int] = dict.fromkeys(teams, 0)
        for view in s.active.values():
            by_team[view.team] = by_team.get(view.team, 0) + 1
        for team, n in sorted(by_team.items()):
            active.add_metric([team], n)

        t = s.totals
        prov = HistogramMetricFamily(
            "sandfleet_provisioning_seconds", METRICS["sandfleet_provisioning_seconds"][1]
        )
        buckets = [(repr(float(b)), float(c)) for b, c in t.provisioning.cumulative()]
        prov.add_metric([], [*buckets, ("+Inf", float(t.provisioning.n))], t.provisioning.total)

        tokens = _counter("sandfleet_llm_tokens", ["team", "model", "bucket"])
        for (team, model, bucket), n in sorted(t.tokens.items()):
            tokens.add_metric([team, model, bucket], n)
        calls = _counter("sandfleet_llm_calls", ["team", "model", "status"])
        for (team, model, status), n in sorted(t.llm_calls.items()):
            calls.add_metric([team, model, status], n)
        spend = _counter("sandfleet_llm_spend_usd", ["team", "model"])
        for (team, model), n in sorted(t.llm_nusd.items()):
            spend.add_metric([team, model], n / _NANO)
        charges = _counter("sandfleet_charges_usd", ["team", "category"])
        for (team, category), n in sorted(t.charges_nusd.items()):
            charges.add_metric([team, category], n / _NANO)
        egress = _counter("sandfleet_egress_decisions", ["team", "decision"])
        for (team, decision), n in sorted(t.egress.items()):
            egress.add_metric([team, decision], n)
        anomalies = _counter("sandfleet_anomalies", ["rule", "action"])
        for (rule, action), n in sorted(t.findings.items()):
            anomalies.add_metric([rule, action], n)
        events = _counter("sandfleet_events", ["kind"])
        for kind, n in sorted(t.events.items()):
            events.add_metric([kind], n)
        last = _gauge("sandfleet_monitor_last_event_timestamp_seconds", [])
        last.add_metric([], s.last_event.timestamp() if s.last_event else 0.0)
        return [tasks, active, queue, prov, tokens, calls, spend, charges, egress, anomalies,
                events, last]  # fmt: skip


def fleet_registry(
    state: Callable[[], LiveState], lock: AbstractContextManager[object] | None = None
) -> CollectorRegistry:
    """A registry of its own with the fleet collector (scrape with `generate_latest`)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(state, lock or threading.Lock()))
    return registry
