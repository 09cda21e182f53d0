"""Ledger events of one attempt, built by hand: for tests, benchmarks and demos.

`AttemptEvents(team, batch, task)` makes the same `Event` records the scheduler, the
activity capture and the gateway emit (payload keys of accounting/README.md), each at
`t0 + seconds`::

    a = AttemptEvents("ml", "b1", "t1", t0=T0)
    events = [a.state(0, "queued"), a.state(1, "running"), a.command(2, ["pytest", "-q"])]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from accounting.schemas import Event, EventKind

__all__ = ["AttemptEvents"]


@dataclass
class AttemptEvents:
    """Events of one attempt of one task; `seconds` are offsets from `t0`."""

    team: str
    batch: str
    task: str
    attempt: int = 1
    node: str = "node-1"
    t0: datetime = field(default_factory=lambda: datetime.now(UTC))
    _pid: int = 100
    _state: str = ""

    def event(self, seconds: float, kind: EventKind, payload: dict[str, Any]) -> Event:
        t = self.t0 + timedelta(seconds=seconds)
        return Event(t, self.team, self.batch, self.task, self.attempt, self.node, kind, payload)

    def submitted(self, seconds: float, tasks: int, template: str = "minimal") -> Event:
        spec = {"name": self.batch, "team": self.team, "defaults": {"template": template}}
        return Event(self.t0 + timedelta(seconds=seconds), self.team, self.batch, "", 0, self.node,
                     EventKind.BATCH_SUBMITTED, {"spec": spec, "tasks": tasks})  # fmt: skip

    def state(self, seconds: float, state: str, reason: str = "", **extra: Any) -> Event:
        payload = {"state": state, "previous": self._state, "reason": reason, **extra}
        self._state = state
        return self.event(seconds, EventKind.TASK_STATE, payload)

    def command(self, seconds: float, argv: Sequence[str], pid: int | None = None) -> Event:
        if pid is None:
            self._pid += 1
            pid = self._pid
        payload = {"argv": list(argv), "pid": pid, "ppid": 1, "mode": "netlink"}
        return self.event(seconds, EventKind.COMMAND_STARTED, payload)

    def finished(
        self, seconds: float, argv: Sequence[str], pid: int, exit: int = 0, took_ms: float = 5.0
    ) -> Event:
        payload = {"argv": list(argv), "pid": pid, "ppid": 1, "exit": exit, "duration_ms": took_ms}
        return self.event(seconds, EventKind.COMMAND_FINISHED, payload)

    def file(self, seconds: float, path: str, op: str = "modify", size: int = 10,
             src: str | None = None) -> Event:  # fmt: skip
        payload: dict[str, Any] = {"path": path, "op": op, "bytes": size}
        if src is not None:
            payload["from"] = src
        return self.event(seconds, EventKind.FILE_CHANGED, payload)

    def sample(self, seconds: float, cpu_us: int, mem: int, *, cpu_limit_mc: int = 1000,
               mem_limit: int = 1 << 30, pids: int = 4) -> Event:  # fmt: skip
        payload = {"cpu_usage_us": cpu_us, "cpu_limit_millicores": cpu_limit_mc,
                   "memory_bytes": mem, "memory_limit_bytes": mem_limit, "pids": pids,
                   "pids_limit": 256, "io_read_bytes": 0, "io_write_bytes": 0}  # fmt: skip
        return self.event(seconds, EventKind.RESOURCE_SAMPLE, payload)

    def llm(self, seconds: float, tokens_in: int = 1000, tokens_out: int = 200,
            cost_nusd: int = 1_000_000, model: str = "gpt-4.1", latency_ms: float = 900.0,
            status: str = "ok") -> Event:  # fmt: skip
        payload = {"model": model, "provider": "scripted", "input_uncached": tokens_in,
                   "input_cache_read": 0, "input_cache_write": 0, "output": tokens_out,
                   "reasoning": 0, "cost_nusd": cost_nusd, "latency_ms": latency_ms,
                   "status": status, "stream": False}  # fmt: skip
        return self.event(seconds, EventKind.LLM_CALL, payload)

    def reserved(self, seconds: float, reservation: str, amount_nusd: int = 5_000_000) -> Event:
        payload = {"scope": "task", "cap": None, "amount_nusd": amount_nusd,
                   "reservation": reservation, "kind": "llm"}  # fmt: skip
        return self.event(seconds, EventKind.BUDGET_RESERVED, payload)

    def settled(self, seconds: float, reservation: str, amount_nusd: int = 1_000_000) -> Event:
        payload = {"scope": "task", "cap": None, "amount_nusd": amount_nusd,
                   "reservation": reservation}  # fmt: skip
        return self.event(seconds, EventKind.BUDGET_SETTLED, payload)

    def egress(self, seconds: float, host: str, allowed: bool, port: int = 443) -> Event:
        payload = {"host": host, "port": port, "allowed": allowed,
                   "reason": "allowlist" if allowed else "not in the allowlist",
                   "bytes_up": 0, "bytes_down": 0}  # fmt: skip
        return self.event(seconds, EventKind.EGRESS_DECISION, payload)

    def gate(self, seconds: float, gate: str, passed: bool, detail: str = "") -> Event:
        payload = {"gate": gate, "passed": passed, "detail": detail}
        return self.event(seconds, EventKind.GATE_RESULT, payload)
