"""The eight anomaly rules: each fires on a seeded pattern and stays silent on clean data;
each rule's SQL is built by a pure function; findings are recorded once."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import pytest

from accounting.anomalies import (
    Finding,
    anomalies_sql,
    find_anomalies,
    recorded_finding_ids,
    run_anomalies,
)
from accounting.anomaly_rules import FINDING_COLUMNS, RULE_SQL
from accounting.charging import TokenCounts, llm_call_charges, resource_charges
from accounting.errors import ConfigError
from accounting.policies import RULES, AnomalyPolicies, load_policies
from accounting.pricing import load_pricing
from accounting.schemas import Charge, Event, EventKind
from accounting.views import connect
from accounting.writer import LedgerWriter

PRICES = load_pricing()
POLICIES = load_policies().anomalies
T0 = datetime(2026, 3, 2, 10, 0, tzinfo=UTC)
UNTIL = T0 + timedelta(minutes=40)
LIMIT_MEM = 4 * 1024**3
LIMIT_CPU = 2000  # millicores


@pytest.fixture(autouse=True)
def _audit_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SANDFLEET_AUDIT_KEY", str(tmp_path / "keys" / "audit.pem"))


class Ledger:
    """Events and charges for a few attempts, written through the real LedgerWriter."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.charges: list[Charge] = []

    def ev(
        self, task: str, minutes: float, kind: EventKind, payload: dict, team: str = "ml"
    ) -> None:
        t = T0 + timedelta(minutes=minutes)
        self.events.append(Event(t, team, "batch1", task, 1, "node1", kind, payload))

    def state(self, task: str, minutes: float, state: str) -> None:
        self.ev(task, minutes, EventKind.TASK_STATE, {"state": state, "previous": "", "reason": ""})

    def command(self, task: str, minutes: float, argv: list[str]) -> None:
        self.ev(task, minutes, EventKind.COMMAND_STARTED, {"argv": argv, "pid": 7, "ppid": 1})

    def llm(self, task: str, minutes: float, tokens: TokenCounts, model: str = "gpt-4.1") -> None:
        self.ev(
            task,
            minutes,
            EventKind.LLM_CALL,
            {
                "model": model,
                "provider": "openai",
                "input_uncached": tokens.input_uncached,
                "input_cache_read": tokens.input_cache_read,
                "input_cache_write": 0,
                "output": tokens.output,
                "reasoning": tokens.reasoning,
                "cost_nusd": 0,
                "latency_ms": 900,
                "status": "ok",
                "stream": False,
            },
        )
        end = T0 + timedelta(minutes=minutes)
        self.charges += llm_call_charges(
            PRICES,
            tokens,
            call_id=f"{task}-{minutes}-{len(self.charges)}",
            model=model,
            provider="openai",
            time=end,
            period_start=end - timedelta(seconds=1),
            team="ml",
            batch="batch1",
            task=task,
            attempt=1,
            task_type="fix",
        )

    def sample(self, task: str, minutes: float, cpu_us: int, mem: int) -> None:
        self.ev(
            task,
            minutes,
            EventKind.RESOURCE_SAMPLE,
            {
                "cpu_usage_us": cpu_us,
                "cpu_limit_millicores": LIMIT_CPU,
                "memory_bytes": mem,
                "memory_limit_bytes": LIMIT_MEM,
                "pids": 12,
                "pids_limit": 256,
                "io_read_bytes": 0,
                "io_write_bytes": 0,
            },
        )

    def egress(self, task: str, minutes: float, host: str, allowed: bool) -> None:
        self.ev(
            task,
            minutes,
            EventKind.EGRESS_DECISION,
            {
                "host": host,
                "port": 443,
                "allowed": allowed,
                "reason": "allowlist",
                "bytes_up": 10,
                "bytes_down": 10,
            },
        )

    def file(self, task: str, minutes: float, path: str, op: str = "modify") -> None:
        self.ev(task, minutes, EventKind.FILE_CHANGED, {"path": path, "op": op, "bytes": 120})

    def normal_attempt(self, task: str, i: int, *, finished: bool = True) -> None:
        """A busy, ordinary attempt: 30 minutes of varied work at half its CPU limit."""
        self.state(task, 0, "running")
        for k in range(8):
            self.command(task, 1 + 3 * k, ["pytest", "-x", f"tests/test_{k}.py"])
            self.file(task, 2 + 3 * k, f"/workspace/src/mod_{k}.py")
        self.command(task, 26, ["git", "diff"])
        for k in range(20):
            tok = 900 + (i * 7 + k * 37) % 200
            self.llm(
                task,
                0.5 + k * 1.4,
                TokenCounts(input_uncached=tok, input_cache_read=2 * tok, output=tok // 4),
            )
        cpu = 0
        for k in range(61):  # every 30 s, 50 % of a 2-CPU limit, memory ~40 % and flat
            self.sample(task, k / 2, cpu, int(LIMIT_MEM * (0.40 + 0.01 * (k % 2))))
            cpu += 30_000_000
        self.charges += resource_charges(
            PRICES,
            {"cpu": 1800, "memory": 3600},
            time=T0 + timedelta(minutes=30),
            period_start=T0,
            team="ml",
            batch="batch1",
            task=task,
            attempt=1,
            task_type="fix",
        )
        self.egress(task, 3, "pypi.org", True)
        self.egress(task, 4, "git.internal.invalid", True)
        self.egress(task, 5, "evil.example", False)  # one refusal is not a pattern
        if finished:
            self.state(task, 30, "succeeded")

    def write(self, data_dir: Path) -> None:
        with LedgerWriter(data_dir) as w:
            w.append("events", self.events)
            if self.charges:
                w.append("charges", self.charges)


def clean() -> Ledger:
    led = Ledger()
    for i in range(24):
        led.normal_attempt(f"clean{i}", i)
    led.normal_attempt("clean-live", 99, finished=False)  # still running, and busy:
    for k in range(10):
        led.command("clean-live", 31 + k, ["make", "check"])  # progress up to UNTIL
    return led


def _find(data_dir: Path, rules: AnomalyPolicies = POLICIES) -> list[Finding]:
    return find_anomalies(connect(data_dir), rules, T0, UNTIL)


def test_clean_data_raises_no_finding(data_dir: Path) -> None:
    clean().write(data_dir)
    assert _find(data_dir) == []


def _seed_repeated(led: Ledger) -> None:
    led.state("seed", 0, "running")
    for k in range(12):
        led.command("seed", 10 + k * 0.3, ["npm", "test", "--", f"--seed={k}"])
    led.state("seed", 20, "failed")


def _seed_runaway_rate(led: Ledger) -> None:
    led.state("seed", 0, "running")
    for k in range(80):
        led.llm("seed", 10 + k * 0.01, TokenCounts(input_uncached=50, output=5))
    led.state("seed", 20, "failed")


def _seed_runaway_spike(led: Ledger) -> None:
    led.state("seed", 0, "running")
    for k in range(15):  # one modest call a minute, then one enormous minute
        led.llm("seed", 1 + k, TokenCounts(input_uncached=1000 + 10 * k, output=100))
    led.llm("seed", 17, TokenCounts(input_uncached=400_000, output=30_000))
    led.state("seed", 20, "succeeded")


def _seed_cost_outlier(led: Ledger) -> None:
    led.state("seed", 0, "running")
    for k in range(20):  # same shape as its peers, but on a 30x dearer model with huge output
        led.llm(
            "seed", 1 + k, TokenCounts(input_uncached=20_000, output=8_000), model="claude-opus-4"
        )
    led.state("seed", 25, "succeeded")


def _seed_cpu(led: Ledger) -> None:
    led.state("seed", 0, "running")
    cpu = 0
    for k in range(30):  # every 30 s at 99 % of the 2-CPU limit, for 14.5 minutes
        led.sample("seed", 5 + k / 2, cpu, LIMIT_MEM // 4)
        cpu += int(30_000_000 * 2 * 0.99)
    led.command("seed", 6, ["python", "spin.py"])
    led.state("seed", 25, "timed_out")


def _seed_memory_high(led: Ledger) -> None:
    led.state("seed", 0, "running")
    for k, frac in enumerate([0.5, 0.6, 0.8, 0.95, 0.7]):
        led.sample("seed", 5 + k, 10_000_000 * k, int(LIMIT_MEM * frac))
    led.state("seed", 20, "oom")


def _seed_memory_trend(led: Ledger) -> None:
    led.state("seed", 0, "running")
    for k in range(11):  # 50 % -> 80 % in 5 minutes: the limit is ~3 minutes away
        led.sample("seed", 5 + k / 2, 10_000_000 * k, int(LIMIT_MEM * (0.50 + 0.03 * k)))
    led.state("seed", 20, "succeeded")


def _seed_denied(led: Ledger) -> None:
    led.state("seed", 0, "running")
    for k, host in enumerate(["a.example", "b.example", "c.example", "a.example"]):
        led.egress("seed", 5 + 2 * k, host, False)
    led.state("seed", 20, "succeeded")


def _seed_metadata(led: Ledger) -> None:
    led.state("seed", 0, "running")
    led.egress("seed", 5, "metadata.google.internal", False)
    led.state("seed", 20, "succeeded")


def _seed_file(path: str, op: str = "modify") -> Callable[[Ledger], None]:
    def seed(led: Ledger) -> None:
        led.state("seed", 0, "running")
        led.file("seed", 5, path, op)
        led.state("seed", 20, "succeeded")

    return seed


def _seed_credential_command(led: Ledger) -> None:
    led.state("seed", 0, "running")
    led.command("seed", 5, ["sh", "-c", "cat ~/.ssh/id_ed25519 | base64"])
    led.state("seed", 20, "succeeded")


def _seed_stuck(led: Ledger) -> None:
    led.state("seed", 0, "running")
    led.command("seed", 1, ["python", "-c", "input()"])  # then nothing, for 39 minutes


SEEDS = [
    ("repeated_command", _seed_repeated, "started 12 times"),
    ("runaway_llm", _seed_runaway_rate, "80 LLM calls"),
    ("runaway_llm", _seed_runaway_spike, "robust z"),
    ("cost_outlier", _seed_cost_outlier, "fix attempts"),
    ("cpu_pegged", _seed_cpu, "% of its 2.0-CPU limit"),
    ("memory_pressure", _seed_memory_high, "reached 95.0% of its limit"),
    ("memory_pressure", _seed_memory_trend, "trending to its limit"),
    ("denied_egress", _seed_denied, "4 egress connections refused"),
    ("denied_egress", _seed_metadata, "metadata address"),
    ("sensitive_files", _seed_file("/workspace/.git/hooks/pre-commit"), "persistence write"),
    ("sensitive_files", _seed_file("/workspace/.github/workflows/ci.yml", "create"), "persistence"),
    ("sensitive_files", _seed_file("/workspace/.gitlab-ci.yml"), "persistence write"),
    ("sensitive_files", _seed_file("/home/agent/.bashrc"), "persistence write"),
    ("sensitive_files", _seed_file("/home/agent/.aws/credentials", "create"), "credential access"),
    ("sensitive_files", _seed_credential_command, "credential access: /.ssh/id_ed25519"),
    ("stuck", _seed_stuck, "no command, file or LLM event for 39.0 minutes"),
]


@pytest.mark.parametrize(
    ("rule", "seed", "detail"), SEEDS, ids=[f"{r}-{s.__name__}" for r, s, _ in SEEDS]
)
def test_each_rule_fires_on_its_seeded_pattern_and_only_for_that_attempt(
    data_dir: Path, rule: str, seed: Callable[[Ledger], None], detail: str
) -> None:
    led = clean()
    seed(led)
    led.write(data_dir)
    findings = _find(data_dir)
    assert {f.task for f in findings} == {"seed"}, [(f.rule, f.task, f.detail) for f in findings]
    mine = [f for f in findings if f.rule == rule]
    assert mine, [(f.rule, f.detail) for f in findings]
    f = mine[0]
    assert detail in f.detail
    rule_cfg = getattr(POLICIES, rule)
    assert (f.severity, f.action) == (rule_cfg.severity.value, rule_cfg.action.value)
    assert (f.team, f.batch, f.attempt) == ("ml", "batch1", 1)
    assert isinstance(f.evidence, dict) and f.evidence
    assert len(f.finding_id) == 32


def test_a_rule_that_is_disabled_stays_silent(data_dir: Path) -> None:
    led = clean()
    _seed_repeated(led)
    led.write(data_dir)
    off = POLICIES.model_copy(
        update={"repeated_command": POLICIES.repeated_command.model_copy(update={"enabled": False})}
    )
    assert _find(data_dir, off) == []


def test_thresholds_come_from_the_policies(data_dir: Path) -> None:
    led = clean()
    _seed_repeated(led)  # 12 starts in a window
    led.write(data_dir)
    stricter = POLICIES.model_copy(
        update={
            "repeated_command": POLICIES.repeated_command.model_copy(update={"min_repeats": 13})
        }
    )
    assert _find(data_dir, stricter) == []


def test_numbers_are_only_ignored_when_normalizing(data_dir: Path) -> None:
    led = clean()
    _seed_repeated(led)  # each start has a different --seed=N
    led.write(data_dir)
    literal = POLICIES.model_copy(
        update={
            "repeated_command": POLICIES.repeated_command.model_copy(
                update={"normalize_numbers": False}
            )
        }
    )
    assert _find(data_dir, literal) == []


def test_cost_outliers_need_enough_peers(data_dir: Path) -> None:
    led = clean()
    _seed_cost_outlier(led)  # 26 attempts of type fix, including the seed
    led.write(data_dir)
    picky = POLICIES.model_copy(
        update={"cost_outlier": POLICIES.cost_outlier.model_copy(update={"min_peers": 27})}
    )
    assert _find(data_dir, picky) == []


@pytest.mark.parametrize("rule", RULES)
def test_each_rules_sql_is_built_by_a_pure_function_without_data(rule: str) -> None:
    cfg = getattr(POLICIES, rule)
    sql = RULE_SQL[rule](cfg, T0, UNTIL)
    assert sql == RULE_SQL[rule](cfg, T0, UNTIL)  # deterministic
    (statement,) = duckdb.extract_statements(sql)
    assert statement.type == duckdb.StatementType.SELECT
    assert f"'{rule}' AS rule" in sql
    # the thresholds are in the SQL: changing one changes the text
    field = next(
        n for n in type(cfg).model_fields if n not in {"enabled", "action", "severity", "webhook"}
    )
    value = getattr(cfg, field)
    changed = cfg.model_copy(
        update={
            field: (not value)
            if isinstance(value, bool)
            else (value + 1 if not isinstance(value, list) else [*value, "x"])
        }
    )
    assert RULE_SQL[rule](changed, T0, UNTIL) != sql


@pytest.mark.parametrize("rule", RULES)
def test_each_rules_sql_runs_on_an_empty_ledger_with_the_finding_columns(
    data_dir: Path, rule: str
) -> None:
    cur = connect(data_dir).execute(RULE_SQL[rule](getattr(POLICIES, rule), None, None))
    assert cur.fetchall() == []
    assert tuple(d[0] for d in cur.description) == FINDING_COLUMNS


def test_all_rules_union_into_one_query_and_unknown_rules_are_refused() -> None:
    sql = anomalies_sql(POLICIES, T0, UNTIL)
    assert sql is not None and len(duckdb.extract_statements(sql)) == 1
    assert all(f"'{rule}' AS rule" in sql for rule in RULES)
    only = anomalies_sql(POLICIES, rules=["stuck"])
    assert only is not None and "'stuck' AS rule" in only and "'cpu_pegged' AS rule" not in only
    with pytest.raises(ConfigError, match="rule 'loops' is unknown; use one of: repeated_command"):
        anomalies_sql(POLICIES, rules=["loops"])


def test_findings_are_recorded_once_as_anomaly_finding_events(data_dir: Path) -> None:
    led = clean()
    _seed_stuck(led)
    led.file("other", 5, "/workspace/.git/hooks/post-checkout", "create")
    led.write(data_dir)

    found, new = run_anomalies(str(data_dir), POLICIES, T0, UNTIL)
    assert {f.rule for f in found} == {"stuck", "sensitive_files"}
    assert {f.finding_id for f in new} == {f.finding_id for f in found}
    con = connect(data_dir)
    rows = con.execute(
        "SELECT task, json_extract_string(payload, '$.rule'), "
        "json_extract_string(payload, '$.action'), json_extract_string(payload, '$.finding_id') "
        "FROM events WHERE kind = 'anomaly_finding'"
    ).fetchall()
    assert sorted(r[1] for r in rows) == ["sensitive_files", "stuck"]
    assert {r[3] for r in rows} == recorded_finding_ids(con)

    again, new_again = run_anomalies(str(data_dir), POLICIES, T0, UNTIL)
    assert {f.finding_id for f in again} == {f.finding_id for f in found}
    assert new_again == []
    n = connect(data_dir).execute("SELECT count(*) FROM events WHERE kind = 'anomaly_finding'")
    assert n.fetchone() == (2,)


def test_a_new_stuck_stretch_is_a_new_finding(data_dir: Path) -> None:
    led = clean()
    _seed_stuck(led)
    led.write(data_dir)
    _, first = run_anomalies(str(data_dir), POLICIES, T0, UNTIL, rules=["stuck"])
    more = Ledger()
    more.command("seed", 45, ["python", "retry.py"])  # progress, then quiet again
    more.write(data_dir)
    later = UNTIL + timedelta(minutes=30)
    _, second = run_anomalies(str(data_dir), POLICIES, T0, later, rules=["stuck"])
    second = [f for f in second if f.task == "seed"]  # (clean-live went quiet too by then)
    assert len(first) == 1 and len(second) == 1
    assert first[0].finding_id != second[0].finding_id
    assert second[0].first_seen == T0 + timedelta(minutes=45)
