"""The live state's per-attempt and per-batch views, with bounded rings (pure).

`AttemptView` holds what one attempt is doing: its current command, and the latest
commands, file changes, resource samples, LLM calls, gate results and findings, each in
a ring of the size `LiveLimits` says. `BatchView` holds a batch's counts and spend.
Everything a snapshot returns is plain JSON data (times as ISO 8601, money as USD text).
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter, OrderedDict, deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from accounting.schemas import EventKind, TaskState, TaskSummary

if TYPE_CHECKING:
    from scheduler.live_state import LiveLimits

__all__ = ["AttemptView", "BatchView", "Buckets", "attempt_brief", "iso", "usd"]

_MAX_RUNNING_CMDS = 64
_USD = Decimal("0.000001")


def iso(t: datetime | None) -> str | None:
    return None if t is None else t.isoformat()


def usd(nusd: int) -> str:
    """Integer nano-USD as USD text with 6 decimals (exact: no float on the way)."""
    return str((Decimal(nusd) / 1_000_000_000).quantize(_USD))


def _ms(t: datetime) -> int:
    return int(t.timestamp() * 1000)


@dataclass
class Buckets:
    """A cumulative histogram: counts per upper bound, plus sum and count."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    n: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.bounds)

    def observe(self, x: float) -> None:
        i = bisect_left(self.bounds, x)
        if i < len(self.counts):
            self.counts[i] += 1
        self.total += x
        self.n += 1

    def cumulative(self) -> list[tuple[float, int]]:
        out, acc = [], 0
        for bound, c in zip(self.bounds, self.counts, strict=True):
            acc += c
            out.append((bound, acc))
        return out


class AttemptView:
    """One attempt as the stream tells it; rings keep the latest items only."""

    def __init__(
        self, team: str, batch: str, task: str, attempt: int, node: str, limits: LiveLimits
    ) -> None:
        self.team, self.batch, self.task, self.attempt, self.node = team, batch, task, attempt, node
        self.key = f"{batch}/{task}"
        self.template = ""
        self.state = TaskState.RUNNING
        self.reason = ""
        self.started: datetime | None = None
        self.ended: datetime | None = None
        self.seen: datetime | None = None
        self.first_activity: datetime | None = None
        self.outcome: dict[str, Any] = {}
        self.current: OrderedDict[int, dict[str, Any]] = OrderedDict()
        self.commands: deque[dict[str, Any]] = deque(maxlen=limits.commands)
        self.files: deque[dict[str, Any]] = deque(maxlen=limits.files)
        self.samples: deque[dict[str, Any]] = deque(maxlen=limits.samples)
        self.llm_calls: deque[dict[str, Any]] = deque(maxlen=limits.llm_calls)
        self.gates: deque[dict[str, Any]] = deque(maxlen=limits.gates)
        self.findings: deque[dict[str, Any]] = deque(maxlen=50)
        self.denied_hosts: deque[str] = deque(maxlen=20)
        self.egress_counts: Counter[str] = Counter()
        self.llm_totals: Counter[str] = Counter()
        self.llm_nusd = 0
        self.other_nusd = 0
        self.in_flight: set[str] = set()
        self.command_count = 0
        self.file_count = 0
        self._prev_cpu: tuple[datetime, int] | None = None

    # -- folding -------------------------------------------------------------------------

    def apply(self, kind: EventKind, t: datetime, p: Mapping[str, Any]) -> None:
        self.seen = self.seen or t
        if kind is EventKind.COMMAND_STARTED:
            self._started(t, p)
        elif kind is EventKind.COMMAND_FINISHED:
            self._finished(t, p)
        elif kind is EventKind.FILE_CHANGED:
            self.file_count += 1
            self.files.append(
                {"time": iso(t), "path": p.get("path"), "op": p.get("op"),
                 "bytes": p.get("bytes"), "from": p.get("from")}
            )  # fmt: skip
        elif kind is EventKind.RESOURCE_SAMPLE:
            self._sample(t, p)
        elif kind is EventKind.GATE_RESULT:
            self.gates.append(
                {"time": iso(t), "gate": p.get("gate"), "passed": bool(p.get("passed")),
                 "detail": p.get("detail", "")}
            )  # fmt: skip
        elif kind is EventKind.BUDGET_RESERVED and p.get("kind", "llm") == "llm":
            self.in_flight.add(str(p.get("reservation", "")))
        elif kind is EventKind.BUDGET_SETTLED:
            self.in_flight.discard(str(p.get("reservation", "")))

    def _started(self, t: datetime, p: Mapping[str, Any]) -> None:
        self.command_count += 1
        entry = {"time": iso(t), "argv": list(p.get("argv") or []), "pid": p.get("pid"),
                 "exit": None, "duration_ms": None, "running": True}  # fmt: skip
        self.commands.append(entry)
        self.current[int(p.get("pid") or 0)] = entry
        while len(self.current) > _MAX_RUNNING_CMDS:
            self.current.popitem(last=False)

    def _finished(self, t: datetime, p: Mapping[str, Any]) -> None:
        entry = self.current.pop(int(p.get("pid") or 0), None)
        if entry is None:  # its start was not seen (or already forgotten)
            self.command_count += 1
            entry = {"time": iso(t), "argv": list(p.get("argv") or []), "pid": p.get("pid")}
            self.commands.append(entry)
        entry.update(exit=p.get("exit"), duration_ms=p.get("duration_ms"), running=False)

    def _sample(self, t: datetime, p: Mapping[str, Any]) -> None:
        used = int(p.get("cpu_usage_us") or 0)
        limit = int(p.get("cpu_limit_millicores") or 0)
        pct = None
        if self._prev_cpu is not None:
            pt, pu = self._prev_cpu
            dt_us = (t - pt).total_seconds() * 1e6
            if dt_us > 0:
                cores = limit / 1000 if limit > 0 else 1.0
                pct = round(100.0 * (used - pu) / dt_us / cores, 1)
        self._prev_cpu = (t, used)
        self.samples.append(
            {"t": _ms(t), "cpu_pct": pct, "mem": p.get("memory_bytes"),
             "mem_limit": p.get("memory_limit_bytes"), "pids": p.get("pids")}
        )  # fmt: skip

    def llm(self, t: datetime, p: Mapping[str, Any]) -> None:
        self.seen = self.seen or t
        tokens_in = sum(int(p.get(k) or 0) for k in ("input_uncached", "input_cache_read",
                                                      "input_cache_write"))  # fmt: skip
        tokens_out = int(p.get("output") or 0) + int(p.get("reasoning") or 0)
        cost = int(p.get("cost_nusd") or 0)
        self.llm_totals["calls"] += 1
        self.llm_totals["tokens_in"] += tokens_in
        self.llm_totals["tokens_out"] += tokens_out
        self.llm_nusd += cost
        self.llm_calls.append(
            {"time": iso(t), "model": p.get("model"), "tokens_in": tokens_in,
             "tokens_out": tokens_out, "cost": usd(cost), "latency_ms": p.get("latency_ms"),
             "status": p.get("status")}
        )  # fmt: skip

    def egress(self, t: datetime, p: Mapping[str, Any], decision: str) -> None:
        self.seen = self.seen or t
        self.egress_counts[decision] += 1
        if decision == "denied":
            self.denied_hosts.append(f"{p.get('host')}:{p.get('port')}")

    def finish(self, t: datetime, p: Mapping[str, Any]) -> None:
        self.ended = t
        self.outcome = {k: p[k] for k in ("outcome", "exit_code") if k in p}
        self.in_flight.clear()
        for entry in self.current.values():
            entry["running"] = False

    def summarize(self, s: TaskSummary) -> None:
        self.outcome.update(
            outcome=str(getattr(s.outcome, "value", s.outcome)), exit_code=s.exit_code,
            duration_ms=s.duration_ms, files_changed=s.files_changed,
            lines_added=s.lines_added, lines_deleted=s.lines_deleted,
        )  # fmt: skip

    # -- reading -------------------------------------------------------------------------

    def command(self) -> tuple[list[str] | None, bool]:
        """The command it runs now (latest started, still running), else its last one."""
        if self.current:
            return list(next(reversed(self.current.values()))["argv"]), True
        if self.commands:
            return list(self.commands[-1]["argv"]), False
        return None, False

    def detail(self) -> dict[str, Any]:
        return {
            **attempt_brief(self),
            "reason": self.reason,
            "ended": iso(self.ended),
            "outcome": dict(self.outcome),
            "commands": [dict(c) for c in self.commands],
            "files": [dict(f) for f in self.files],
            "samples": [dict(s) for s in self.samples],
            "llm_calls": [dict(c) for c in self.llm_calls],
            "llm": {**self.llm_totals, "cost": usd(self.llm_nusd)},
            "gates": [dict(g) for g in self.gates],
            "egress": dict(self.egress_counts),
            "denied_hosts": list(self.denied_hosts),
            "findings": [dict(f) for f in self.findings],
        }


