"""A real Prometheus server (Debian's `prometheus`), started by the test on loopback with
its own config and data dir, scrapes the Monitor's /metrics; its query API returns the
expected series with the expected values."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from helpers import missing_engine

from scheduler.dashboard import DashboardServer
from scheduler.event_builder import AttemptEvents
from scheduler.monitor import MonitorCore

CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def monitor() -> Iterator[tuple[MonitorCore, DashboardServer]]:
    core = MonitorCore()
    t0 = datetime.now(UTC)
    a = AttemptEvents("ml-research", "b1", "t1", t0=t0)
    b = AttemptEvents("data-platform", "b2", "t2", t0=t0)
    core.ingest(
        [
            a.state(0, "queued"),
            a.state(0.5, "running"),
            a.command(1, ["make"]),
            b.state(0, "queued"),
            b.state(0.2, "running"),
            b.state(3, "succeeded"),
            a.egress(2, "pypi.org", True),
            a.egress(3, "metadata.google.internal", False),
        ]
    )
    core.ingest([a.llm(4 + i, 2000, 300, cost_nusd=125_000_000, model="gpt-4.1") for i in range(4)])
    server = DashboardServer(core, "127.0.0.1", 0)
    server.start()
    try:
        yield core, server
    finally:
        server.stop()


@pytest.fixture
def prometheus(tmp_path: Path, monitor: Any) -> Iterator[str]:
    binary = shutil.which("prometheus")
    if binary is None:
        missing_engine("prometheus is not installed (apt-get install prometheus)")
        return
    _, server = monitor
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: sandfleet\n    metrics_path: /metrics\n"
        f"    static_configs:\n      - targets: ['127.0.0.1:{server.port}']\n"
    )
    port = free_port()
    log = (tmp_path / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()


def query(base: str, promql: str) -> list[dict[str, Any]]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            data = json.loads(r.read())
    except (urllib.error.URLError, ConnectionError):
        return []  # not listening yet
    assert data["status"] == "success", data
    return list(data["data"]["result"])


def wait_query(base: str, promql: str, timeout: float = 90.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while not (result := query(base, promql)):
        if time.monotonic() > deadline:
            pytest.fail(f"Prometheus returned nothing for {promql!r} within {timeout:.0f}s")
        time.sleep(0.5)
    return result


def test_prometheus_scrapes_the_monitor_and_answers_queries(prometheus: str, monitor: Any) -> None:
    up = wait_query(prometheus, 'up{job="sandfleet"} == 1')
    assert up[0]["metric"]["instance"].startswith("127.0.0.1:")
    spend = wait_query(prometheus, "sandfleet_llm_spend_usd_total")
    assert [(s["metric"]["team"], s["metric"]["model"], float(s["value"][1])) for s in spend] == [
        ("ml-research", "gpt-4.1", 0.5)
    ]
    tokens = wait_query(
        prometheus, 'sum by (bucket) (sandfleet_llm_tokens_total{team="ml-research"})'
    )
    assert {s["metric"]["bucket"]: float(s["value"][1]) for s in tokens} == {
        "input_uncached": 8000.0,
        "output": 1200.0,
    }
    tasks = wait_query(prometheus, "sandfleet_tasks > 0")
    assert {(s["metric"]["team"], s["metric"]["state"]) for s in tasks} == {
        ("ml-research", "running"),
        ("data-platform", "succeeded"),
    }
    egress = wait_query(prometheus, 'sandfleet_egress_decisions_total{decision="denied"}')
    assert float(egress[0]["value"][1]) == 1.0
    anomalies = wait_query(prometheus, "sandfleet_anomalies_total")
    assert {(s["metric"]["rule"], s["metric"]["action"]) for s in anomalies} == {
        ("denied_egress", "escalate")
    }
    hist = wait_query(prometheus, "sandfleet_provisioning_seconds_count")
    assert float(hist[0]["value"][1]) == 1.0
    active = wait_query(prometheus, "sum(sandfleet_active_sandboxes)")
    assert float(active[0]["value"][1]) == 1.0

    # A later call is seen by the next scrape: the counter grows.
    core, _ = monitor
    a = AttemptEvents("ml-research", "b1", "t1")
    core.ingest([a.llm(0, 10, 1, cost_nusd=500_000_000, model="gpt-4.1")])
    wait_query(prometheus, 'sandfleet_llm_spend_usd_total{team="ml-research"} == 1')
