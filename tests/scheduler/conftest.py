"""Fixtures for scheduler tests: waiting on a condition, and a real fake-autoscaling Ray cluster."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
FAKE_CLUSTER_YAML = REPO / "configs" / "cluster-fake.yaml"


def wait_until(condition: Callable[[], bool], *, timeout: float, what: str) -> None:
    """Poll `condition` until it holds; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.5)


@pytest.fixture
def wait_for() -> Callable[..., None]:
    """`wait_for(condition, timeout=..., what=...)`: poll with a deadline, never a fixed sleep."""
    return wait_until


@dataclass
class FakeCluster:
    """A running in-process Ray cluster whose autoscaler uses the fake multi-node provider."""

    cluster: Any
    config: dict[str, Any]
    config_path: Path

    def alive_workers(self) -> int:
        import ray

        return sum(
            1 for n in ray.nodes() if n["Alive"] and n["Resources"].get("sandbox_slots", 0) > 0
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _kill_leftovers(marker: str) -> None:
    """Kill processes of this cluster only: their command line holds our private temp dir."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # the process exited meanwhile
            continue
        if marker in cmdline:
            with contextlib.suppress(ProcessLookupError):  # exited on its own meanwhile
                os.kill(int(entry.name), signal.SIGKILL)


@pytest.fixture
def fake_cluster(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeCluster]:
    """Head (CPU 0, `sandfleet_head`) + autoscaler with configs/cluster-fake.yaml.

    Private RAY_TMPDIR (so no other Ray on the box sees or joins it), a free GCS port
    written into a copy of the yaml (`provider.gcs_address`), no fixed agent port.
    Always shut down; any process of this cluster still alive afterwards is killed.
    """
    try:
        import ray
        from ray._private.services import get_node_ip_address
        from ray.cluster_utils import Cluster
    except ImportError as e:  # pragma: no cover - ray is a hard dependency
        pytest.skip(f"ray is not installed: {e}")
    tmp = tempfile.mkdtemp(prefix="sfray-", dir="/tmp")  # short: unix socket paths
    port = _free_port()
    config = yaml.safe_load(FAKE_CLUSTER_YAML.read_text())
    config["provider"]["gcs_address"] = f"{get_node_ip_address()}:{port}"
    config_path = Path(tmp) / "cluster-fake.yaml"
    config_path.write_text(yaml.safe_dump(config))
    for key, value in {
        "RAY_TMPDIR": tmp,
        "RAY_FAKE_CLUSTER": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
        "AUTOSCALER_UPDATE_INTERVAL_S": "1",
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cluster = None
    try:
        cluster = Cluster(
            initialize_head=True,
            connect=True,
            head_node_args={
                "num_cpus": 0,
                "resources": {"sandfleet_head": 1},
                "include_dashboard": False,
                "dashboard_agent_listen_port": 0,  # random: never the default 52365
                "gcs_server_port": port,
                "autoscaling_config": str(config_path),
            },
        )
        yield FakeCluster(cluster, config, config_path)
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
        _kill_leftovers(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
