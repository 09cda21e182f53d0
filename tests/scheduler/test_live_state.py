"""The fleet's live state from a synthetic event stream: counts by team and state, queue
depth, active sandboxes with their current command, bounded rings of detail, spend by
team and model, gates, findings, batches and tasks — with bounded memory."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

from accounting.schemas import Charge, TaskSummary
from scheduler.event_builder import AttemptEvents
from scheduler.live_state import LiveLimits, LiveState

T0 = datetime(2026, 3, 2, 10, 0, tzinfo=UTC)


def fold(state: LiveState, *records: object) -> LiveState:
    for r in records:
        state.apply(r)  # type: ignore[arg-type]
    return state


def test_tasks_are_counted_by_team_and_state_as_they_move() -> None:
    s = LiveState()
    a = AttemptEvents("ml", "b1", "t1", t0=T0)
    b = AttemptEvents("ml", "b1", "t2", t0=T0)
    c = AttemptEvents("data", "b2", "t1", t0=T0)
    fold(s, a.state(0, "queued"), b.state(0, "queued"), c.state(0, "queued"))
    assert s.queue_depth() == 3 and s.queue_depth("ml") == 2
    fold(s, a.state(1, "running"), c.state(1, "running"), c.state(9, "succeeded"))
    fleet = s.fleet()
    assert fleet["teams"] == {"data": {"succeeded": 1}, "ml": {"queued": 1, "running": 1}}
    assert fleet["states"] == {"queued": 1, "running": 1, "succeeded": 1}
    assert [x["task"] for x in fleet["active"]] == ["b1/t1"]
    assert fleet["queue_depth"] == 1


def test_the_current_command_is_the_latest_one_still_running() -> None:
    s = LiveState()
    a = AttemptEvents("ml", "b1", "t1", t0=T0)
    fold(s, a.state(0, "queued"), a.state(1, "running"))
    fold(s, a.command(2, ["sh", "-c", "agent"], pid=10), a.command(3, ["pytest", "-q"], pid=11))
    assert s.fleet()["active"][0]["command"] == ["pytest", "-q"]
    fold(s, a.finished(4, ["pytest", "-q"], pid=11, exit=1, took_ms=812.5))
    brief = s.fleet()["active"][0]
    assert (brief["command"], brief["command_running"]) == (["sh", "-c", "agent"], True)
    fold(s, a.finished(5, ["sh", "-c", "agent"], pid=10))
    brief = s.fleet()["active"][0]  # nothing runs: the last command started is shown
    assert (brief["command"], brief["command_running"]) == (["pytest", "-q"], False)
    cmds = s.task("b1/t1")["attempts"][0]["commands"]
    assert [(c["argv"][0], c["exit"], c["duration_ms"]) for c in cmds] == [
        ("sh", 0, 5.0),
        ("pytest", 1, 812.5),
    ]


def test_detail_rings_are_bounded_and_counts_are_not() -> None:
    limits = LiveLimits(commands=20, files=10, samples=5, llm_calls=3)
    s = LiveState(limits)
    a = AttemptEvents("ml", "b1", "t1", t0=T0)
    fold(s, a.state(0, "queued"), a.state(1, "running"))
    for i in range(500):
        fold(
            s,
            a.command(2 + i, ["step", str(i)]),
            a.file(2 + i, f"/workspace/f{i}"),
            a.sample(2 + i, i * 100_000, 1 << 20),
            a.llm(2 + i, 10, 1),
        )
    d = s.task("t1")["attempts"][0]
    assert (len(d["commands"]), len(d["files"]), len(d["samples"]), len(d["llm_calls"])) == (
        20,
        10,
        5,
        3,
    )
    assert d["commands"][-1]["argv"] == ["step", "499"]
    assert s.fleet()["active"][0]["commands"] == 500 and d["llm"]["calls"] == 500
    assert len(s.active[("b1/t1", 1)].current) <= 64


def test_finished_attempts_keep_their_detail_in_a_bounded_lru() -> None:
    s = LiveState(LiveLimits(finished_attempts=3))
    for i in range(6):
        a = AttemptEvents("ml", "b1", f"t{i}", t0=T0)
        fold(
            s,
            a.state(0, "queued"),
            a.state(1, "running"),
            a.command(2, ["make"]),
            a.state(3, "failed", outcome="failed", exit_code=2),
        )
    assert len(s.finished) == 3 and not s.active
    assert s.task("b1/t5")["attempts"][0]["outcome"] == {"outcome": "failed", "exit_code": 2}
    assert s.task("b1/t0")["attempts"] == []  # forgotten detail, state still known
    assert s.task("b1/t0")["state"] == "failed"
    late = AttemptEvents("ml", "b1", "t0", t0=T0).command(9, ["late"])
    fold(s, late)
    assert not s.active  # a late event of a finished, forgotten attempt is dropped


def test_a_retry_retires_the_lost_attempt_and_shows_the_new_one() -> None:
    s = LiveState()
    a1 = AttemptEvents("ml", "b1", "t1", attempt=1, node="n1", t0=T0)
    a2 = AttemptEvents("ml", "b1", "t1", attempt=2, node="n2", t0=T0)
    fold(s, a1.state(0, "queued"), a1.state(1, "running"), a1.command(2, ["agent"]))
    fold(s, a2.state(30, "queued", reason="node lost"), a2.state(31, "running"))
    fleet = s.fleet()
    assert [(x["task"], x["attempt"], x["node"]) for x in fleet["active"]] == [("b1/t1", 2, "n2")]
    assert [x["attempt"] for x in s.task("t1")["attempts"]] == [2, 1]
    assert fleet["states"] == {"running": 1}


def test_llm_spend_and_tokens_add_up_exactly_by_team_and_model() -> None:
    s = LiveState()
    a = AttemptEvents("ml", "b1", "t1", t0=T0)
    b = AttemptEvents("data", "b2", "t9", t0=T0)
    fold(s, a.state(0, "running"), b.state(0, "running"))
    for i in range(1000):
        fold(s, a.llm(i, 100, 10, cost_nusd=1_234_567, model="gpt-4.1"))
    fold(
        s, b.llm(1, 50, 5, cost_nusd=7, model="claude"), b.llm(2, 0, 0, cost_nusd=0, status="error")
    )
    spend = s.fleet()["spend"]
    assert spend["by_team"] == {"data": "0.000000", "ml": "1.234567"}
    assert spend["by_model"] == {"claude": "0.000000", "gpt-4.1": "1.234567"}
    assert s.totals.llm_nusd[("ml", "gpt-4.1")] == 1_234_567_000
    assert s.totals.tokens[("ml", "gpt-4.1", "input_uncached")] == 100_000
    assert s.totals.tokens[("ml", "gpt-4.1", "output")] == 10_000
    assert s.totals.llm_calls[("data", "gpt-4.1", "error")] == 1
    assert s.fleet()["active"][0]["spend"] in {"1.234567", "0.000007"}


def test_compute_charges_count_towards_spend_but_llm_charges_are_not_counted_twice() -> None:
    s = LiveState()
    a = AttemptEvents("ml", "b1", "t1", t0=T0)
    fold(s, a.state(0, "running"), a.llm(1, 10, 1, cost_nusd=500))
    for category, cost in (("Compute", 2_999_500), ("AI and Machine Learning", 500)):
        fold(
            s,
            Charge(
                T0,
                "ml",
                "b1",
                "t1",
                1,
                "n1",
                f"c-{category}",
                T0,
                "swe",
                category,
                "x",
                "p",
                "",
                "cpu" if category == "Compute" else "output",
                Decimal(1),
                "core-seconds" if category == "Compute" else "tokens",
                Decimal(cost),
                cost,
                "final",
                "v1",
            ),
        )
    assert s.fleet()["spend"]["by_team"] == {"ml": "0.003000"}  # the LLM charge is not added
    assert s.totals.charges_nusd == {
        ("ml", "Compute"): 2_999_500,
        ("ml", "AI and Machine Learning"): 500,
    }
    assert s.task("t1")["attempts"][0]["spend"] == "0.003000"


def test_resource_samples_become_a_cpu_share_of_the_limit_and_provisioning_latency() -> None:
    s = LiveState()
    a = AttemptEvents("ml", "b1", "t1", t0=T0)
    fold(s, a.state(0, "queued"), a.state(10, "running"))
    fold(
        s,
        a.sample(12.5, 0, 1 << 20, cpu_limit_mc=2000),
        a.sample(14.5, 3_000_000, 2 << 20, cpu_limit_mc=2000),
    )
    samples = s.task("t1")["attempts"][0]["samples"]
    assert [x["cpu_pct"] for x in samples] == [None, 75.0]
    assert s.totals.provisioning.n == 1 and s.totals.provisioning.total == 2.5


def test_gates_findings_and_egress_show_on_the_task() -> None:
    from scheduler.monitor import MonitorCore

    core = MonitorCore()
    a = AttemptEvents("ml", "b1", "t1", t0=T0)
    core.ingest(
        [
            a.state(0, "running"),
            a.gate(5, "tests", True),
            a.gate(6, "secret-scan", False, "AWS key in src/x.py"),
            a.egress(7, "metadata.google.internal", False, 80),
            a.egress(8, "pypi.org", True),
        ]
    )
    d = core.task("t1")["attempts"][0]
    assert [(g["gate"], g["passed"]) for g in d["gates"]] == [
        ("tests", True),
        ("secret-scan", False),
    ]
    assert d["egress"] == {"denied": 1, "allowed": 1}
    assert [f["rule"] for f in d["findings"]] == ["denied_egress"]
    assert core.fleet()["active"][0]["gates"] == {"passed": 1, "failed": 1}


def test_a_batch_view_has_its_templates_counts_and_tasks() -> None:
    s = LiveState()
    a = AttemptEvents("ml", "nightly-1", "t1", t0=T0)
    fold(s, a.submitted(0, 3, template="python-3.12"))
    for i in range(3):
        t = AttemptEvents("ml", "nightly-1", f"t{i}", t0=T0)
        fold(s, t.state(1, "queued"))
    fold(s, a.state(2, "running"), AttemptEvents("ml", "nightly-1", "t0", t0=T0).state(9, "failed"))
    b = s.batch("nightly-1")
    assert (b["name"], b["total"], b["states"]) == (
        "nightly-1",
        3,
        {"failed": 1, "queued": 1, "running": 1},
    )
    assert [t["state"] for t in b["tasks"]] == ["running", "failed", "queued"]
    assert b["tasks"][0]["template"] == "python-3.12"
    assert s.batch("nope") is None


def test_a_bare_task_id_names_a_task_only_when_it_is_unique() -> None:
    s = LiveState()
    fold(
        s,
        AttemptEvents("ml", "b1", "fix", t0=T0).state(0, "queued"),
        AttemptEvents("ml", "b2", "fix", t0=T0).state(0, "queued"),
        AttemptEvents("ml", "b2", "only", t0=T0).state(0, "queued"),
    )
    assert s.resolve("only") == "b2/only"
    assert s.resolve("fix") is None and s.task("fix") is None
    assert s.task("b1/fix")["batch"] == "b1"


def test_a_task_summary_adds_its_outcome_to_the_attempt() -> None:
    s = LiveState()
    a = AttemptEvents("ml", "b1", "t1", t0=T0)
    fold(s, a.state(0, "running"), a.state(5, "succeeded"))
    fold(
        s,
        TaskSummary(
            T0 + timedelta(seconds=5),
            "ml",
            "b1",
            "t1",
            1,
            "n1",
            "swe",
            "minimal",
            "succeeded",
            0,
            False,
            False,
            T0,
            5000,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            3,
            10,
            2,
            "abc",
        ),
    )
    out = s.task("t1")["attempts"][0]["outcome"]
    assert (out["outcome"], out["files_changed"], out["lines_added"]) == ("succeeded", 3, 10)
