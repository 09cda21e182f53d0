"""End to end with a real hardened sandbox: its activity is captured (sandbox.activity),
streamed into the Monitor, the repeated-command rule fires on its loop, and the `stop`
action really stops the container."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import require_image

from accounting.anomalies import Finding
from accounting.policies import AnomalyPolicies, load_policies
from accounting.schemas import Event
from sandbox.activity import ActivityCapture, CaptureIdentity, Record
from sandbox.backend import SandboxSpec
from sandbox.container_spec import container_spec, sandbox_labels, sandbox_name
from sandbox.docker_backend import DockerBackend
from sandbox.templates import load_template
from scheduler.event_builder import AttemptEvents
from scheduler.monitor import MonitorCore

pytestmark = pytest.mark.docker

LOOP = "while true; do sleep 0.1; done"
IDENTITY = CaptureIdentity("ml", "stop-test", "looper", 1, "node-x", task_type="demo")


class StopContainer:
    """The `Actions` of this test: `stop` stops the attempt's container for real."""

    def __init__(self, backend: DockerBackend, containers: dict[str, str]) -> None:
        self.backend, self.containers = backend, containers
        self.stopped: list[tuple[str, int, str]] = []

    def stop(self, task: str, attempt: int, reason: str) -> None:
        self.backend.stop(self.containers[task], grace_s=0)
        self.stopped.append((task, attempt, reason))

    def escalate(self, finding: Finding) -> None:
        raise AssertionError(f"nothing should be escalated here: {finding}")


@pytest.fixture
def backend(docker_client: Any) -> Iterator[DockerBackend]:

    require_image(docker_client, "base")
    yield DockerBackend(docker_client)


def test_the_stop_action_stops_a_sandbox_stuck_in_a_command_loop(
    backend: DockerBackend, tmp_path: Path
) -> None:
    from sandbox.images import image_ref

    ws = tmp_path / "workspace"
    ws.mkdir()
    os.chown(ws, 10001, 10001)
    template = load_template("minimal")
    spec = container_spec(
        template,
        image=image_ref("base"),
        workspace_host_path=str(ws),
        labels=sandbox_labels(
            batch=IDENTITY.batch,
            task=IDENTITY.task,
            attempt=1,
            team=IDENTITY.team,
            owner="test-monitor-stop",
        ),
        name=sandbox_name(IDENTITY.batch, IDENTITY.task, 1, secrets.token_hex(3)),
        command=["sh", "-c", LOOP],
    )
    cid = backend.create(SandboxSpec(spec))
    data = load_policies().anomalies.model_dump()
    data["repeated_command"].update(action="stop", min_repeats=10)
    actions = StopContainer(backend, {"stop-test/looper": cid})
    monitor = MonitorCore(
        AnomalyPolicies.model_validate(data), actions=actions, background_actions=True
    )
    seen: list[Event] = []

    def sink(batch: list[Record]) -> None:
        events = [r for r in batch if isinstance(r, Event)]
        seen.extend(events)
        monitor.ingest(events)
        charges = [r for r in batch if not isinstance(r, Event)]
        if charges:
            monitor.ingest(charges, "charges")

    scheduler = AttemptEvents(IDENTITY.team, IDENTITY.batch, IDENTITY.task, node="node-x")
    monitor.ingest([scheduler.state(0, "queued"), scheduler.state(0, "running")])
    try:
        with ActivityCapture(cid, ws, IDENTITY, sink, interval=0.5):
            backend.start(cid)
            result = backend.wait(cid, timeout=120)  # returns once the rule has stopped it
    finally:
        monitor.close()
        backend.remove(cid)
    assert not result.timed_out, "the looping sandbox was not stopped by the rule"
    assert result.exit_code != 0
    (task, attempt, reason) = actions.stopped[0]
    assert (task, attempt) == ("stop-test/looper", 1) and "repeated_command" in reason
    finding = monitor.fleet()["findings"][0]
    assert (finding["rule"], finding["action"], finding["status"]) == (
        "repeated_command",
        "stop",
        "stop requested",
    )
    sleeps = [e for e in seen if e.kind == "command_started" and e.payload["argv"][0] == "sleep"]
    assert len(sleeps) >= 10
