"""`LedgerActor`: the cluster's one `LedgerWriter`, as a named Ray actor.

Named `ledger` in namespace `sandfleet`, `num_cpus=0`, detached (the scheduler outlives
the driver that started it, and so must its ledger), on the head node when the cluster
offers the head resource. Callers append batches of rows (records, mappings or an Arrow
table) and flush; one actor is one audit chain (a restarted actor starts a new chain).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any, Final

import ray

from accounting.errors import ConfigError
from accounting.validation import Rows
from accounting.writer import LedgerWriter

__all__ = ["HEAD_RESOURCE", "LEDGER_NAME", "NAMESPACE", "LedgerActor", "get_ledger", "head_options"]

NAMESPACE: Final = "sandfleet"
LEDGER_NAME: Final = "ledger"
HEAD_RESOURCE: Final = "sandfleet_head"
"""The custom resource cluster.yaml gives the head node; control actors ask for a sliver."""


def head_options() -> dict[str, Any]:
    """Pin a control actor to the head when the cluster has `sandfleet_head`; else nothing."""
    if ray.cluster_resources().get(HEAD_RESOURCE, 0) > 0:
        return {"resources": {HEAD_RESOURCE: 0.001}}
    return {}


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0)
class LedgerActor:
    """Wraps one `LedgerWriter` under `data_dir`."""

    def __init__(self, data_dir: str, flush_interval_s: float = 1.0) -> None:
        self._data_dir = data_dir
        self._writer = LedgerWriter(
            data_dir, node=socket.gethostname(), flush_interval_s=flush_interval_s
        )

    def data_dir(self) -> str:
        return self._data_dir

    def chain_id(self) -> str:
        return self._writer.chain_id

    def append(self, table: str, rows: Rows) -> int:
        """Validate and buffer rows of one table; returns how many were accepted."""
        return len(self._writer.append(table, rows))

    def append_many(self, batches: list[tuple[str, Rows]]) -> int:
        """Several tables' rows in one call, in order."""
        return sum(len(self._writer.append(table, rows)) for table, rows in batches)

    def flush(self) -> int:
        """Make every row appended so far durable; returns the rows written so far."""
        self._writer.flush()
        return self._writer.rows_durable

    def close(self) -> None:
        """Flush, write the final checkpoint and stop the writer (the actor stays)."""
        self._writer.close()


def _same_dir(a: str, b: str) -> bool:
    if "://" in a or "://" in b:
        return a.rstrip("/") == b.rstrip("/")
    return os.path.realpath(Path(a).expanduser()) == os.path.realpath(Path(b).expanduser())


def get_ledger(data_dir: str) -> Any:
    """The cluster's ledger actor, created on first use; refuses another data dir."""
    handle = LedgerActor.options(  # type: ignore[attr-defined]
        name=LEDGER_NAME,
        namespace=NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
        **head_options(),
    ).remote(data_dir)
    actual = ray.get(handle.data_dir.remote())
    if not _same_dir(actual, data_dir):
        raise ConfigError(
            f"--data-dir {data_dir}: this Ray cluster's ledger already writes to {actual} "
            f"(fix: pass --data-dir {actual}, or use another cluster)"
        )
    return handle
