"""End to end: a real hardened sandbox that reads a credential file — a canary in its
HOME, or a real readable file in its root — is seen by activity capture, streamed into
the Monitor under the default policy, and stopped by the sensitive_files rule; the
scheduler's book ends the task `stopped_by_rule`."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from accounting.anomalies import Finding
from accounting.policies import Policies, load_policies
from accounting.schemas import Event, TaskState
from sandbox.activity import ActivityCapture, CaptureIdentity, Record
from sandbox.attempt import AttemptHooks, AttemptOutcome, run_attempt_in_sandbox
from sandbox.docker_backend import DockerBackend
from sandbox.templates import load_template
from scheduler.book import FleetBook
from scheduler.event_builder import AttemptEvents
from scheduler.monitor import MonitorCore
from scheduler.plan import Backend, plan_batch
from scheduler.queue import Capacity, FleetQueue
from scheduler.spec import parse_batch
from scheduler.state import judge_result, next_step, queue_policies

pytestmark = pytest.mark.docker

POLICIES = {
    "defaults": {"weight": 1, "max_sandboxes": 2, "max_cpus": 8, "max_memory": "8g",
                 "daily_usd": None, "monthly_usd": None},
}  # fmt: skip
# One long-lived command (no repeated execs for the loop rule), naming no path in argv.
READER = """import os, time
path = open("/workspace/target").read().strip().replace("~", os.environ["HOME"])
end = time.monotonic() + 60
while time.monotonic() < end:
    with open(path) as f:
        f.read()
    time.sleep(0.2)
"""


class StopThroughTheBook:
    """The Monitor's `Actions`: the book ends the attempt, the container is stopped."""

    def __init__(self, book: FleetBook, backend: DockerBackend) -> None:
        self.book, self.backend = book, backend
        self.container: str | None = None
        self.reasons: list[str] = []

    def stop(self, task: str, attempt: int, reason: str) -> None:
        self.reasons.append(reason)
        self.book.cancel(task, outcome=TaskState.STOPPED_BY_RULE, reason=reason, attempt=attempt)
        assert self.container is not None
        self.backend.stop(self.container, grace_s=0)

    def escalate(self, finding: Finding) -> None:
        raise AssertionError(f"nothing should be escalated here: {finding}")


@pytest.fixture
def backend(docker_client: Any, base_image: str) -> Iterator[DockerBackend]:
    yield DockerBackend(docker_client)


@pytest.mark.parametrize(
    ("target", "seen_as"),
    [("~/.ssh/id_ed25519", "/tmp/.ssh/id_ed25519"), ("/etc/sudoers", "/etc/sudoers")],
    ids=["canary", "real-file-in-the-root"],
)
def test_a_sandbox_reading_a_credential_file_is_stopped_by_rule(
    backend: DockerBackend, base_image: str, data_dir: Path, tmp_path: Path, target: str,
    seen_as: str,
) -> None:  # fmt: skip
    given = tmp_path / "given"
    given.mkdir()
    (given / "reader.py").write_text(READER)
    (given / "target").write_text(target)
    sudoers = tmp_path / "sudoers"  # a real file in the sandbox's root, readable by the agent
    sudoers.write_text("root ALL=(ALL:ALL) ALL\n")
    sudoers.chmod(0o644)

    teams, default = queue_policies(Policies.model_validate(POLICIES))
    book = FleetBook(FleetQueue(teams, default), node="head")
    spec = parse_batch({"name": "reads", "team": "ml", "defaults": {"template": "minimal"},
                        "tasks": [{"id": "reader", "repo": ".", "command": "true"}]},
                       source=tmp_path / "reads.yaml")  # fmt: skip
    plan = plan_batch(spec, backend=Backend.FAKE, policies=Policies.model_validate(POLICIES))
    book.register(plan, {"reader": 1}, {})
    (attempt,) = book.admit(Capacity(slots=1))

    actions = StopThroughTheBook(book, backend)
    monitor = MonitorCore(load_policies().anomalies, actions=actions, background_actions=True)
    identity = CaptureIdentity("ml", plan.batch_id, "reader", 1, "node-x")
    seen: list[Event] = []
    lock = threading.Lock()

    def sink(batch: list[Record]) -> None:
        events = [r for r in batch if isinstance(r, Event)]
        with lock:
            seen.extend(events)
        monitor.ingest(events)

    scheduler = AttemptEvents("ml", plan.batch_id, "reader", node="node-x")
    monitor.ingest([scheduler.state(0, "queued"), scheduler.state(0, "running")])
    captures: list[ActivityCapture] = []

    def created(cid: str, ws: Path) -> None:
        actions.container = cid
        captures.append(ActivityCapture(cid, ws, identity, sink, interval=0.5))
        captures[0].start()

    def finished(cid: str) -> dict[str, Any]:
        captures[0].stop()
        return {}

    hooks = AttemptHooks(volumes={str(sudoers): {"bind": "/etc/sudoers"}},
                         on_created=created, on_finished=finished)  # fmt: skip
    try:
        result = run_attempt_in_sandbox(
            backend, load_template("minimal"), data_dir=data_dir, image=base_image,
            batch=plan.batch_id, task="reader", team="ml", workspace_dir=given,
            command=["python3", "/workspace/reader.py"], hooks=hooks, timeout_s=120,
        )  # fmt: skip
    finally:
        monitor.close()
    assert result.outcome is AttemptOutcome.FAILED and result.exit_code != 0, result
    assert result.duration_s < 60, "the reader ran to its end: it was not stopped"
    reads = [e.payload for e in seen if e.kind == "file_changed" and e.payload["op"] == "read"]
    assert [p["path"] for p in reads] == [seen_as]
    (finding,) = monitor.fleet()["findings"]
    assert (finding["rule"], finding["action"], finding["status"]) == (
        "sensitive_files",
        "stop",
        "stop requested",
    )
    assert seen_as in finding["detail"] and "file read" in finding["detail"]
    step = next_step(judge_result({"outcome": result.outcome.value}), 1, 3)
    book.finish(attempt, {"outcome": result.outcome.value, "exit_code": result.exit_code}, step)
    states = [e.payload for table, rows in book.take_rows() if table == "events" for e in rows]
    assert states[-1]["state"] == "stopped_by_rule"
    assert states[-1]["reason"].startswith("stopped by rule sensitive_files: credential access")
    assert not (data_dir / "workspaces" / plan.batch_id).exists()
