"""What one attempt gets from the node gateway (`NodeChannel`), what it is charged
(`Tally`, summed from the rows sent to the ledger), and the ledger those rows go to when
the driver runs one (`LedgerActorSink`, on the `ledger` actor). Parts of
`scheduler.node_gateway`, kept apart so that module holds only the actor."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from sandbox.credentials import AttemptRef

__all__ = ["LedgerActorSink", "NodeChannel", "Tally"]

_CALL_TIMEOUT_S: Final = 120.0


@dataclass(frozen=True)
class NodeChannel:
    """What one attempt's container needs from the node gateway (picklable).

    `env` has no token: the forwarder reads it from `/run/sandfleet/token`, so it never
    shows in the container's configuration (`docker inspect`).
    """

    ref: AttemptRef
    directory: str  # the socket directory on the host
    volumes: dict[str, dict[str, str]]
    env: dict[str, str]
    command_prefix: tuple[str, ...]

    def wrap(self, argv: Sequence[str]) -> tuple[str, ...]:
        return (*self.command_prefix, *argv)


@dataclass
class Tally:
    """One attempt's charges and tokens, summed from the rows sent to the ledger."""

    cost_compute_nusd: int = 0
    cost_llm_nusd: int = 0
    cost_network_nusd: int = 0
    tokens_input: int = 0
    tokens_output: int = 0
    llm_calls: int = 0
    resource_samples: int = 0  # so far: a live attempt's capture is sampling

    def add(self, table: str, row: Any) -> None:
        if table == "charges":
            category = str(getattr(row.service_category, "value", row.service_category))
            cost = row.cost_nusd or 0
            if category == "Compute":
                self.cost_compute_nusd += cost
            elif category == "Networking":
                self.cost_network_nusd += cost
            elif category.startswith("AI"):
                self.cost_llm_nusd += cost
            return
        kind = str(getattr(row.kind, "value", row.kind))
        if kind == "resource_sample":
            self.resource_samples += 1
        elif kind == "llm_call":
            p = row.payload
            self.llm_calls += 1
            inputs = ("input_uncached", "input_cache_read", "input_cache_write")
            self.tokens_input += sum(int(p.get(k) or 0) for k in inputs)
            self.tokens_output += int(p.get("output") or 0) + int(p.get("reasoning") or 0)


class LedgerActorSink:
    """`LedgerSink` on the `ledger` actor: each batch waits for the actor's answer, so a
    failing ledger fails the gateway closed (as a local writer would)."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    def append(self, table: str, rows: Sequence[Any]) -> int:
        import ray

        return int(ray.get(self.handle.append.remote(table, list(rows)), timeout=_CALL_TIMEOUT_S))