def attempt_brief(v: AttemptView) -> dict[str, Any]:
    """One row of the active-sandboxes table."""
    argv, running = v.command()
    last = v.samples[-1] if v.samples else {}
    return {
        "task": v.key,
        "task_id": v.task,
        "team": v.team,
        "batch": v.batch,
        "attempt": v.attempt,
        "node": v.node,
        "template": v.template,
        "state": v.state.value,
        "started": iso(v.started or v.seen),
        "command": argv,
        "command_running": running,
        "commands": v.command_count,
        "files": v.file_count,
        "cpu_pct": last.get("cpu_pct"),
        "mem": last.get("mem"),
        "mem_limit": last.get("mem_limit"),
        "llm_calls": v.llm_totals["calls"],
        "llm_in_flight": len(v.in_flight),
        "spend": usd(v.llm_nusd + v.other_nusd),
        "findings": len(v.findings),
        "gates": {
            "passed": sum(g["passed"] for g in v.gates),
            "failed": sum(not g["passed"] for g in v.gates),
        },
    }


_seq = iter(range(1 << 62))


class BatchView:
    """A batch: its spec's name and templates, counts by state, and spend so far."""

    def __init__(self, batch: str, team: str) -> None:
        self.batch, self.team = batch, team
        self.name = batch
        self.submitted_at: datetime | None = None
        self.total = 0
        self.counts: Counter[TaskState] = Counter()
        self.spend_nusd = 0
        self.tasks: dict[str, None] = {}
        self.default_template = ""
        self.templates: dict[str, str] = {}
        self.order = next(_seq)

    def submitted(self, t: datetime, p: Mapping[str, Any]) -> None:
        spec = p.get("spec") or {}
        self.submitted_at = t
        self.name = str(spec.get("name") or self.batch)
        self.total = int(p.get("tasks") or 0)
        self.default_template = str((spec.get("defaults") or {}).get("template", ""))
        for entry in spec.get("tasks") or []:
            if entry.get("id") and entry.get("template"):
                self.templates[str(entry["id"])] = str(entry["template"])

    def template_of(self, task_id: str) -> str:
        return self.templates.get(task_id, self.default_template)

    def brief(self) -> dict[str, Any]:
        return {
            "batch": self.batch,
            "name": self.name,
            "team": self.team,
            "submitted": iso(self.submitted_at),
            "total": max(self.total, len(self.tasks)),
            "states": {s.value: n for s, n in sorted(self.counts.items()) if n},
            "spend": usd(self.spend_nusd),
        }
