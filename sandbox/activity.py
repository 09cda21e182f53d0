"""What a sandbox does while it runs: its commands, file changes and resource use.

`ActivityCapture` runs beside one container on the node. Start it after the container
is created and before it starts (so the first command is seen); stop it after the
container has exited and before it is removed::

    with ActivityCapture(cid, ws_dir, identity, sink) as capture:
        backend.start(cid)
        backend.wait(cid)
    report = capture.report          # totals, compute charges, capture mode

It emits `accounting.schemas.Event` records in batches to `sink` (one call per batch,
from one thread): `command_started` / `command_finished` (argv, pid, ppid, exit,
duration_ms, and `mode`: `netlink` or `poll`), `file_changed` (path, op, bytes, from)
for the workspace and the sandbox's other writable places (`/tmp`, `/dev/shm`) and for
reads of credential files (op `read` / `open`: `sandbox.sensitive_watch`), and a
`resource_sample` every `interval` seconds. At stop the measured totals (CPU
core-seconds, memory GiB-seconds) become compute `Charge`s priced by
`configs/pricing.yaml`, sent to the same sink. `ledger_sink(writer)` adapts a
`LedgerWriter`.

The capture has no thread of its own: its work runs on the node's shared
`sandbox.capture_loop.CaptureLoop`, on a 250 ms grid: while records flow, what gathered
since the last tick goes to the sink as one batch (so an event reaches the sink within
about a tick), samples fall on whole seconds, and the file watcher is serviced on the
same wake-ups.
The command reader hands over a list of records per read (`NetlinkProcHub`'s batch
callbacks); they become events in one pass. When the sink takes Arrow tables
(`takes_tables`, as `ledger_sink`'s does), the hub hands over a read's commands as
`events` rows already (`CommandRows`: one Arrow batch made in C, identity columns and
canonical JSON payloads included), and each tick's commands reach the sink as one
`pa.Table`, with no Python object per command.

Commands come from the kernel's process-events connector (`sandbox.proc_events`), or,
where it is refused, from polling the container's processes (`sandbox.proc_poll`);
`report.mode` and each command event say which.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Collection, Sequence
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import pyarrow as pa

from accounting.charging import resource_charges
from accounting.errors import SandboxError
from accounting.pricing import PriceList, load_pricing
from accounting.schemas import Charge, Event, EventKind, UsageBucket
from sandbox.capture_loop import CaptureLoop
from sandbox.capture_records import (
    CaptureIdentity,
    CaptureReport,
    Record,
    Sink,
    capture_events,
    event_rows,
    event_time,
    ledger_sink,
    takes_tables,
)
from sandbox.cgroup_stats import CgroupReader, CgroupSample, ResourceTotals, UsageIntegrator
from sandbox.file_watch import FileWatcher, WatchRoot
from sandbox.proc_hub import NetlinkProcHub
from sandbox.proc_poll import PollingProcSource
from sandbox.proc_table import CaptureMode
from sandbox.sensitive_watch import SensitiveWatch

__all__ = [
    "ActivityCapture",
    "CaptureIdentity",
    "CaptureReport",
    "Record",
    "Sink",
    "ledger_sink",
]

log = logging.getLogger(__name__)

ProcMode = Literal["auto", "netlink", "poll"]
_BATCH = 512  # records per sink call at most
_TICK_S = 0.25  # the shared loop's grid (gather_s): see sandbox.capture_loop
_NEVER = 1 << 62  # no sample is scheduled (ns)
# Where a hardened sandbox can write besides its workspace (the root is read-only); these
# are paths inside the container, watched through /proc/<pid>/root.
SANDBOX_WRITABLE = ("/tmp", "/dev/shm")  # noqa: S108


class ActivityCapture:
    """Captures one sandbox's activity on the shared capture loop (see the module doc)."""

    def __init__(
        self,
        container_id: str,
        workspace_dir: str | Path,
        identity: CaptureIdentity,
        sink: Sink,
        interval: float = 1.0,
        *,
        prices: PriceList | None = None,
        proc_mode: ProcMode = "auto",
        workspace_prefix: str = "/workspace",
        other_writable: Sequence[str] = SANDBOX_WRITABLE,
        quiet_s: float = 0.25,
        poll_interval: float = 0.1,
        gather_s: float = _TICK_S,
        hub: NetlinkProcHub | None = None,
        loop: CaptureLoop | None = None,
    ) -> None:
        self.container_id = container_id
        self.workspace_dir = str(workspace_dir)
        self.identity = identity
        self.sink = sink
        self.interval = interval
        self.prices = prices if prices is not None else load_pricing()
        self.proc_mode = proc_mode
        self.workspace_prefix = workspace_prefix
        self.other_writable = tuple(other_writable)
        self.quiet_s = quiet_s
        self.poll_interval = poll_interval
        self.gather_s = gather_s
        self._hub = hub
        self._loop = loop if loop is not None else CaptureLoop.shared(gather_s)
        self.cgroup = CgroupReader(container_id, keep_open=True)
        self.mode: CaptureMode | None = None
        self.report: CaptureReport | None = None
        self.unsent: list[Record | pa.Table] = []  # batches the sink refused (see stop())
        # Records from the reader's, poller's and watchers' threads; drained on the loop.
        self._inbox: deque[object] = deque()
        self._flush_at: int | None = None  # the tick that looks at the inbox again
        # Samples wait for the container to run: the engine writes the cgroup's limits
        # after making it, so the first sample comes a tick after the first record.
        self._next_sample_ns = _NEVER
        self._interval_ns = max(1, int(interval * 1e9))
        self._looping = False
        self._watch_error: BaseException | None = None
        self._watch_due: int | None = 0  # when the watcher wants servicing; None: on input
        self._integrator = UsageIntegrator()
        self._offset_ns = 0
        self._watcher: FileWatcher | None = None
        self._poller: PollingProcSource | None = None
        self._subscribed = False
        self._errors: list[BaseException] = []
        self._counts = {"commands": 0, "files": 0}
        self._other_watched = False
        self._reads: SensitiveWatch | None = None  # credential reads (canaries, real files)
        self._lost_before = 0

    @property
    def native_ids(self) -> dict[str, int]:
        """The tids of the threads this capture runs on (shared with other captures)."""
        tid = self._loop.native_id
        return {"loop": tid} if tid is not None else {}

    # -- life cycle -----------------------------------------------------------------------

    def __enter__(self) -> ActivityCapture:
        self.start()
        return self

    def __exit__(
        self, typ: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            self.stop()
        except SandboxError:
            if exc is None:
                raise
            log.exception("activity capture failed while another error was raised")

    def start(self) -> None:
        """Start capturing. Call before the container starts to see its first command."""
        self._offset_ns = time.time_ns() - time.monotonic_ns()
        started = self.cgroup.sample() is not None
        self._integrator = UsageIntegrator(cpu_baseline_ns=None if started else 0)
        try:
            self._watcher = FileWatcher(  # serviced by the loop (its callback runs there)
                [WatchRoot(self.workspace_dir, self.workspace_prefix)],
                self._inbox.append,
                self.quiet_s,
            )
            self._reads = SensitiveWatch.beside(self.workspace_dir, self._put)
            self._start_commands()
            self._reads.start()
            if started:  # running already: the first sample at once
                self._next_sample_ns = time.monotonic_ns()
            self._loop.add(self)
            self._looping = True
        except BaseException:
            self._stop_sources()
            self._finish_watcher()
            raise

    def _start_commands(self) -> None:
        pids = self.cgroup.procs()
        if self.proc_mode != "poll":
            hub = self._hub or NetlinkProcHub.shared()
            try:
                self._lost_before = hub.lost
                if takes_tables(self.sink):  # commands come as rows (tables) made in C
                    rows = event_rows(self.identity, self._offset_ns)
                    hub.subscribe(self.container_id, pids, self._take, rows=rows)
                else:
                    hub.subscribe(self.container_id, pids, self._take, batch=True)
                self._hub, self._subscribed, self.mode = hub, True, CaptureMode.NETLINK
                return
            except SandboxError as e:
                if self.proc_mode == "netlink":
                    raise
                log.warning("%s", e)
        self._poller = PollingProcSource(self.cgroup, self._put, self.poll_interval)
        self._poller.start()
        self.mode = CaptureMode.POLL

    def stop(self) -> CaptureReport:
        """Stop, flush, and return the report; emits the compute charges to the sink.

        Raises `SandboxError` (after everything is stopped) when part of the capture
        failed or the sink refused events; what it refused is kept in `self.unsent`.
        """
        if self.report is not None:
            return self.report
        if self.mode is None:
            raise SandboxError("activity capture was never started (call start() first)")
        self._stop_sources()
        self._finish_watcher()
        batch: list[Record | pa.Table] = []
        try:
            self._collect(batch, time.monotonic_ns(), final=True)
        except Exception as e:  # raised below; what was made is kept
            log.exception("activity capture's last flush failed")
            self._errors.append(e)
            self.unsent.extend(batch)
            batch = []
        self._deliver(batch)
        self.cgroup.close()
        totals = self._integrator.totals()
        charges = self._charges(totals)
        if charges:
            self._deliver(list(charges))
        hub = self._hub if self._subscribed else None
        self.report = CaptureReport(
            mode=self.mode,
            commands=self._counts["commands"],
            file_changes=self._counts["files"],
            samples=totals.samples,
            totals=totals,
            charges=tuple(charges),
            lost_commands=hub.lost - self._lost_before if hub is not None else 0,
            lost_file_changes=self._watcher.overflows if self._watcher is not None else 0,
        )
        if self._errors:
            first = self._errors[0]
            raise SandboxError(
                f"activity capture of sandbox {self.container_id[:12]} failed ({first}); "
                f"{len(self.unsent)} records were not delivered and are kept in `.unsent`"
            ) from first
        return self.report

    def _stop_sources(self) -> None:
        """Stop what feeds the inbox from other threads, then the loop's turns."""
        if self._subscribed and self._hub is not None:
            try:
                self._hub.check(self.container_id)
            except SandboxError as e:
                self._errors.append(e)
            finally:
                self._hub.unsubscribe(self.container_id)
        if self._poller is not None:
            self._poller.stop()
            if self._poller.error is not None:
                self._errors.append(self._poller.error)
        if self._reads is not None:
            try:
                self._reads.stop()
            except SandboxError as e:
                self._errors.append(e)
        if self._looping:
            self._loop.remove(self)  # from here on this thread is the only one
            self._looping = False

    def _finish_watcher(self) -> None:
        """The watcher's last read and everything it holds, into the inbox."""
        if self._watcher is None:
            return
        error = self._watch_error
        try:
            if error is None:
                self._watcher.finish()
            else:
                self._watcher.close()
        except Exception as e:  # raised by stop()
            log.exception("file watching failed at stop")
            error = e
        if error is not None:
            self._errors.append(SandboxError(f"file watching failed: {error}"))

    # -- on the loop: records in, events out ------------------------------------------

    def _take(self, records: list[Any]) -> None:
        """The hub's batch callback (its dispatch thread): one call per read (records,
        or `CommandRows` among them)."""
        self._inbox.extend(records)
        self._loop.poke()

    def _put(self, item: object) -> None:
        self._inbox.append(item)
        self._loop.poke()

    def wait_fds(self) -> tuple[int, ...]:
        w = self._watcher
        if w is None or self._watch_error is not None or self._watch_due is not None:
            return ()  # (with something pending, it is read when that falls due)
        return (w.fileno(),)

    def tick(self, now_ns: int, ready: Collection[int] = ()) -> int | None:
        """Run by the loop: service the watcher when it is due or has input, deliver what
        the inbox holds, sample when due; returns the next deadline."""
        w, watch_due = self._watcher, self._watch_due
        serve = (
            (now_ns >= watch_due)
            if watch_due is not None
            else (w is not None and w.fileno() in ready)
        )
        if serve and w is not None and self._watch_error is None:
            try:
                self._watch_due = w.service(now_ns)
            except Exception as e:  # stop() raises it; the other parts go on
                log.exception("file watching stopped")
                self._watch_error, self._watch_due = e, None
        # Records go out at any turn of the loop (awake anyway, whatever woke it); after
        # a batch, the next tick looks again (more are likely), so while records flow
        # they go out on the grid, and a poke is needed only after a quiet tick.
        due = self._flush_at is not None and now_ns >= self._flush_at
        if self._inbox or due or now_ns >= self._next_sample_ns:
            batch: list[Record | pa.Table] = []
            try:
                self._collect(batch, now_ns)
            except Exception as e:  # kept and raised by stop(); what was made is kept
                log.exception("activity capture loop failed")
                self._errors.append(e)
                self.unsent.extend(batch)
                batch = []
                self._flush_at = None
            self._deliver(batch)
        deadline = self._next_sample_ns
        for d in (self._flush_at, self._watch_due if self._watch_error is None else None):
            if d is not None and d < deadline:
                deadline = d
        return deadline if deadline != _NEVER else None

    def _collect(self, batch: list[Record | pa.Table], now_ns: int, final: bool = False) -> None:
        """Everything in the inbox as events into `batch`, and a sample when due."""
        inbox = self._inbox
        items = [inbox.popleft() for _ in range(len(inbox))]
        sample_now = final or now_ns >= self._next_sample_ns
        if items:
            if self._events(items, batch):
                sample_now = True  # the container emptied: its last reading
            if self._next_sample_ns == _NEVER:  # its first records: it runs
                self._next_sample_ns = self._loop.grid(now_ns + self._loop.tick_ns)
            # more are likely: look again at the next tick without waiting for a poke
            self._flush_at = self._loop.grid(now_ns + 1)
        else:
            self._flush_at = None
        if sample_now:
            sample = self.cgroup.sample()
            if sample is not None:
                self._integrator.add(sample)
                batch.append(self._sample_event(sample))
            iv = self._interval_ns  # on whole intervals: captures sample on one wake-up
            self._next_sample_ns = (now_ns // iv + 1) * iv

    def _deliver(self, batch: list[Record | pa.Table]) -> None:
        for i in range(0, len(batch), _BATCH):
            part = batch[i : i + _BATCH]
            try:
                self.sink(part)
            except Exception as e:  # kept and raised by stop(); the batch is kept in .unsent
                log.exception("the activity sink refused %d records or tables", len(part))
                self._errors.append(e)
                self.unsent.extend(part)

    def _time(self, mono_ns: int) -> datetime:
        return event_time(mono_ns, self._offset_ns)

    def _make(self, mono_ns: int, kind: EventKind, payload: dict[str, Any]) -> Event:
        i = self.identity
        return Event(
            time=self._time(mono_ns), team=i.team, batch=i.batch, task=i.task,
            attempt=i.attempt, node=i.node, kind=kind, payload=payload,
        )  # fmt: skip

    def _events(self, items: list[object], batch: list[Record | pa.Table]) -> bool:
        """`items` as events appended to `batch` (`capture_events`). True when a sample
        is due because of them (the container emptied)."""
        done = capture_events(items, self.identity, self._offset_ns, batch,
                              want_pids=not self._other_watched)  # fmt: skip
        if not self._other_watched:
            for pid in done.started_pids:
                self._other_watched = self._watch_other_writable(pid)
                if self._other_watched:
                    break
        self._counts["commands"] += done.commands
        self._counts["files"] += done.files
        return done.sample_now

    def _sample_event(self, s: CgroupSample) -> Event:
        return self._make(s.mono_ns, EventKind.RESOURCE_SAMPLE, s.payload())

    def _watch_other_writable(self, pid: int) -> bool:
        """Watch the sandbox's writable places outside the workspace, through its root.

        Only once `pid` is inside the container's mount namespace (the engine's own
        `runc init` is not yet): False until then.
        """
        try:
            theirs = os.stat(f"/proc/{pid}/ns/mnt").st_ino
        except (FileNotFoundError, ProcessLookupError):
            return False
        if self._watcher is None or theirs == os.stat("/proc/self/ns/mnt").st_ino:
            return False
        for path in self.other_writable:
            known = self._reads.known_under(path) if self._reads is not None else frozenset()
            root = WatchRoot(f"/proc/{pid}/root{path}", path, fresh=True, known=known)  # tmpfs
            self._watcher.add_root_later(root)
            self._watch_due = 0  # the loop's next turn adds it
        if self._reads is not None:
            self._reads.watch_root(pid)
        return True

    # -- charges --------------------------------------------------------------------------

    def _charges(self, totals: ResourceTotals) -> list[Charge]:
        if totals.samples == 0:
            return []
        i = self.identity
        usage: dict[UsageBucket | str, int | Decimal] = {
            UsageBucket.CPU: totals.cpu_core_seconds,
            UsageBucket.MEMORY: totals.memory_gib_seconds,
        }
        return resource_charges(
            self.prices, usage, time=self._time(totals.last_mono_ns),
            period_start=self._time(totals.first_mono_ns), team=i.team, batch=i.batch,
            task=i.task, attempt=i.attempt, node=i.node, task_type=i.task_type,
        )  # fmt: skip
