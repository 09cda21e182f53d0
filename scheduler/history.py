"""What the ledger says about batches: SQL over the `events` view (DuckDB, read-only).

Used where the truth must come from the ledger, not from a live scheduler: `resume`
(a batch's spec and state changes), `status` without a cluster, the refusal to run a
batch twice, and `logs` / `diff` (which attempts of a task exist).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from accounting.errors import LedgerError

__all__ = ["batch_events", "batch_states", "find_attempts", "submitted_batches"]

_LAST_STATE = """
WITH s AS (
  SELECT batch, team, task, attempt, time, chain_id, event_seq,
         json_extract_string(payload, '$.state') AS state,
         json_extract_string(payload, '$.reason') AS reason
  FROM events WHERE kind = 'task_state' {where}
), ranked AS (
  SELECT *, row_number() OVER (
    PARTITION BY batch, task ORDER BY time DESC, chain_id DESC, event_seq DESC) AS rn
  FROM s
)
"""


@contextmanager
def _ledger(data_dir: str | Path) -> Iterator[Any]:
    from accounting.views import connect

    if "://" not in str(data_dir) and not Path(data_dir).exists():
        raise LedgerError(
            f"--data-dir {data_dir}: no such directory (fix: pass the data dir the batch ran with)"
        )
    con = connect(data_dir)
    try:
        yield con
    finally:
        con.close()


def _dicts(cursor: Any) -> list[dict[str, Any]]:
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def batch_events(data_dir: str | Path, batch: str) -> list[dict[str, Any]]:
    """`batch_submitted` and `task_state` events of `batch`, in ledger order."""
    with _ledger(data_dir) as con:
        cur = con.execute(
            "SELECT time, team, batch, task, attempt, node, kind, payload, chain_id, event_seq "
            "FROM events WHERE batch = ? AND kind IN ('batch_submitted', 'task_state') "
            "ORDER BY time, chain_id, event_seq",
            [batch],
        )
        return _dicts(cur)


def submitted_batches(data_dir: str | Path, batch: str | None = None) -> list[dict[str, Any]]:
    """Each submitted batch (or just `batch`): id, team, task count, first submit time."""
    where = "AND batch = ?" if batch else ""
    with _ledger(data_dir) as con:
        cur = con.execute(
            "SELECT batch, any_value(team) AS team, "
            "max(CAST(json_extract(payload, '$.tasks') AS BIGINT)) AS tasks, "
            "min(time) AS submitted FROM events "
            f"WHERE kind = 'batch_submitted' {where} GROUP BY batch ORDER BY submitted",
            [batch] if batch else [],
        )
        return _dicts(cur)


def batch_states(data_dir: str | Path, batch: str | None = None) -> list[dict[str, Any]]:
    """Per batch and state, how many tasks are in it now (the last event of each task)."""
    where = "AND batch = ?" if batch else ""
    sql = _LAST_STATE.format(where=where) + (
        "SELECT batch, team, state, count(*) AS tasks FROM ranked WHERE rn = 1 "
        "GROUP BY batch, team, state ORDER BY batch, state"
    )
    with _ledger(data_dir) as con:
        return _dicts(con.execute(sql, [batch] if batch else []))


def find_attempts(
    data_dir: str | Path, task: str, batch: str | None = None
) -> list[dict[str, Any]]:
    """Every (batch, attempt) of a task id the ledger knows, with its last state and reason."""
    where = "AND task = ?" + (" AND batch = ?" if batch else "")
    params = [task, batch] if batch else [task]
    sql = _LAST_STATE.format(where=where) + (
        "SELECT batch, team, task, max(attempt) AS attempt, "
        "max_by(state, time) AS state, max_by(reason, time) AS reason "
        "FROM ranked GROUP BY batch, team, task ORDER BY batch"
    )
    with _ledger(data_dir) as con:
        return _dicts(con.execute(sql, params))
