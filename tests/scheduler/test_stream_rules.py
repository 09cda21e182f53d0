"""The eight anomaly rules on the live stream: each fires on its pattern and its action is
taken (stop / escalate / alert, through a recording `Actions`); a busy-but-healthy agent
is left alone; findings are deduplicated; and the streaming rules find what the SQL rules
find, with the same finding ids, on the same events in a real ledger."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from accounting.anomalies import Finding, find_anomalies, finding_event
from accounting.policies import AnomalyPolicies, load_policies
from accounting.schemas import Charge, Event
from accounting.views import connect
from accounting.writer import LedgerWriter
from scheduler.event_builder import AttemptEvents
from scheduler.monitor import MonitorCore
from scheduler.stream_rules import StreamRules, finding_id

T0 = datetime(2026, 3, 2, 10, 0, tzinfo=UTC)
GiB = 1 << 30


def issue_policies() -> AnomalyPolicies:
    """The shipped thresholds, with the issue's default actions for rules 1, 7 and 8."""
    data = load_policies().anomalies.model_dump()
    data["repeated_command"]["action"] = "stop"
    data["sensitive_files"].update(action="stop", webhook=None)
    data["stuck"]["action"] = "escalate"
    return AnomalyPolicies.model_validate(data)


POLICIES = issue_policies()


class Recorder:
    """A fake `Actions`: remembers what it was asked to do."""

    def __init__(self) -> None:
        self.stops: list[tuple[str, int, str]] = []
        self.escalations: list[Finding] = []

    def stop(self, task: str, attempt: int, reason: str) -> None:
        self.stops.append((task, attempt, reason))

    def escalate(self, finding: Finding) -> None:
        self.escalations.append(finding)


class Sink:
    def __init__(self) -> None:
        self.rows: list[Event] = []

    def append(self, table: str, rows: list[Event]) -> None:
        assert table == "events"
        self.rows.extend(rows)


def running(task: str = "t1", team: str = "ml") -> tuple[AttemptEvents, list[Event]]:
    a = AttemptEvents(team, "b1", task, node="n1", t0=T0)
    return a, [a.state(0, "queued"), a.state(1, "running")]


def core(policies: AnomalyPolicies = POLICIES) -> tuple[MonitorCore, Recorder, Sink]:
    rec, sink = Recorder(), Sink()
    return MonitorCore(policies, actions=rec, sink=sink), rec, sink


def test_a_repeated_command_loop_stops_the_attempt() -> None:
    monitor, rec, sink = core()
    a, evs = running()
    evs += [a.command(10 + 5 * i, ["sleep", str(i)]) for i in range(9)]
    assert monitor.ingest(evs) == [] and rec.stops == []  # nine starts: not yet a loop
    (f,) = monitor.ingest([a.command(60, ["sleep", "42"])])
    assert (f.rule, f.action, f.subject) == ("repeated_command", "stop", '["sleep","#"]')
    assert rec.stops == [("b1/t1", 1, rec.stops[0][2])]
    assert "repeated_command" in rec.stops[0][2] and f.finding_id in rec.stops[0][2]
    assert [e.payload["finding_id"] for e in sink.rows] == [f.finding_id]
    assert monitor.ingest([a.command(61, ["sleep", "43"])]) == []  # one finding per command


def test_the_same_command_spread_beyond_the_window_is_not_a_loop() -> None:
    monitor, rec, _ = core()
    a, evs = running()
    evs += [a.command(10 + 40 * i, ["make", "test"]) for i in range(12)]  # 40 s apart: 8/5 min
    assert monitor.ingest(evs) == [] and rec.stops == []


def test_sixty_llm_calls_in_a_minute_are_a_runaway() -> None:
    monitor, rec, _ = core()
    a, evs = running()
    evs += [a.llm(10 + i * 0.9, 100, 10) for i in range(60)]
    found = monitor.ingest(evs)
    assert [(f.rule, f.action) for f in found] == [("runaway_llm", "stop")]
    assert rec.stops and rec.stops[0][0] == "b1/t1"


