"""The fallback for command capture: poll the container's processes.

Where the kernel refuses the process-events connector (no root, a user namespace, no
CONFIG_PROC_EVENTS), `PollingProcSource` lists the container's cgroup (`cgroup.procs`)
every `interval` seconds and reads each new process's argv from /proc. It only sees
what is alive at a poll: a command shorter than the interval may be missed, exit
statuses are unknown, and start / end times are those of the polls. Its records say
`mode=poll`, so the ledger tells the two apart.

`PollTracker` is the pure step function (a set of pids in, records out).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from sandbox.cgroup_stats import CgroupReader
from sandbox.proc_table import (
    CaptureMode,
    CommandFinished,
    CommandStarted,
    ContainerEmpty,
    ProcReader,
    Record,
    SysProcReader,
)

__all__ = ["PollTracker", "PollingProcSource"]

log = logging.getLogger(__name__)

_ENGINE_ARGV = ("runc", "init")  # runc's own process in the cgroup, before it executes


@dataclass(slots=True)
class _Seen:
    argv: tuple[str, ...]
    ppid: int
    start_ns: int
    command: bool  # False: a fork that has not executed anything yet (a subshell)


class PollTracker:
    """Diffs successive process lists of one container into command records."""

    def __init__(self, reader: ProcReader) -> None:
        self.reader = reader
        self.seen: dict[int, _Seen] = {}
        self._ever = False

    def step(self, pids: list[int], now_ns: int) -> list[Record]:
        out: list[Record] = []
        alive = set(pids)
        for pid in sorted(self.seen.keys() - alive):
            out.extend(self._end(pid, now_ns))
        for pid in sorted(alive):
            argv = self.reader.cmdline(pid)
            if argv is None or argv == _ENGINE_ARGV:  # gone, or the engine's, not yet exec'd
                continue
            prev = self.seen.get(pid)
            if prev is not None and prev.argv == argv:
                continue
            if prev is not None:
                out.extend(self._end(pid, now_ns))
                ppid = prev.ppid
            else:
                ppid = self.reader.ppid(pid) or 0
            parent = self.seen.get(ppid)
            forked = prev is None and parent is not None and parent.argv == argv
            self.seen[pid] = _Seen(argv, ppid, now_ns, command=not forked)
            if not forked:
                out.append(CommandStarted(pid, ppid, argv, now_ns, CaptureMode.POLL))
        if alive:
            self._ever = True
        elif self._ever and not self.seen:
            self._ever = False
            out.append(ContainerEmpty(now_ns))
        return out

    def _end(self, pid: int, now_ns: int) -> list[Record]:
        s = self.seen.pop(pid)
        if not s.command:
            return []
        return [CommandFinished(pid, s.ppid, s.argv, s.start_ns, now_ns, None, CaptureMode.POLL)]


class PollingProcSource:
    """A thread that polls one container's processes and hands records to `callback`."""

    def __init__(
        self,
        cgroup: CgroupReader,
        callback: Callable[[Record], None],
        interval: float = 0.1,
        reader: ProcReader | None = None,
    ) -> None:
        self.cgroup = cgroup
        self.callback = callback
        self.interval = interval
        self.tracker = PollTracker(reader or SysProcReader())
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.native_id: int | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="sandfleet-proc-poll", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop polling, after one last poll (which ends whatever has gone)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _poll(self) -> None:
        for rec in self.tracker.step(self.cgroup.procs(), time.monotonic_ns()):
            self.callback(rec)

    def _run(self) -> None:
        self.native_id = threading.get_native_id()
        try:
            while not self._stop.wait(self.interval):
                self._poll()
            self._poll()
        except Exception as e:  # stop() callers read .error and raise it
            log.exception("process polling stopped")
            self.error = e
