"""What one attempt gets from the node gateway (`NodeChannel`) and what it is charged
(`Tally`, summed from the rows sent to the ledger). Parts of `scheduler.node_gateway`,
kept apart so that module holds only the actor."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Final

import pyarrow as pa
import pyarrow.compute as pc

from sandbox.credentials import AttemptRef

__all__ = ["NodeChannel", "Tally"]

_IDENTITY: Final = ("team", "batch", "task", "attempt")
_TALLIED_KINDS: Final = pa.array(["resource_sample", "llm_call"])  # what `Tally.add` counts


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

    def add_table(self, table: str, data: pa.Table) -> None:
        """`add` for each row of an Arrow table (`counted` picks the rows worth it)."""
        for row in data.to_pylist():
            if table == "events":
                row["payload"] = json.loads(row["payload"])
            self.add(table, SimpleNamespace(**row))

    @staticmethod
    def counted(table: str, data: pa.Table) -> pa.Table:
        """The rows of `data` that `add` counts: of events, samples and LLM calls only
        (so of a capture's command events, none, found by one Arrow call)."""
        if table != "events":
            return data
        return data.filter(pc.is_in(data["kind"], value_set=_TALLIED_KINDS))

    @staticmethod
    def by_attempt(data: pa.Table) -> list[tuple[AttemptRef, pa.Table]]:
        """An Arrow table's rows per attempt (a capture's batch is one attempt's: then the
        whole table, checked by one group-by, not assumed)."""
        if data.num_rows == 0:
            return []
        keys = data.select(list(_IDENTITY)).group_by(list(_IDENTITY), use_threads=False)
        attempts = keys.aggregate([]).to_pylist()
        if len(attempts) == 1:
            return [(AttemptRef(**attempts[0]), data)]
        out = []
        for key in attempts:
            mask = pc.and_(
                pc.and_(pc.equal(data["team"], key["team"]), pc.equal(data["batch"], key["batch"])),
                pc.and_(pc.equal(data["task"], key["task"]),
                        pc.equal(data["attempt"], key["attempt"])),
            )  # fmt: skip
            out.append((AttemptRef(**key), data.filter(mask)))
        return out