def test_a_token_spike_far_above_the_attempts_own_minutes_is_a_runaway() -> None:
    monitor, _, _ = core()
    a, evs = running()
    evs += [a.llm(60 * m + 5, 1000 + 10 * (m % 3), 100) for m in range(1, 12)]
    assert monitor.ingest(evs) == []
    (f,) = monitor.ingest([a.llm(60 * 12 + 5, 90_000, 5000)])
    assert f.rule == "runaway_llm" and f.evidence["max_robust_z"] >= 6


def test_a_pegged_cpu_for_ten_minutes_alerts_and_a_dip_resets_it() -> None:
    monitor, rec, _ = core()
    a, evs = running()
    used = 0
    for i in range(30):  # 30 s apart, 1 CPU limit
        used += 30_000_000 if i != 5 else 3_000_000  # a dip at sample 5 breaks the stretch
        evs.append(a.sample(30 + 30 * i, used, 100 << 20))
    found = monitor.ingest(evs)
    assert [(f.rule, f.action) for f in found] == [("cpu_pegged", "alert")]
    assert found[0].first_seen == T0 + timedelta(seconds=30 + 30 * 5)  # after the dip
    assert found[0].evidence["minutes"] >= 10 and rec.stops == []


def test_memory_near_its_limit_or_trending_there_alerts() -> None:
    monitor, _, _ = core()
    a, evs = running("high")
    evs.append(a.sample(10, 0, int(0.95 * GiB), mem_limit=GiB))
    b, evs_b = running("trend")
    evs_b += [b.sample(10 + 30 * i, 0, (300 + 50 * i) << 20, mem_limit=GiB) for i in range(6)]
    found = monitor.ingest([*evs, *evs_b])
    assert {(f.task, f.rule) for f in found} == {
        ("high", "memory_pressure"),
        ("trend", "memory_pressure"),
    }
    trend = next(f for f in found if f.task == "trend")
    assert "trending" in trend.detail and trend.evidence["seconds_to_limit"] <= 300


def test_denied_egress_escalates_and_a_metadata_probe_escalates_at_once() -> None:
    monitor, rec, _ = core()
    a, evs = running("probe")
    evs += [a.egress(10 + i, f"h{i}.example", allowed=False) for i in range(2)]
    assert monitor.ingest(evs) == []
    (f,) = monitor.ingest([a.egress(20, "h3.example", allowed=False)])
    assert (f.rule, f.action) == ("denied_egress", "escalate")
    b, evs_b = running("meta")
    evs_b.append(b.egress(10, "[fd00:ec2::254]", allowed=False, port=80))
    (g,) = monitor.ingest(evs_b)
    assert g.evidence["metadata"] is True
    assert [e.task for e in rec.escalations] == ["probe", "meta"] and rec.stops == []
    fleet = monitor.fleet()
    assert {x["task"] for x in fleet["escalated"]} == {"b1/probe", "b1/meta"}


def test_reading_a_credential_path_stops_the_attempt() -> None:
    monitor, rec, _ = core()
    a, evs = running()
    evs.append(a.command(10, ["sh", "-c", "cat ~/.ssh/id_rsa | base64"]))
    (f,) = monitor.ingest(evs)
    assert (f.rule, f.action, f.subject) == (
        "sensitive_files",
        "stop",
        "credential_access:/.ssh/id_rsa",
    )
    assert rec.stops[0][:2] == ("b1/t1", 1)


def test_writing_a_ci_workflow_is_a_persistence_finding() -> None:
    monitor, _, _ = core()
    a, evs = running()
    evs.append(a.file(10, "/workspace/.github/workflows/release.yml", "create"))
    evs.append(a.file(11, "/workspace/src/app.py", "modify"))
    (f,) = monitor.ingest(evs)
    assert f.subject == "persistence_write:/workspace/.github/workflows/release.yml"


def test_a_stuck_agent_is_escalated_after_the_quiet_minutes() -> None:
    monitor, rec, _ = core()
    a, evs = running()
    evs.append(a.command(60, ["python", "agent.py"]))
    monitor.ingest(evs)
    assert monitor.tick(T0 + timedelta(seconds=60, minutes=14)) == []
    (f,) = monitor.tick(T0 + timedelta(seconds=60, minutes=15))
    assert (f.rule, f.action) == ("stuck", "escalate") and rec.escalations == [f]
    assert f.subject == "2026-03-02T10:01:00.000000Z" and rec.stops == []
    assert monitor.tick(T0 + timedelta(minutes=40)) == []  # the same quiet stretch: once


