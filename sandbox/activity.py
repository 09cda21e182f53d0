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

Commands come from the kernel's process-events connector (`sandbox.proc_events`), or,
where it is refused, from polling the container's processes (`sandbox.proc_poll`);
`report.mode` and each command event say which.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from accounting.charging import resource_charges
from accounting.errors import SandboxError
from accounting.pricing import PriceList, load_pricing
from accounting.schemas import Charge, Event, EventKind, UsageBucket
from sandbox.cgroup_stats import CgroupReader, CgroupSample, ResourceTotals, UsageIntegrator
from sandbox.file_watch import FileChange, FileWatcher, WatchRoot
from sandbox.proc_hub import NetlinkProcHub
from sandbox.proc_poll import PollingProcSource
from sandbox.proc_table import CaptureMode, CommandFinished, CommandStarted, ContainerEmpty
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

Record = Event | Charge
Sink = Callable[[list[Record]], None]
ProcMode = Literal["auto", "netlink", "poll"]
_BATCH = 512
# Where a hardened sandbox can write besides its workspace (the root is read-only); these
# are paths inside the container, watched through /proc/<pid>/root.
SANDBOX_WRITABLE = ("/tmp", "/dev/shm")  # noqa: S108


@dataclass(frozen=True)
class CaptureIdentity:
    """Who and what the captured sandbox runs for (the ledger's common columns)."""

    team: str
    batch: str
    task: str
    attempt: int
    node: str
    task_type: str = ""


@dataclass(frozen=True)
class CaptureReport:
    """What a capture saw, and the compute charges made from its totals."""

    mode: CaptureMode
    commands: int
    file_changes: int
    samples: int
    totals: ResourceTotals
    charges: tuple[Charge, ...]  # empty when no sample was taken (the container never ran)
    lost_commands: int  # connector overruns while it ran (node-wide: each may hide commands)
    lost_file_changes: int  # inotify queue overflows


def ledger_sink(writer: Any) -> Sink:
    """A sink that appends each batch to a `LedgerWriter`, one call per table."""

    def sink(batch: list[Record]) -> None:
        by_table: dict[str, list[Record]] = {}
        for rec in batch:
            by_table.setdefault(rec.TABLE, []).append(rec)
        for table, rows in by_table.items():
            writer.append(table, rows)

    return sink


_STOP = object()


