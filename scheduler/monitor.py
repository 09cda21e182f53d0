"""The Monitor's core: live state, streaming rules, metrics and actions, without Ray.

`MonitorCore.ingest(rows, table)` takes what the `LedgerActor` appends (records, mappings
or an Arrow table of `events`, `charges` or `tasks`), folds it into the `LiveState`, runs
the `StreamRules`, and carries out each new finding's action:

- every finding is recorded: shown live, counted in `sandfleet_anomalies_total`, and
  appended to the ledger as an `anomaly_finding` event through `sink` (a `FindingSink`:
  anything with `append(table, rows)`, e.g. the LedgerActor);
- `stop`: `actions.stop(task, attempt, reason)` (task = `batch/task`); the scheduler
  stops the attempt and records its outcome as `stopped_by_rule`;
- `escalate`: marked for a person on the dashboard, and `actions.escalate(finding)`
  (`RuleActions` POSTs it to the rule's webhook when one is configured).

`tick(now)` runs the time-based rules. `ingest(..., act=False)` (a replay of an old
ledger) shows findings but neither records them nor acts. With `background_actions`,
actions run on one worker thread so a slow scheduler or webhook never holds up ingest.
The Ray actor around this core is `scheduler.monitor_actor.Monitor`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import queue
import threading
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

import pyarrow as pa

from accounting.anomalies import Finding, FindingSink, finding_event
from accounting.errors import SchedulerError, SchemaError
from accounting.policies import AnomalyPolicies, load_policies
from accounting.schemas import RECORD_TYPES, Charge, Event, TaskSummary
from accounting.validation import to_table
from scheduler.live_state import LiveLimits, LiveState, task_key
from scheduler.metrics import fleet_registry
from scheduler.stream_rules import StreamRules

__all__ = ["Actions", "MonitorCore", "RuleActions", "finding_json", "to_records"]

log = logging.getLogger(__name__)

Record = Event | Charge | TaskSummary


class Actions(Protocol):
    """How the Monitor acts on findings (the lead wires it to the FleetScheduler)."""

    def stop(self, task: str, attempt: int, reason: str) -> None:
        """Stop attempt `attempt` of task `batch/task`; its outcome is `stopped_by_rule`."""

    def escalate(self, finding: Finding) -> None:
        """Tell a person (the finding is already marked on the dashboard)."""


def finding_json(f: Finding) -> dict[str, Any]:
    """A finding as JSON data (what a webhook receives)."""
    data = dataclasses.asdict(f)
    data["first_seen"], data["last_seen"] = f.first_seen.isoformat(), f.last_seen.isoformat()
    data["task_key"] = task_key(f.batch, f.task)
    return data


class RuleActions:
    """`stop` calls `cancel(task, attempt, reason)`; `escalate` POSTs the finding as JSON
    to its rule's webhook (`webhooks[rule]`, from configs/policies.yaml), if any."""

    def __init__(
        self,
        cancel: Callable[[str, int, str], Any] | None,
        webhooks: Mapping[str, str | None] | None = None,
        *,
        timeout_s: float = 5.0,
    ) -> None:
        self.cancel = cancel
        self.webhooks = {k: v for k, v in (webhooks or {}).items() if v}
        self.timeout_s = timeout_s

    @classmethod
    def from_policies(
        cls, policies: AnomalyPolicies, cancel: Callable[[str, int, str], Any] | None
    ) -> RuleActions:
        hooks = {name: getattr(policies, name).webhook for name in type(policies).model_fields}
        return cls(cancel, hooks)

    def stop(self, task: str, attempt: int, reason: str) -> None:
        if self.cancel is None:
            raise SchedulerError(
                f"cannot stop {task} attempt {attempt}: this Monitor has no scheduler to ask "
                "(fix: start it with the fleet, or set the rule's action to alert)"
            )
        self.cancel(task, attempt, reason)

    def escalate(self, finding: Finding) -> None:
        url = self.webhooks.get(finding.rule)
        if url is None:
            return
        body = json.dumps(finding_json(finding)).encode()
        req = urllib.request.Request(  # noqa: S310 - policies only admit http(s) URLs
            url, data=body, method="POST", headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:  # noqa: S310
                resp.read()
        except OSError as e:  # URLError and HTTPError are OSErrors
            raise SchedulerError(
                f"webhook {url} did not take finding {finding.finding_id}: {e} "
                "(fix: check the URL in configs/policies.yaml and that it answers)"
            ) from e


def _record(table: str, row: Any) -> Record:
    cls = RECORD_TYPES[table]
    if isinstance(row, cls):
        if isinstance(row, Event) and isinstance(row.payload, str):
            return dataclasses.replace(row, payload=json.loads(row.payload))
        return row  # type: ignore[return-value]
    if not isinstance(row, Mapping):
        raise SchemaError(f"{table}: cannot read a {type(row).__name__} as a {cls.__name__}")
    names = [f.name for f in dataclasses.fields(cls)]
    data = {k: row[k] for k in names if k in row}
    if table == "events" and isinstance(data.get("payload"), str):
        data["payload"] = json.loads(data["payload"])
    try:
        record: Record = cls(**data)
        return record
    except TypeError as e:
        raise SchemaError(f"{table} row {dict(row)!r} is not a {cls.__name__}: {e}") from e


def to_records(table: str, rows: Sequence[Any] | pa.Table | pa.RecordBatch) -> list[Record]:
    """Ledger rows (records, mappings, or Arrow, validated) as records, payloads parsed."""
    if table not in RECORD_TYPES:
        raise SchemaError(f"unknown table {table!r}; use one of {', '.join(RECORD_TYPES)}")
    if isinstance(rows, pa.Table | pa.RecordBatch):
        rows = to_table(table, rows).to_pylist()
    return [_record(table, r) for r in rows]


def _rows(con: Any, table: str, order: str, batch_rows: int) -> Iterable[Record]:
    """A ledger table's rows as records, in `order`, read in Arrow batches."""
    query = con.cursor().sql(f"SELECT * FROM {table} ORDER BY {order}")
    reader = query.to_arrow_reader(batch_rows)
    for batch in reader:
        for row in batch.to_pylist():
            yield _record(table, row)


class MonitorCore:
    """Live state + streaming rules + metrics + actions (see the module doc). Thread-safe."""

    def __init__(
        self,
        policies: AnomalyPolicies | None = None,
        *,
        actions: Actions | None = None,
        sink: FindingSink | None = None,
        limits: LiveLimits | None = None,
        node: str = "",
        background_actions: bool = False,
    ) -> None:
        self.lock = threading.RLock()
        self.state = LiveState(limits)
        self.rules = StreamRules(policies or load_policies().anomalies)
        self.registry = fleet_registry(lambda: self.state, self.lock)
        self.actions = actions
        self.sink = sink
        self.node = node
        self._jobs: queue.SimpleQueue[Finding | None] | None = None
        self._worker: threading.Thread | None = None
        if background_actions:
            self._jobs = queue.SimpleQueue()
            self._worker = threading.Thread(target=self._work, name="monitor-actions", daemon=True)
            self._worker.start()

    # -- input -----------------------------------------------------------------------

    def ingest(
        self, rows: Sequence[Any] | pa.Table | pa.RecordBatch, table: str = "events",
        *, act: bool = True,
    ) -> list[Finding]:  # fmt: skip
        """Fold ledger rows in; returns the new findings (their actions taken if `act`)."""
        return self.apply(to_records(table, rows), act=act)

    def apply(self, records: Iterable[Record], *, act: bool = True) -> list[Finding]:
        new: list[Finding] = []
        with self.lock:
            for rec in records:
                self.state.apply(rec)
                for f in self.rules.observe(rec):
                    self.state.add_finding(f, "new" if act else "replayed")
                    new.append(f)
        if act:
            self._handle(new)
        return new

    def tick(self, now: datetime | None = None, *, act: bool = True) -> list[Finding]:
        """Run the time-based rules at `now` (default: the wall clock, UTC)."""
        when = now or datetime.now(UTC)
        with self.lock:
            new = self.rules.tick(when)
            for f in new:
                self.state.add_finding(f, "new" if act else "replayed")
        if act:
            self._handle(new)
        return new

    # -- actions ---------------------------------------------------------------------

    def _handle(self, findings: list[Finding]) -> None:
        if not findings:
            return
        if self.sink is not None:
            self.sink.append("events", [finding_event(f, node=self.node) for f in findings])
        for f in findings:
            if self._jobs is not None:
                self._jobs.put(f)
            else:
                self._act(f)

    def _act(self, f: Finding) -> None:
        status = {"alert": "alerted", "stop": "stop requested", "escalate": "escalated"}
        try:
            if f.action == "stop" and self.actions is not None:
                reason = f"stopped by rule {f.rule}: {f.detail} (finding {f.finding_id})"
                self.actions.stop(task_key(f.batch, f.task), f.attempt, reason)
            elif f.action == "escalate" and self.actions is not None:
                self.actions.escalate(f)
            result = status.get(f.action, f.action)
            if self.actions is None and f.action != "alert":
                result = f"{f.action}: no actions wired"
        except Exception as e:  # any failure of an action is logged and shown, never lost
            log.exception("finding %s: action %s failed", f.finding_id, f.action)
            result = f"{f.action} failed: {e}"
        with self.lock:
            self.state.mark_finding(f.finding_id, result)

    def _work(self) -> None:
        assert self._jobs is not None
        while (f := self._jobs.get()) is not None:
            self._act(f)

    def close(self) -> None:
        """Finish the queued actions and stop the worker thread."""
        if self._jobs is not None and self._worker is not None:
            self._jobs.put(None)
            self._worker.join()
            self._jobs = None

    # -- replaying a ledger -------------------------------------------------------------

    def replay(self, data_dir: str, *, batch_rows: int = 8192, tick_every_s: float = 10.0) -> int:
        """Fold a ledger's events, charges and task rows in, in time order, without acting
        (for post-hoc viewing); the time-based rules are judged as the replay's clock
        advances. Returns how many rows were read."""
        import heapq

        from accounting.views import connect

        con = connect(data_dir)
        try:
            streams = [
                _rows(con, table, order, batch_rows)
                for table, order in (("events", "time, chain_id, event_seq"),
                                     ("charges", "time, chain_id, event_seq"))
            ]  # fmt: skip
            n, last_tick, chunk = 0, None, []
            for rec in heapq.merge(*streams, key=lambda r: r.time):
                chunk.append(rec)
                n += 1
                if last_tick is None:
                    last_tick = rec.time
                if (rec.time - last_tick).total_seconds() >= tick_every_s or len(chunk) >= 4096:
                    self.apply(chunk, act=False)
                    chunk = []
                    if (rec.time - last_tick).total_seconds() >= tick_every_s:
                        self.tick(rec.time, act=False)
                        last_tick = rec.time
            self.apply(chunk, act=False)
            summaries = list(_rows(con, "tasks", "time", batch_rows))
            self.apply(summaries, act=False)
            if self.state.last_event is not None:
                self.tick(self.state.last_event, act=False)
            return n + len(summaries)
        finally:
            con.close()

    # -- reading (JSON data) ----------------------------------------------------------

    def fleet(self) -> dict[str, Any]:
        with self.lock:
            return self.state.fleet()

    def batch(self, batch_id: str) -> dict[str, Any] | None:
        with self.lock:
            return self.state.batch(batch_id)

    def task(self, ref: str) -> dict[str, Any] | None:
        with self.lock:
            return self.state.task(ref)
