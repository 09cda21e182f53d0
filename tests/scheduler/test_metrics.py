"""Prometheus metrics from the live state (own registry, units in names, exact totals),
and the Grafana dashboard only uses metric names the registry exposes."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from accounting.schemas import Charge
from scheduler.event_builder import AttemptEvents
from scheduler.metrics import METRICS, series_names
from scheduler.monitor import MonitorCore

T0 = datetime(2026, 3, 2, 10, 0, tzinfo=UTC)
GRAFANA = Path(__file__).resolve().parents[2] / "configs" / "grafana" / "sandfleet.json"


def busy_monitor() -> MonitorCore:
    core = MonitorCore()
    a = AttemptEvents("ml", "b1", "t1", t0=T0)
    b = AttemptEvents("data", "b2", "t2", t0=T0)
    q = AttemptEvents("data", "b2", "t3", t0=T0)
    core.ingest(
        [
            a.state(0, "queued"),
            a.state(1, "running"),
            a.sample(3, 0, 1 << 20),
            b.state(0, "queued"),
            b.state(2, "running"),
            b.command(2.4, ["make"]),
            q.state(0, "queued"),
        ]
    )
    core.ingest([a.llm(5 + i, 1000, 100, cost_nusd=250_000_000, model="gpt-4.1") for i in range(4)])
    core.ingest(
        [
            b.llm(9, 10, 1, cost_nusd=1, model="claude"),
            a.egress(10, "pypi.org", True),
            a.egress(11, "evil.example", False),
            b.state(20, "succeeded"),
        ]
    )
    core.ingest([a.egress(12 + i, f"x{i}.example", False) for i in range(3)])
    cpu = Charge(
        T0,
        "ml",
        "b1",
        "t1",
        1,
        "n1",
        "c1",
        T0,
        "swe",
        "Compute",
        "Sandbox Compute",
        "",
        "",
        "cpu",
        Decimal(3),
        "core-seconds",
        Decimal(1000),
        3000,
        "final",
        "v1",
    )
    core.ingest([cpu], "charges")
    return core


def scrape(core: MonitorCore) -> dict[str, list[tuple[dict[str, str], float]]]:
    text = generate_latest(core.registry).decode()
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((sample.labels, sample.value))
    return out


def value(samples: dict, name: str, **labels: str) -> float:
    hits = [v for lab, v in samples[name] if all(lab.get(k) == x for k, x in labels.items())]
    assert len(hits) == 1, (name, labels, samples.get(name))
    return hits[0]


def test_the_registry_is_its_own_and_exposes_every_family() -> None:
    core = busy_monitor()
    assert core.registry is not REGISTRY
    samples = scrape(core)
    assert set(samples) <= series_names()
    families = {re.sub(r"_(total|bucket|sum|count)$", "", n) for n in samples}
    assert families == set(METRICS)


def test_names_carry_units_and_counters_end_in_total() -> None:
    for name, (kind, _help) in METRICS.items():
        assert name.startswith("sandfleet_")
        if "spend" in name or "charges" in name:
            assert name.endswith("_usd")
        if kind == "histogram":
            assert name.endswith("_seconds")
    assert {
        "sandfleet_llm_spend_usd_total",
        "sandfleet_llm_tokens_total",
        "sandfleet_anomalies_total",
    } <= series_names()


def test_the_values_follow_the_event_stream() -> None:
    samples = scrape(busy_monitor())
    assert value(samples, "sandfleet_tasks", team="ml", state="running") == 1
    assert value(samples, "sandfleet_tasks", team="data", state="succeeded") == 1
    assert value(samples, "sandfleet_queue_depth", team="data") == 1
    assert value(samples, "sandfleet_active_sandboxes", team="ml") == 1
    assert value(samples, "sandfleet_active_sandboxes", team="data") == 0
    assert value(samples, "sandfleet_llm_spend_usd_total", team="ml", model="gpt-4.1") == 1.0
    assert (
        value(
            samples,
            "sandfleet_llm_tokens_total",
            team="ml",
            model="gpt-4.1",
            bucket="input_uncached",
        )
        == 4000
    )
    assert (
        value(samples, "sandfleet_llm_calls_total", team="data", model="claude", status="ok") == 1
    )
    assert value(samples, "sandfleet_egress_decisions_total", team="ml", decision="denied") == 4
    assert value(samples, "sandfleet_anomalies_total", rule="denied_egress", action="escalate") == 1
    assert value(samples, "sandfleet_provisioning_seconds_count") == 2
    assert value(samples, "sandfleet_provisioning_seconds_bucket", le="0.5") == 1  # 0.4 s
    assert value(samples, "sandfleet_provisioning_seconds_bucket", le="2.0") == 2  # 2 s
    assert value(samples, "sandfleet_events_total", kind="llm_call") == 5
    assert value(samples, "sandfleet_charges_usd_total", team="ml", category="Compute") == 3e-6


def test_the_grafana_dashboard_uses_only_metrics_the_registry_exposes() -> None:
    dash = json.loads(GRAFANA.read_text())
    assert dash["title"] and dash["uid"] and dash["schemaVersion"] >= 30
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    assert len(panels) >= 10 and len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    exprs = [t["expr"] for p in panels for t in p["targets"]]
    assert exprs and all(t.get("refId") for p in panels for t in p["targets"])
    used = {m for e in exprs for m in re.findall(r"\bsandfleet_[a-z_]+", e)}
    assert used <= series_names(), sorted(used - series_names())
    families = {re.sub(r"_(total|bucket|sum|count)$", "", n) for n in used}
    assert families == set(METRICS), sorted(set(METRICS) - families)  # every metric is shown
    for p in panels:
        grid = p["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24
