"""The fleet's live state, folded from the ledger's event stream (pure: no Ray, no I/O).

`LiveState.apply(record)` takes one `Event`, `Charge` or `TaskSummary` (see
`accounting.schemas`) and updates:

- every task's latest state (counts by team and state, queue depth) and its batch;
- the attempts that are running (`AttemptView`): node, template, current command, and
  bounded rings of commands, file changes, resource samples, LLM calls, gate results and
  findings; finished attempts keep their detail in a bounded LRU;
- cumulative counters for the metrics (tokens, spend, egress decisions, findings,
  provisioning latency), kept as exact integers (money in nano-USD).

Memory is bounded by `LiveLimits`, except one small entry per task (its state, team and
batch), which the counts need. Snapshots (`fleet`, `batch`, `task`) are plain JSON data.
"""

from __future__ import annotations

from collections import Counter, OrderedDict, deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from accounting.schemas import Charge, Event, EventKind, TaskState, TaskSummary
from scheduler.live_views import AttemptView, BatchView, Buckets, attempt_brief, iso, usd
from scheduler.state import TERMINAL_STATES

__all__ = ["PROVISIONING_BUCKETS_S", "LiveLimits", "LiveState", "task_key"]

PROVISIONING_BUCKETS_S = (0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
"""Upper bounds (seconds) of the provisioning-latency histogram."""

_ACTIVITY = frozenset(
    {EventKind.COMMAND_STARTED, EventKind.FILE_CHANGED, EventKind.RESOURCE_SAMPLE}
)
TOKEN_BUCKETS = ("input_uncached", "input_cache_read", "input_cache_write", "output", "reasoning")


def task_key(batch: str, task: str) -> str:
    """How the fleet names a task: `batch/task` (task ids are unique within a batch)."""
    return f"{batch}/{task}"


@dataclass(frozen=True)
class LiveLimits:
    """How much detail the live state keeps (everything beyond is forgotten, oldest first)."""

    commands: int = 300  # per attempt
    files: int = 300  # per attempt
    samples: int = 600  # per attempt: 10 minutes at one sample a second
    llm_calls: int = 200  # per attempt
    gates: int = 50  # per attempt
    findings: int = 500  # fleet-wide recent findings
    finished_attempts: int = 2000  # finished attempts whose detail stays viewable
    batch_tasks_shown: int = 500  # rows in a batch snapshot


@dataclass(slots=True)
class _Task:
    team: str
    batch: str
    state: TaskState
    attempt: int


@dataclass
class Totals:
    """Cumulative counters (never decrease): what the Prometheus counters expose."""

    tokens: Counter[tuple[str, str, str]] = field(default_factory=Counter)  # team, model, bucket
    llm_nusd: Counter[tuple[str, str]] = field(default_factory=Counter)  # team, model
    llm_calls: Counter[tuple[str, str, str]] = field(default_factory=Counter)  # +status
    charges_nusd: Counter[tuple[str, str]] = field(default_factory=Counter)  # team, category
    egress: Counter[tuple[str, str]] = field(default_factory=Counter)  # team, decision
    findings: Counter[tuple[str, str]] = field(default_factory=Counter)  # rule, action
    events: Counter[str] = field(default_factory=Counter)  # kind
    provisioning: Buckets = field(default_factory=lambda: Buckets(PROVISIONING_BUCKETS_S))


class LiveState:
    """The fleet as the event stream tells it (see the module doc). Not thread-safe."""

    def __init__(self, limits: LiveLimits | None = None) -> None:
        self.limits = limits or LiveLimits()
        self.tasks: dict[str, _Task] = {}
        self.by_task_id: dict[str, set[str]] = {}
        self.counts: Counter[tuple[str, TaskState]] = Counter()
        self.batches: dict[str, BatchView] = {}
        self.active: dict[tuple[str, int], AttemptView] = {}
        self.finished: OrderedDict[tuple[str, int], AttemptView] = OrderedDict()
        self.findings: deque[dict[str, Any]] = deque(maxlen=self.limits.findings)
        self.finding_ids: dict[str, dict[str, Any]] = {}
        self.totals = Totals()
        self.last_event: datetime | None = None

    # -- folding records in ------------------------------------------------------------

    def apply(self, record: Event | Charge | TaskSummary) -> None:
        """Fold one ledger record into the state."""
        if isinstance(record, Event):
            self._event(record)
        elif isinstance(record, Charge):
            self._charge(record)
        elif isinstance(record, TaskSummary):
            self._summary(record)
        else:
            raise TypeError(f"LiveState.apply takes Event, Charge or TaskSummary, not {record!r}")

    def _event(self, ev: Event) -> None:
        kind = EventKind(ev.kind)
        p = ev.payload
        self.totals.events[kind.value] += 1
        if self.last_event is None or ev.time > self.last_event:
            self.last_event = ev.time
        if kind is EventKind.BATCH_SUBMITTED:
            self._batch(ev.batch, ev.team).submitted(ev.time, p)
            return
        if kind is EventKind.TASK_STATE:
            self._state(ev, TaskState(p["state"]))
            return
        if kind is EventKind.ANOMALY_FINDING:
            self.add_finding(_finding_from_event(ev), "recorded")
            return
        if not ev.task:
            return
        view = self._attempt(ev)
        if view is None:
            return
        if kind in _ACTIVITY and view.first_activity is None:
            view.first_activity = ev.time
            if view.started is not None:
                secs = (ev.time - view.started).total_seconds()
                self.totals.provisioning.observe(max(secs, 0.0))
        if kind is EventKind.LLM_CALL:
            self._llm(ev, view)
        elif kind is EventKind.EGRESS_DECISION:
            decision = "allowed" if p.get("allowed") else "denied"
            self.totals.egress[(ev.team, decision)] += 1
            view.egress(ev.time, p, decision)
        else:
            view.apply(kind, ev.time, p)

    def _llm(self, ev: Event, view: AttemptView) -> None:
        p = ev.payload
        model = str(p.get("model", ""))
        for bucket in TOKEN_BUCKETS:
            n = int(p.get(bucket) or 0)
            if n:
                self.totals.tokens[(ev.team, model, bucket)] += n
        cost = int(p.get("cost_nusd") or 0)
        self.totals.llm_nusd[(ev.team, model)] += cost
        self.totals.llm_calls[(ev.team, model, str(p.get("status", "")))] += 1
        view.llm(ev.time, p)
        self._batch(ev.batch, ev.team).spend_nusd += cost

    def _charge(self, c: Charge) -> None:
        category = str(getattr(c.service_category, "value", c.service_category))
        cost = c.cost_nusd or 0
        self.totals.charges_nusd[(c.team, category)] += cost
        if category != "AI and Machine Learning":  # LLM spend is counted from llm_call events
            view = self._lookup(task_key(c.batch, c.task), c.attempt)
            if view is not None:
                view.other_nusd += cost
            if c.batch:
                self._batch(c.batch, c.team).spend_nusd += cost

    def _summary(self, s: TaskSummary) -> None:
        view = self._lookup(task_key(s.batch, s.task), s.attempt)
        if view is not None:
            view.summarize(s)

    def _batch(self, batch: str, team: str) -> BatchView:
        view = self.batches.get(batch)
        if view is None:
            view = self.batches[batch] = BatchView(batch, team)
        return view

    def _state(self, ev: Event, state: TaskState) -> None:
        key = task_key(ev.batch, ev.task)
        entry = self.tasks.get(key)
        batch = self._batch(ev.batch, ev.team)
        if entry is None:
            entry = self.tasks[key] = _Task(ev.team, ev.batch, state, ev.attempt)
            self.by_task_id.setdefault(ev.task, set()).add(key)
            batch.tasks[key] = None
        else:
            self.counts[(entry.team, entry.state)] -= 1
            batch.counts[entry.state] -= 1
        entry.state, entry.attempt = state, ev.attempt
        for older in range(1, ev.attempt):  # an earlier attempt still shown as running: lost
            self._retire(key, older)
        self.counts[(entry.team, state)] += 1
        batch.counts[state] += 1
        if state is TaskState.RUNNING:
            view = self._attempt(ev)
            if view is not None:
                view.node = ev.node or view.node
                view.started = view.started or ev.time
                view.template = view.template or batch.template_of(ev.task)
        view = self._lookup(key, ev.attempt)
        if view is not None:
            view.state = state
            view.reason = str(ev.payload.get("reason", ""))
            if state in TERMINAL_STATES:
                view.finish(ev.time, ev.payload)
        if state in TERMINAL_STATES or state is TaskState.QUEUED:
            self._retire(key, ev.attempt)

    def _attempt(self, ev: Event) -> AttemptView | None:
        """The view of an event's attempt; a running one is made on first sight."""
        key = task_key(ev.batch, ev.task)
        view = self._lookup(key, ev.attempt)
        if view is None:
            entry = self.tasks.get(key)
            if entry is not None and (entry.state in TERMINAL_STATES or entry.attempt > ev.attempt):
                return None  # a late event of an attempt already over and forgotten
            view = AttemptView(ev.team, ev.batch, ev.task, ev.attempt, ev.node, self.limits)
            view.seen = ev.time
            view.template = self._batch(ev.batch, ev.team).template_of(ev.task)
            self.active[(key, ev.attempt)] = view
        return view

    def _lookup(self, key: str, attempt: int) -> AttemptView | None:
        return self.active.get((key, attempt)) or self.finished.get((key, attempt))

    def _retire(self, key: str, attempt: int) -> None:
        view = self.active.pop((key, attempt), None)
        if view is None:
            return
        view.current.clear()
        self.finished[(key, attempt)] = view
        while len(self.finished) > self.limits.finished_attempts:
            self.finished.popitem(last=False)

    # -- findings --------------------------------------------------------------------

    def add_finding(self, finding: Any, status: str) -> bool:
        """Record a finding (an `accounting.anomalies.Finding`); False if already known."""
        fid = finding.finding_id
        if fid in self.finding_ids:
            return False
        row = {
            "finding_id": fid,
            "rule": finding.rule,
            "severity": finding.severity,
            "action": finding.action,
            "task": task_key(finding.batch, finding.task),
            "team": finding.team,
            "batch": finding.batch,
            "attempt": finding.attempt,
            "time": iso(finding.last_seen),
            "detail": finding.detail,
            "status": status,
        }
        self.findings.append(row)
        self.finding_ids[fid] = row
        while len(self.finding_ids) > 4 * self.limits.findings:
            self.finding_ids.pop(next(iter(self.finding_ids)))
        self.totals.findings[(finding.rule, finding.action)] += 1
        view = self._lookup(row["task"], finding.attempt)
        if view is not None:
            view.findings.append(row)
        return True

    def mark_finding(self, finding_id: str, status: str) -> None:
        """Note what became of a finding's action (`stopped`, `escalated`, `failed: ...`)."""
        row = self.finding_ids.get(finding_id)
        if row is not None:
            row["status"] = status

    # -- snapshots (plain JSON data) -----------------------------------------------------

    def queue_depth(self, team: str | None = None) -> int:
        return sum(
            n
            for (t, s), n in self.counts.items()
            if s is TaskState.QUEUED and (team is None or t == team)
        )

    def fleet(self) -> dict[str, Any]:
        """The fleet overview: tasks by team and state, active sandboxes, spend, findings."""
        teams: dict[str, dict[str, int]] = {}
        for (team, state), n in sorted(self.counts.items()):
            if n:
                teams.setdefault(team, {})[state.value] = n
        spend_team: Counter[str] = Counter()
        spend_model: Counter[str] = Counter()
        for (team, model), n in self.totals.llm_nusd.items():
            spend_team[team] += n
            spend_model[model] += n
        for (team, category), n in self.totals.charges_nusd.items():
            if category != "AI and Machine Learning":
                spend_team[team] += n
        active = sorted(self.active.values(), key=lambda v: (v.started or v.seen, v.task))
        return {
            "now": iso(self.last_event),
            "states": {s.value: n for s, n in _by_state(self.counts).items() if n},
            "teams": teams,
            "queue_depth": self.queue_depth(),
            "active": [attempt_brief(v) for v in active],
            "spend": {
                "total": usd(sum(spend_team.values())),
                "by_team": {t: usd(n) for t, n in sorted(spend_team.items())},
                "by_model": {m: usd(n) for m, n in sorted(spend_model.items())},
            },
            "findings": list(reversed(self.findings))[:100],
            "escalated": [f for f in reversed(self.findings) if f["action"] == "escalate"][:50],
            "batches": [b.brief() for b in sorted(self.batches.values(), key=lambda b: b.order)],
            "egress": {d: n for (_, d), n in sorted(self.totals.egress.items())},
        }

    def batch(self, batch_id: str) -> dict[str, Any] | None:
        view = self.batches.get(batch_id)
        if view is None:
            return None
        keys = list(view.tasks)
        rows = []
        for key in keys:
            entry = self.tasks[key]
            a = self._lookup(key, entry.attempt)
            rows.append(
                {
                    "task": key,
                    "state": entry.state.value,
                    "attempt": entry.attempt,
                    **({} if a is None else attempt_brief(a)),
                }
            )
        order = {TaskState.RUNNING.value: 0, TaskState.QUEUED.value: 2}
        rows.sort(key=lambda r: order.get(r["state"], 1))
        return {
            **view.brief(),
            "tasks": rows[: self.limits.batch_tasks_shown],
            "tasks_total": len(rows),
            "findings": [f for f in reversed(self.findings) if f["batch"] == batch_id][:100],
        }

    def resolve(self, ref: str) -> str | None:
        """A task key from `batch/task`, or from a bare task id when it names one task."""
        if ref in self.tasks:
            return ref
        keys = self.by_task_id.get(ref, set())
        if len(keys) == 1:
            return next(iter(keys))
        hits = [k for (k, _a) in (*self.active, *self.finished) if k.rsplit("/", 1)[-1] == ref]
        return hits[0] if len(set(hits)) == 1 else (ref if "/" in ref and hits else None)

    def task(self, ref: str) -> dict[str, Any] | None:
        """One task: its state and every attempt still held, newest first, with detail."""
        key = self.resolve(ref)
        views = [v for (k, _a), v in (*self.active.items(), *self.finished.items()) if k == key]
        entry = self.tasks.get(key) if key else None
        if key is None or (entry is None and not views):
            return None
        views.sort(key=lambda v: v.attempt, reverse=True)
        return {
            "task": key,
            "team": entry.team if entry else views[0].team,
            "batch": entry.batch if entry else views[0].batch,
            "state": (entry.state if entry else views[0].state).value,
            "attempt": entry.attempt if entry else views[0].attempt,
            "attempts": [v.detail() for v in views],
        }


def _by_state(counts: Mapping[tuple[str, TaskState], int]) -> Counter[TaskState]:
    out: Counter[TaskState] = Counter()
    for (_team, state), n in counts.items():
        out[state] += n
    return out


def _finding_from_event(ev: Event) -> Any:
    """An `anomaly_finding` event read back as a Finding (for the live view only)."""
    from accounting.anomalies import Finding

    p = ev.payload
    first = p.get("first_seen")
    return Finding(
        rule=str(p.get("rule", "")),
        severity=str(p.get("severity", "")),
        action=str(p.get("action", "")),
        team=ev.team,
        batch=ev.batch,
        task=ev.task,
        attempt=ev.attempt,
        first_seen=datetime.fromisoformat(first) if isinstance(first, str) else ev.time,
        last_seen=ev.time,
        subject=str(p.get("subject", "")),
        detail=str(p.get("detail", "")),
        evidence=dict(p.get("evidence") or {}),
        finding_id=str(p.get("finding_id") or f"event:{ev.task}:{ev.time.isoformat()}"),
    )