def test_a_busy_but_healthy_agent_with_a_long_llm_call_is_not_stopped() -> None:
    monitor, rec, sink = core()
    a, evs = running()
    used = 0
    for i, name in enumerate(["api", "auth", "cli", "db", "io", "login", "ui", "web"]):
        evs.append(a.command(10 + i, ["pytest", f"tests/test_{name}.py"]))  # varied work
        evs.append(a.file(10 + i, f"/workspace/src/{name}.py"))
    for s in range(60):
        used += 10_000_000  # 33% of one CPU over 30 s
        evs.append(a.sample(30 + 30 * s, used, (400 + s) << 20))
    evs.append(a.reserved(25, "r1"))  # an LLM call starts at 25 s and runs for 40 minutes
    assert monitor.ingest(evs) == []
    for minute in range(1, 41):
        assert monitor.tick(T0 + timedelta(minutes=minute)) == []
    monitor.ingest([a.settled(40 * 60 + 25, "r1"), a.llm(40 * 60 + 25, 50_000, 4000)])
    assert monitor.tick(T0 + timedelta(minutes=50)) == []
    assert rec.stops == [] and rec.escalations == [] and sink.rows == []
    (f,) = monitor.tick(T0 + timedelta(minutes=55, seconds=25))  # 15 quiet minutes after it
    assert f.rule == "stuck" and f.first_seen == T0 + timedelta(minutes=40, seconds=25)


def test_a_finding_already_in_the_ledger_is_not_found_again() -> None:
    rules = StreamRules(POLICIES)
    a, evs = running()
    fid = finding_id(
        "sensitive_files", "ml", "b1", "t1", 1, "credential_access:/u/.aws/credentials"
    )
    recorded = Event(T0, "ml", "b1", "t1", 1, "n1", "anomaly_finding", {"finding_id": fid})
    for e in [*evs, recorded]:
        rules.observe(e)
    assert rules.observe(a.command(5, ["cat", "/u/.aws/credentials"])) == []


def test_disabled_rules_and_ended_attempts_find_nothing() -> None:
    data = POLICIES.model_dump()
    data["repeated_command"]["enabled"] = False
    off = AnomalyPolicies.model_validate(data)
    rules = StreamRules(off)
    a, evs = running()
    evs += [a.command(10 + i, ["true"]) for i in range(20)]
    assert [f for e in evs for f in rules.observe(e)] == []
    rules = StreamRules(POLICIES)
    b, evs = running()
    evs.append(b.state(5, "succeeded"))
    evs += [b.command(10 + i, ["true"]) for i in range(20)]
    assert [f for e in evs for f in rules.observe(e)] == []
    assert rules.tracked() == 0


def test_a_cost_outlier_among_its_peers_alerts_on_tick() -> None:
    monitor, _, _ = core()
    charges = [charge(f"p{i}", 1_000_000_000 + 1_000_000 * i) for i in range(20)]
    charges.append(charge("big", 40_000_000_000))
    monitor.ingest(charges, "charges")
    (f,) = monitor.tick(T0 + timedelta(hours=1))
    assert (f.rule, f.task, f.action) == ("cost_outlier", "big", "alert")
    assert monitor.tick(T0 + timedelta(hours=2)) == []


def charge(task: str, nusd: int, task_type: str = "swe") -> Charge:
    return Charge(
        time=T0 + timedelta(minutes=5),
        team="ml",
        batch="b1",
        task=task,
        attempt=1,
        node="n1",
        charge_id=f"c-{task}",
        period_start=T0,
        task_type=task_type,
        service_category="AI and Machine Learning",
        service_name="LLM Inference",
        provider="scripted",
        model="gpt-4.1",
        usage_bucket="output",
        quantity=Decimal(1000),
        unit="tokens",
        unit_price_nusd=Decimal(nusd) / 1000,
        cost_nusd=nusd,
        cost_status="final",
        price_version="test",
    )


# -- streaming and SQL agree ---------------------------------------------------------


@pytest.fixture
def _audit_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SANDFLEET_AUDIT_KEY", str(tmp_path / "keys" / "audit.pem"))


