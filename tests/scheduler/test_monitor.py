"""The Monitor's core: rows in any ledger form, actions carried out (a webhook on loopback
receives an escalation), failures shown rather than lost, a ledger replayed for post-hoc
viewing without acting, and the `sandfleet dashboard` / `sandfleet top` commands."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from click.testing import CliRunner

from accounting.errors import ConfigError, SchemaError
from accounting.policies import AnomalyPolicies, load_policies
from accounting.schemas import DATA_SCHEMAS
from accounting.validation import to_table
from accounting.writer import LedgerWriter
from scheduler.dashboard import DashboardServer
from scheduler.event_builder import AttemptEvents
from scheduler.monitor import MonitorCore, RuleActions, to_records
from scheduler.monitor_cli import COMMANDS, dashboard, top

T0 = datetime(2026, 3, 2, 10, 0, tzinfo=UTC)


def wait(cond: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


class Hook:
    """A webhook receiver of this test's own, on loopback."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self.port = 0
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    async def _post(self, request: web.Request) -> web.Response:
        self.received.append(await request.json())
        return web.Response(text="ok")

    def _run(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        app = web.Application()
        app.router.add_post("/hook", self._post)
        runner = web.AppRunner(app)
        loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self._stop = asyncio.Event()
        self._ready.set()
        loop.run_until_complete(self._stop.wait())
        loop.run_until_complete(runner.cleanup())
        loop.close()

    def __enter__(self) -> Hook:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def with_webhook(url: str) -> AnomalyPolicies:
    data = load_policies().anomalies.model_dump()
    data["denied_egress"].update(action="escalate", webhook=url)
    return AnomalyPolicies.model_validate(data)


def probe(task: str = "t1") -> list[Any]:
    a = AttemptEvents("ml", "b1", task, t0=T0)
    return [a.state(0, "running"), *[a.egress(1 + i, f"h{i}.example", False) for i in range(3)]]


def test_an_escalation_is_posted_to_the_rules_webhook() -> None:
    with Hook() as hook:
        policies = with_webhook(f"http://127.0.0.1:{hook.port}/hook")
        core = MonitorCore(
            policies, actions=RuleActions.from_policies(policies, None), background_actions=True
        )
        try:
            (f,) = core.ingest(probe())
            wait(lambda: len(hook.received) == 1, "the webhook to be called")
            wait(lambda: core.fleet()["findings"][0]["status"] == "escalated", "the status")
        finally:
            core.close()
    body = hook.received[0]
    assert (body["rule"], body["finding_id"], body["task_key"]) == (
        "denied_egress",
        f.finding_id,
        "b1/t1",
    )
    assert core.fleet()["escalated"][0]["finding_id"] == f.finding_id


def test_a_webhook_that_does_not_answer_is_shown_as_failed_not_lost() -> None:
    policies = with_webhook(f"http://127.0.0.1:{free_port()}/hook")  # nothing listens there
    core = MonitorCore(policies, actions=RuleActions.from_policies(policies, None))
    (_f,) = core.ingest(probe())
    status = core.fleet()["findings"][0]["status"]
    assert status.startswith("escalate failed") and "did not take finding" in status


def test_a_stop_with_no_scheduler_wired_is_shown_as_failed() -> None:
    data = load_policies().anomalies.model_dump()
    data["sensitive_files"].update(action="stop", webhook=None)
    policies = AnomalyPolicies.model_validate(data)
    core = MonitorCore(policies, actions=RuleActions.from_policies(policies, None))
    a = AttemptEvents("ml", "b1", "t1", t0=T0)
    core.ingest([a.state(0, "running"), a.command(1, ["cat", "/etc/shadow"])])
    assert "no scheduler to ask" in core.fleet()["findings"][0]["status"]
    bare = MonitorCore(policies)  # no Actions at all: recorded and shown, never acted on
    bare.ingest([a.state(0, "running"), a.command(1, ["cat", "/etc/shadow"])])
    assert bare.fleet()["findings"][0]["status"] == "stop: no actions wired"


def test_records_mappings_and_arrow_tables_are_read_alike() -> None:
    a = AttemptEvents("ml", "b1", "t1", t0=T0)
    evs = [a.state(0, "running"), a.command(1, ["make", "-j4"]), a.llm(2, 10, 1)]
    table = to_table("events", evs)
    assert table.schema == DATA_SCHEMAS["events"]
    mappings = [{**r, "chain_id": "c", "event_seq": i} for i, r in enumerate(table.to_pylist())]
    for rows in (evs, table, mappings):
        recs = to_records("events", rows)
        assert [r.payload for r in recs] == [e.payload for e in evs]
    with pytest.raises(SchemaError, match="unknown table"):
        to_records("nope", evs)
    with pytest.raises(SchemaError):
        to_records("events", [{"time": T0}])


class Recorder:
    def __init__(self) -> None:
        self.calls: list[Any] = []

    def stop(self, task: str, attempt: int, reason: str) -> None:
        self.calls.append(("stop", task))

    def escalate(self, finding: Any) -> None:
        self.calls.append(("escalate", finding.rule))


@pytest.fixture
def ledger(data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A real ledger: a running loop, a quiet attempt, a finished one."""
    monkeypatch.setenv("SANDFLEET_AUDIT_KEY", str(tmp_path / "keys" / "audit.pem"))
    loop = AttemptEvents("ml", "b1", "loop", t0=T0)
    quiet = AttemptEvents("ml", "b1", "quiet", t0=T0)
    done = AttemptEvents("data", "b2", "done", t0=T0)
    evs = [
        loop.submitted(0, 2),
        loop.state(0, "queued"),
        loop.state(1, "running"),
        *[loop.command(2 + i, ["sleep", str(i)]) for i in range(12)],
        quiet.state(0, "queued"),
        quiet.state(1, "running"),
        quiet.command(2, ["agent"]),
        done.state(0, "queued"),
        done.state(1, "running"),
        done.llm(2, 100, 10, 7_000_000),
        done.state(3, "succeeded"),
        # the clock goes on: one late event 20 minutes on, so the replay judges "stuck"
        loop.sample(20 * 60, 0, 1 << 20),
    ]
    with LedgerWriter(data_dir) as w:
        w.append("events", evs)
    return data_dir


def test_a_replayed_ledger_shows_its_fleet_and_findings_without_acting(ledger: Path) -> None:
    rec = Recorder()
    core = MonitorCore(actions=rec)
    rows = core.replay(str(ledger))
    fleet = core.fleet()
    assert rows == 23 and rec.calls == []
    assert fleet["states"] == {"running": 2, "succeeded": 1}
    assert fleet["spend"]["by_team"] == {"data": "0.007000"}
    found = {(f["rule"], f["task"], f["status"]) for f in fleet["findings"]}
    assert found == {
        ("repeated_command", "b1/loop", "replayed"),
        ("stuck", "b1/loop", "replayed"),  # a resource sample is not progress
        ("stuck", "b1/quiet", "replayed"),
    }


def test_sandfleet_top_prints_a_frame_of_a_ledger_or_a_running_monitor(ledger: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(top, ["--data-dir", str(ledger)], catch_exceptions=False)
    assert result.exit_code == 0
    assert "b1/quiet" in result.output and "sandfleet top" in result.output
    core = MonitorCore()
    core.replay(str(ledger))
    with DashboardServer(core, "127.0.0.1", 0) as server:
        result = runner.invoke(top, ["--url", server.url, "--once"], catch_exceptions=False)
    assert (
        result.exit_code == 0 and "b1/loop" in result.output and "repeated_command" in result.output
    )


def test_sandfleet_dashboard_prints_the_url_or_says_how_to_get_one(ledger: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(
        dashboard, ["--data-dir", str(ledger), "--port", "0", "--no-wait"], catch_exceptions=False
    )
    assert result.exit_code == 0 and result.output.startswith("http://127.0.0.1:")
    url = f"http://127.0.0.1:{free_port()}/"
    result = runner.invoke(dashboard, ["--url", url])
    assert isinstance(result.exception, ConfigError)
    assert "--data-dir" in str(result.exception)
    assert {c.name for c in COMMANDS} == {"dashboard", "top"}
    assert all(c.help for c in COMMANDS)


def test_ticks_after_the_quiet_minutes_find_a_stuck_attempt_once() -> None:
    core = MonitorCore()
    a = AttemptEvents("ml", "b1", "t1", t0=T0)
    core.ingest([a.state(0, "running"), a.command(1, ["agent"])])
    found = [core.tick(T0 + timedelta(minutes=m)) for m in range(0, 40, 5)]
    assert [len(x) for x in found] == [0, 0, 0, 0, 1, 0, 0, 0]
