"""The Monitor as a named Ray actor on a real local Ray: it serves its dashboard and
/metrics, folds in what it is sent, and writes its findings to the cluster's ledger."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray

from accounting.views import connect
from scheduler.event_builder import AttemptEvents
from scheduler.ledger_actor import NAMESPACE, get_ledger
from scheduler.monitor_actor import MONITOR_NAME, get_monitor
from scheduler.testing import local_ray

pytestmark = [pytest.mark.ray]


@pytest.fixture
def cluster(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[str]:
    monkeypatch.setenv("SANDFLEET_AUDIT_KEY", str(tmp_path / "keys" / "audit.pem"))
    with local_ray(num_cpus=1, slots=1) as tmp:
        yield tmp


def test_the_monitor_actor_serves_and_records_its_findings_in_the_ledger(
    cluster: str, data_dir: Path, wait_for: Any
) -> None:
    ledger = get_ledger(str(data_dir))
    monitor = get_monitor("127.0.0.1", 0)
    try:
        assert ray.get_actor(MONITOR_NAME, namespace=NAMESPACE) is not None
        url = ray.get(monitor.url.remote())
        a = AttemptEvents("ml", "b1", "t1")
        evs = [a.state(0, "running"), *[a.egress(1 + i, f"h{i}.test", False) for i in range(3)]]
        assert ray.get(monitor.ingest.remote("events", evs)) == 1
        with urllib.request.urlopen(url + "api/fleet", timeout=10) as r:
            fleet = json.loads(r.read())
        assert fleet["states"] == {"running": 1}
        assert [f["rule"] for f in fleet["findings"]] == ["denied_egress"]
        with urllib.request.urlopen(url + "metrics", timeout=10) as r:
            assert (
                b'sandfleet_anomalies_total{action="escalate",rule="denied_egress"} 1.0' in r.read()
            )
        ray.get(monitor.close.remote())

        def recorded() -> list[tuple[str, str]]:
            ray.get(ledger.flush.remote())  # the monitor's append went out before; poll for it
            con = connect(data_dir)
            try:
                return con.execute(
                    "SELECT task, json_extract_string(payload, '$.rule') FROM events "
                    "WHERE kind = 'anomaly_finding'"
                ).fetchall()
            finally:
                con.close()

        wait_for(lambda: bool(recorded()), timeout=30, what="the finding in the ledger")
        assert recorded() == [("t1", "denied_egress")]
    finally:
        ray.kill(monitor)
        ray.get(ledger.close.remote())
        ray.kill(ledger)


def test_a_charge_the_ledger_already_had_is_not_teed_to_the_monitor_again(
    cluster: str, data_dir: Path, wait_for: Any
) -> None:
    from datetime import UTC, datetime
    from decimal import Decimal

    from accounting.schemas import Charge

    def charge(cid: str) -> Charge:
        now = datetime.now(UTC)
        return Charge(
            now, "ml", "b1", "t1", 1, "node", cid, now, "fix", "Compute", "Sandbox Compute",
            "sandfleet", "", "cpu", Decimal(1), "core-seconds", Decimal(1000), 1000, "final",
            "p1",
        )  # fmt: skip

    ledger = get_ledger(str(data_dir))
    monitor = get_monitor("127.0.0.1", 0)
    try:
        assert ray.get(ledger.append.remote("charges", [charge("a")])) == 1
        # a retry of "a" with a new charge: only "b" is recorded, and only "b" is teed
        assert ray.get(ledger.append.remote("charges", [charge("a"), charge("b")])) == 1
        assert ray.get(ledger.append_many.remote([("charges", [charge("b")])])) == 0
        url = ray.get(monitor.url.remote())

        def spend() -> str:
            with urllib.request.urlopen(url + "api/fleet", timeout=10) as r:
                return str(json.loads(r.read())["spend"]["total"])

        wait_for(lambda: spend() == "0.000002", timeout=30, what="the teed charges' spend")
        assert spend() == "0.000002"  # 2 x 1,000 nUSD, not 3
        ray.get(monitor.close.remote())
    finally:
        ray.kill(monitor)
        ray.get(ledger.close.remote())
        ray.kill(ledger)
