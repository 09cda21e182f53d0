"""The eight anomaly rules on the live stream: events in, `Finding`s out (pure).

`StreamRules(policies.anomalies)` is fed every ledger record as it arrives
(`observe(record)`) and the clock (`tick(now)`, for the time-based rules: a stuck
attempt, and cost outliers, which are judged against peers in batches). Each returns the
NEW findings: the same `accounting.anomalies.Finding` records, with the same
`finding_id` (sha256 of rule, team, batch, task, attempt, subject) as the SQL rules in
`accounting.anomaly_rules`, so a finding is recorded once however it was found. A finding
already seen — emitted here, or read back as an `anomaly_finding` event — is never
emitted again: one per (rule, attempt) for most rules, one per command (1), per path (7)
and per quiet stretch (8).

Each finding carries its rule's configured `action` (configs/policies.yaml): `alert`,
`stop` or `escalate`; carrying it out is `scheduler.monitor`'s job, not this module's.

Where streaming differs from the SQL, on purpose:
- (8) stuck: an LLM call in flight counts as progress. The gateway reserves budget
  before each call and settles after: an open `budget_reserved` (payload `kind` "llm" or
  absent) of the attempt means a call is in flight, so a long LLM call is not stuck.
- (1), (2), (4), (5), (6) fire at the first event that meets the threshold, while the SQL
  judges the whole window afterwards; (5)'s trend is judged at every sample.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from accounting.anomalies import Finding
from accounting.policies import RULES, AnomalyPolicies, AnomalyRule, StuckRule
from accounting.schemas import Charge, Event, EventKind, TaskState, TaskSummary
from scheduler.state import TERMINAL_STATES
from scheduler.stream_checks import (
    CostOutlier,
    CpuPegged,
    DeniedEgress,
    Hit,
    Key,
    MemoryPressure,
    RepeatedCommand,
    RunawayLlm,
    SensitiveFiles,
    us,
)

__all__ = ["StreamRules", "finding_id", "stuck_subject"]

_PROGRESS = frozenset(
    {EventKind.COMMAND_STARTED, EventKind.COMMAND_FINISHED, EventKind.FILE_CHANGED,
     EventKind.LLM_CALL}
)  # fmt: skip
_TOKENS = ("input_uncached", "input_cache_read", "input_cache_write", "output", "reasoning")


def finding_id(rule: str, team: str, batch: str, task: str, attempt: int, subject: str) -> str:
    """The SQL rules' id: first 32 hex digits of sha256 of the fields joined by U+001F."""
    text = "\x1f".join((rule, team, batch, task, str(attempt), subject))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def stuck_subject(quiet_since: datetime) -> str:
    """Rule 8's subject: when the quiet stretch began, as the SQL's strftime writes it."""
    return quiet_since.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class _Progress:
    state: str = ""
    state_time: datetime | None = None
    last_progress: datetime | None = None
    in_flight: set[str] = field(default_factory=set)


class _Stuck:
    """(8) Running, with no command, file or LLM event (and no LLM call in flight) for
    idle_minutes; judged on `tick(now)`."""

    def __init__(self, rule: StuckRule) -> None:
        self.rule = rule
        self.state: dict[Key, _Progress] = {}

    def event(self, key: Key, kind: EventKind, t: datetime, p: dict[str, Any]) -> None:
        s = self.state.get(key)
        if kind is EventKind.TASK_STATE:
            s = s or self.state.setdefault(key, _Progress())
            if s.state_time is None or t >= s.state_time:
                s.state, s.state_time = str(p.get("state", "")), t
            return
        if s is None:
            return  # no state seen: the SQL needs one too
        if kind in _PROGRESS:
            s.last_progress = t if s.last_progress is None else max(s.last_progress, t)
        elif kind is EventKind.BUDGET_RESERVED and p.get("kind", "llm") == "llm":
            s.in_flight.add(str(p.get("reservation", "")))
        elif kind is EventKind.BUDGET_SETTLED:
            s.in_flight.discard(str(p.get("reservation", "")))

    def tick(self, now: datetime) -> list[tuple[Key, Hit]]:
        out = []
        idle_us = round(self.rule.idle_minutes * 60_000_000)
        for key, s in self.state.items():
            if s.state != TaskState.RUNNING.value or s.in_flight or s.state_time is None:
                continue
            quiet = s.state_time if s.last_progress is None else max(s.last_progress, s.state_time)
            if us(quiet) > us(now) - idle_us:
                continue
            minutes = (now - quiet).total_seconds() / 60
            out.append((key, Hit(
                stuck_subject(quiet), quiet, now,
                f"running with no command, file or LLM event for {minutes:.1f} minutes",
                {"quiet_since": quiet.isoformat(),
                 "last_progress": None if s.last_progress is None else s.last_progress.isoformat(),
                 "idle_minutes": round(minutes, 2)},
            )))  # fmt: skip
        return out

    def forget(self, key: Key) -> None:
        self.state.pop(key, None)