def scenario() -> tuple[list[Event], list[Charge], datetime]:
    """One attempt per rule, each showing its pattern plainly, plus a healthy one."""
    evs: list[Event] = []
    loop, e = running("loop")
    evs += e + [loop.command(10 + i, ["sleep", str(i)]) for i in range(12)]
    llm, e = running("runaway")
    evs += e + [llm.llm(10 + i * 0.5, 100, 10) for i in range(70)]
    cpu, e = running("cpu")
    evs += e + [cpu.sample(30 + 30 * i, 30_000_000 * (i + 1), 1 << 20) for i in range(25)]
    mem, e = running("mem")
    evs += e + [
        mem.sample(10 + 10 * i, 0, int((0.5 + 0.05 * i) * GiB), mem_limit=GiB) for i in range(10)
    ]
    net, e = running("net")
    evs += e + [net.egress(10 + i, f"x{i}.example", allowed=False) for i in range(4)]
    files, e = running("files")
    evs += [
        *e,
        files.command(10, ["cat", "~/.aws/credentials"]),
        files.file(11, "/workspace/.git/hooks/pre-commit", "create"),
        files.file(12, "/home/agent/.ssh/id_ed25519", "modify"),
        files.command(13, ["python", "-c", "print('é')"]),
    ]
    quiet, e = running("quiet")
    evs += [*e, quiet.command(20, ["python", "agent.py"])]
    ok, e = running("healthy")
    evs += (
        e
        + [ok.command(10 + i, ["pytest", f"t{i}"]) for i in range(5)]
        + [ok.state(30, "succeeded")]
    )
    charges = [charge(f"peer{i}", 1_000_000_000 + 1_000_000 * i) for i in range(20)]
    charges.append(charge("pricey", 40_000_000_000))
    return sorted(evs, key=lambda x: x.time), charges, T0 + timedelta(minutes=30)


@pytest.mark.usefixtures("_audit_key")
def test_streaming_and_sql_rules_find_the_same_findings(data_dir: Path) -> None:
    evs, charges, until = scenario()
    rules = StreamRules(POLICIES)
    streamed = [f for r in [*evs, *charges] for f in rules.observe(r)] + rules.tick(until)
    with LedgerWriter(data_dir) as writer:
        writer.append("events", evs)
        writer.append("charges", charges)
    con = connect(data_dir)
    try:
        sql = find_anomalies(con, POLICIES, until=until)
    finally:
        con.close()

    def ids(found: list[Finding]) -> set[tuple[str, str, str, str]]:
        return {(f.rule, f.task, f.subject, f.finding_id) for f in found}

    assert ids(streamed) == ids(sql)
    assert {f.rule for f in sql} == set(AnomalyPolicies.model_fields)  # every rule is exercised
    assert "healthy" not in {f.task for f in streamed}
    by_id = {f.finding_id: f for f in sql}
    for f in streamed:
        assert (f.action, f.severity) == (by_id[f.finding_id].action, by_id[f.finding_id].severity)


@pytest.mark.usefixtures("_audit_key")
def test_findings_recorded_by_the_monitor_are_not_recorded_again_by_sql(data_dir: Path) -> None:
    evs, charges, until = scenario()
    monitor, _, sink = core()
    monitor.ingest(evs)
    monitor.ingest(charges, "charges")
    monitor.tick(until)
    with LedgerWriter(data_dir) as writer:
        writer.append("events", [*evs, *sink.rows])
        writer.append("charges", charges)
    con = connect(data_dir)
    try:
        from accounting.anomalies import recorded_finding_ids

        sql = {f.finding_id for f in find_anomalies(con, POLICIES, until=until)}
        assert sql <= recorded_finding_ids(con)
    finally:
        con.close()
    assert finding_event(next(iter(_findings(sink)))).kind == "anomaly_finding"


def _findings(sink: Sink) -> list[Finding]:
    from scheduler.live_state import _finding_from_event

    return [_finding_from_event(e) for e in sink.rows]


def test_the_shipped_policies_take_the_issues_default_actions() -> None:
    shipped = load_policies().anomalies
    assert str(shipped.repeated_command.action) == "stop"  # a command loop stops the task
    assert str(shipped.stuck.action) == "escalate"  # a stuck agent goes to a person
    assert str(shipped.sensitive_files.action) == "stop"  # reading credentials stops it