class ActivityCapture:
    """Captures one sandbox's activity on background threads (see the module doc)."""

    _gathering = False  # the loop's last wait brought records (see _collect)

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
        gather_s: float = 0.1,
        hub: NetlinkProcHub | None = None,
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
        self.cgroup = CgroupReader(container_id)
        self.mode: CaptureMode | None = None
        self.report: CaptureReport | None = None
        self.unsent: list[Record] = []  # batches the sink refused (see stop())
        self._q: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._stopping = threading.Event()
        self._integrator = UsageIntegrator()
        self._offset_ns = 0
        self._watcher: FileWatcher | None = None
        self._poller: PollingProcSource | None = None
        self._subscribed = False
        self._thread: threading.Thread | None = None
        self._errors: list[BaseException] = []
        self._counts = {"commands": 0, "files": 0}
        self._other_watched = False
        self._reads: SensitiveWatch | None = None  # credential reads (canaries, real files)
        self._lost_before = 0
        self.native_ids: dict[str, int] = {}

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
            self._watcher = FileWatcher(
                [WatchRoot(self.workspace_dir, self.workspace_prefix)], self._q.put, self.quiet_s
            )
            self._reads = SensitiveWatch.beside(self.workspace_dir, self._q.put)
            self._start_commands()
            self._watcher.start()
            self._reads.start()
            self._thread = threading.Thread(
                target=self._run, name="sandfleet-activity", daemon=True
            )
            self._thread.start()
        except BaseException:
            self._stop_sources()
            raise

    def _start_commands(self) -> None:
        pids = self.cgroup.procs()
        if self.proc_mode != "poll":
            hub = self._hub or NetlinkProcHub.shared()
            try:
                self._lost_before = hub.lost
                hub.subscribe(self.container_id, pids, self._q.put)
                self._hub, self._subscribed, self.mode = hub, True, CaptureMode.NETLINK
                return
            except SandboxError as e:
                if self.proc_mode == "netlink":
                    raise
                log.warning("%s", e)
        self._poller = PollingProcSource(self.cgroup, self._q.put, self.poll_interval)
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
        if self._thread is not None:
            self._stopping.set()
            self._q.put(_STOP)
            self._thread.join()
            self._thread = None
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
        if self._watcher is not None:
            try:
                self._watcher.stop()
            except SandboxError as e:
                self._errors.append(e)
        if self._reads is not None:
            try:
                self._reads.stop()
            except SandboxError as e:
                self._errors.append(e)

    # -- the loop: records in, events out ----------------------------------------------

    def _run(self) -> None:
        self.native_ids["activity"] = threading.get_native_id()
        next_sample = time.monotonic()
        stopping = False
        while not stopping:
            batch: list[Record] = []
            try:
                stopping, next_sample = self._collect(batch, next_sample)
            except Exception as e:  # kept and raised by stop(); what was made is kept
                log.exception("activity capture loop failed")
                self._errors.append(e)
                self.unsent.extend(batch)
                continue
            if batch:
                self._deliver(batch)

    def _collect(self, batch: list[Record], next_sample: float) -> tuple[bool, float]:
        """Wait for records or the next sample; fill `batch`. Returns (stopping, next)."""
        if self._gathering:  # records came last time, more are likely: one wake-up a batch
            self._stopping.wait(max(0.0, min(self.gather_s, next_sample - time.monotonic())))
            try:
                item = self._q.get_nowait()
            except queue.Empty:
                item = None
        else:
            try:
                item = self._q.get(timeout=max(0.0, next_sample - time.monotonic()))
            except queue.Empty:
                item = None
            if item is not None:
                self._stopping.wait(self.gather_s)  # let a batch gather: fewer wake-ups
        self._gathering = item is not None
        stopping = sample_now = False
        while item is not None:
            if item is _STOP:
                stopping = sample_now = True
            elif isinstance(item, ContainerEmpty):  # last reading before the cgroup goes
                sample_now = True
            else:
                sample_now |= self._integrator.samples == 0
                batch.append(self._event(item))
            if len(batch) >= _BATCH:
                break
            try:
                item = self._q.get_nowait()
            except queue.Empty:
                item = None
        if sample_now or time.monotonic() >= next_sample:
            sample = self.cgroup.sample()
            if sample is not None:
                self._integrator.add(sample)
                batch.append(self._sample_event(sample))
            next_sample = time.monotonic() + self.interval
        return stopping, next_sample

    def _deliver(self, batch: list[Record]) -> None:
        try:
            self.sink(batch)
        except Exception as e:  # kept and raised by stop(); the batch is kept in .unsent
            log.exception("the activity sink refused %d records", len(batch))
            self._errors.append(e)
            self.unsent.extend(batch)

    def _time(self, mono_ns: int) -> datetime:
        return datetime.fromtimestamp((mono_ns + self._offset_ns) / 1e9, tz=UTC)

    def _make(self, mono_ns: int, kind: EventKind, payload: dict[str, Any]) -> Event:
        i = self.identity
        return Event(
            time=self._time(mono_ns), team=i.team, batch=i.batch, task=i.task,
            attempt=i.attempt, node=i.node, kind=kind, payload=payload,
        )  # fmt: skip

    def _event(self, item: object) -> Event:
        if isinstance(item, CommandStarted):
            self._counts["commands"] += 1
            if not self._other_watched:
                self._other_watched = self._watch_other_writable(item.pid)
            payload = {"argv": list(item.argv), "pid": item.pid, "ppid": item.ppid,
                       "mode": item.mode.value}  # fmt: skip
            return self._make(item.mono_ns, EventKind.COMMAND_STARTED, payload)
        if isinstance(item, CommandFinished):
            payload = {"argv": list(item.argv), "pid": item.pid, "ppid": item.ppid,
                       "duration_ms": item.duration_ms, "mode": item.mode.value}  # fmt: skip
            if item.exit is not None:
                payload["exit"] = item.exit
            return self._make(item.mono_ns, EventKind.COMMAND_FINISHED, payload)
        if isinstance(item, FileChange):
            self._counts["files"] += 1
            payload = {"path": item.path, "op": item.op, "bytes": item.bytes}
            if item.src is not None:
                payload["from"] = item.src
            return self._make(item.mono_ns, EventKind.FILE_CHANGED, payload)
        raise TypeError(f"unexpected capture record {item!r}")

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