class StreamRules:
    """The enabled rules of `policies`, fed record by record (see the module doc)."""

    def __init__(self, policies: AnomalyPolicies, *, remember: int = 100_000) -> None:
        self.policies = policies
        self.remember = remember
        on = {name: getattr(policies, name) for name in RULES if getattr(policies, name).enabled}
        self.rules: dict[str, AnomalyRule] = on
        self.repeated = (
            RepeatedCommand(on["repeated_command"]) if "repeated_command" in on else None
        )
        self.runaway = RunawayLlm(on["runaway_llm"]) if "runaway_llm" in on else None
        self.cost = CostOutlier(on["cost_outlier"]) if "cost_outlier" in on else None
        self.cpu = CpuPegged(on["cpu_pegged"]) if "cpu_pegged" in on else None
        self.memory = MemoryPressure(on["memory_pressure"]) if "memory_pressure" in on else None
        self.egress = DeniedEgress(on["denied_egress"]) if "denied_egress" in on else None
        self.files = SensitiveFiles(on["sensitive_files"]) if "sensitive_files" in on else None
        self.stuck = _Stuck(on["stuck"]) if "stuck" in on else None
        self.seen: OrderedDict[str, None] = OrderedDict()
        self.ended: OrderedDict[Key, None] = OrderedDict()

    # -- feeding -------------------------------------------------------------------------

    def observe(self, record: Event | Charge | TaskSummary) -> list[Finding]:
        """Feed one ledger record; returns the findings it makes new."""
        if isinstance(record, Charge):
            if self.cost is not None:
                ckey = (record.team, record.batch, record.task, record.attempt)
                self.cost.charge(ckey, record.task_type, record.cost_nusd, record.period_start,
                                 record.time)  # fmt: skip
            return []
        if not isinstance(record, Event):
            return []
        ev, kind = record, EventKind(record.kind)
        key: Key = (ev.team, ev.batch, ev.task, ev.attempt)
        p = dict(ev.payload)
        if kind is EventKind.ANOMALY_FINDING:
            if p.get("finding_id"):
                self._remember(str(p["finding_id"]))
            return []
        if not ev.task or key in self.ended:
            return []
        if self.stuck is not None:
            self.stuck.event(key, kind, ev.time, p)
        if kind is EventKind.TASK_STATE:
            if TaskState(p["state"]) in TERMINAL_STATES:
                self._end(key)
            return []
        return [f for name, hit in self._check(key, kind, ev.time, p)
                if (f := self._finding(name, key, hit)) is not None]  # fmt: skip

    def _check(
        self, key: Key, kind: EventKind, t: datetime, p: dict[str, Any]
    ) -> list[tuple[str, Hit]]:
        hits: list[tuple[str, Hit | None]] = []
        if kind is EventKind.COMMAND_STARTED:
            if self.repeated is not None:
                hits.append(("repeated_command", self.repeated.started(key, t, p.get("argv"))))
            if self.files is not None:
                hits += [("sensitive_files", h) for h in self.files.command(t, p.get("argv"))]
        elif kind is EventKind.FILE_CHANGED and self.files is not None:
            hits += [("sensitive_files", h) for h in self.files.file(t, p)]
        elif kind is EventKind.LLM_CALL and self.runaway is not None:
            tokens = sum(int(p.get(b) or 0) for b in _TOKENS)
            hits.append(("runaway_llm", self.runaway.call(key, t, tokens)))
        elif kind is EventKind.RESOURCE_SAMPLE:
            if self.cpu is not None:
                hits.append(("cpu_pegged", self.cpu.sample(key, t, p)))
            if self.memory is not None:
                hits.append(("memory_pressure", self.memory.sample(key, t, p)))
        elif kind is EventKind.EGRESS_DECISION and self.egress is not None:
            hits.append(("denied_egress", self.egress.decision(key, t, p)))
        return [(name, h) for name, h in hits if h is not None]

    def tick(self, now: datetime) -> list[Finding]:
        """Judge the time-based rules at `now` (an aware datetime); returns new findings."""
        hits: list[tuple[str, Key, Hit]] = []
        if self.stuck is not None:
            hits += [("stuck", k, h) for k, h in self.stuck.tick(now)]
        if self.cost is not None:
            hits += [("cost_outlier", k, h) for k, h in self.cost.judge()]
        return [f for name, k, h in hits if (f := self._finding(name, k, h)) is not None]

    # -- bookkeeping ---------------------------------------------------------------------

    def _finding(self, name: str, key: Key, hit: Hit) -> Finding | None:
        team, batch, task, attempt = key
        fid = finding_id(name, team, batch, task, attempt, hit.subject)
        if fid in self.seen:
            return None
        self._remember(fid)
        rule = self.rules[name]
        return Finding(
            rule=name, severity=str(rule.severity), action=str(rule.action), team=team,
            batch=batch, task=task, attempt=attempt, first_seen=hit.first_seen,
            last_seen=hit.last_seen, subject=hit.subject, detail=hit.detail,
            evidence=hit.evidence, finding_id=fid,
        )  # fmt: skip

    def _remember(self, fid: str) -> None:
        self.seen[fid] = None
        while len(self.seen) > self.remember:
            self.seen.popitem(last=False)

    def _end(self, key: Key) -> None:
        """An attempt is over: drop its state (cost outliers keep theirs: they are peers)."""
        for check in (self.runaway, self.cpu, self.memory, self.egress, self.stuck):
            if check is not None:
                check.forget(key)
        if self.repeated is not None:
            self.repeated.state.pop(key, None)
        self.ended[key] = None
        while len(self.ended) > self.remember:
            self.ended.popitem(last=False)

    def tracked(self) -> int:
        """How many attempts some rule holds state for (a gauge of the rules' memory)."""
        keys: set[Any] = set()
        for check in (self.cpu, self.memory, self.egress, self.stuck, self.repeated):
            if check is not None:
                keys |= set(check.state)
        if self.runaway is not None:
            keys |= set(self.runaway.calls)
        return len(keys)
