"""One thread per process that runs the periodic work of every activity capture.

Each `ActivityCapture` used to run two threads (its loop and its file watcher), each
waking for its own records, samples and inotify events; with many sandboxes on a node
those wake-ups were most of what capture cost. `CaptureLoop.shared()` runs every
capture on one thread, on a common grid of `tick_s` (250 ms): the deadlines jobs ask
for (deliver what gathered, the next resource sample, a debounced file change falling
due) are rounded up to the grid, so one wake-up serves every job that is due. While
nothing is due the thread sleeps in `select` on the jobs' descriptors (inotify) and a
wake-up pipe; `poke()` (records arrived for a job) wakes it only while it sleeps past
the next tick: while a tick is near, pokes cost nothing.

The grid trades latency for CPU. Each wake-up costs a few hundred microseconds of Python
whatever it carries (each capture's batch, its sink call, its sample): two busy agents'
capture cost 1.07% of a core with a 100 ms grid (and the reader drained every 50 ms),
~0.6% with 250 ms (drained every 100 ms) (bench/monitor.py, busy phase). An event
still reaches the sink within about 0.5 s of its exec (the eBPF reader drains every
100 ms, then the next tick), and the dashboard within ~2 s.

A job (`LoopJob`) is run only on the loop's thread, never by two threads at once:
`remove(job)` returns once the loop will not run it again, so its owner can finish it
on its own thread. All captures' sinks are called on this one thread: a sink that
blocks delays every capture's delivery (nothing is lost; batches grow meanwhile).
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
import time
from collections.abc import Collection, Sequence
from typing import Final, Protocol

__all__ = ["CaptureLoop", "LoopJob"]

log = logging.getLogger(__name__)

_TICK_S: Final = 0.25
_LINGER_S: Final = 30.0


class LoopJob(Protocol):
    """What the loop runs: `tick` does what is due at `now_ns` (monotonic; `ready`: the
    descriptors found readable at this wake-up) and returns its next deadline (None:
    none until poked); `wait_fds` are descriptors whose readiness should wake the loop
    while nothing is due."""

    def tick(self, now_ns: int, ready: Collection[int]) -> int | None: ...

    def wait_fds(self) -> Sequence[int]: ...


class CaptureLoop:
    """The shared thread (see the module doc). It starts with the first job and ends
    `linger_s` (30 s) after the last, unless another came."""

    _shared: dict[float, CaptureLoop] = {}
    _shared_lock = threading.Lock()

    def __init__(self, tick_s: float = _TICK_S, linger_s: float = _LINGER_S) -> None:
        self.tick_ns = max(1, int(tick_s * 1e9))
        # the thread outlives its last job this long: the node's next attempt (a second
        # later) does not start a thread again
        self.linger_ns = int(linger_s * 1e9)
        self._jobs: list[LoopJob] = []
        # Held while jobs run, and to add or remove one; reentrant, so a sink run by a job
        # may stop another capture (remove its job) on this thread.
        self._lock = threading.RLock()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._armed = True  # a poke must wake the thread (it sleeps past the next tick)
        self._thread: threading.Thread | None = None
        self.native_id: int | None = None  # the thread's tid (its CPU is capture overhead)

    @classmethod
    def shared(cls, tick_s: float = _TICK_S) -> CaptureLoop:
        """The process's loop with that tick."""
        with cls._shared_lock:
            loop = cls._shared.get(tick_s)
            if loop is None:
                loop = cls._shared[tick_s] = cls(tick_s)
            return loop

    def grid(self, ns: int) -> int:
        """The first tick at or after `ns`."""
        return -(-ns // self.tick_ns) * self.tick_ns

    def add(self, job: LoopJob) -> None:
        with self._lock:
            self._jobs.append(job)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="sandfleet-capture-loop", daemon=True
                )
                self._thread.start()
        self._wake()

    def remove(self, job: LoopJob) -> None:
        """Stop running `job`; returns once the loop is not running it (and never will)."""
        with self._lock:
            if job in self._jobs:
                self._jobs.remove(job)
        self._wake()

    def poke(self) -> None:
        """Records arrived for a job: wake the loop unless a tick is near (thread-safe)."""
        if self._armed:
            self._wake()

    def _wake(self) -> None:
        self._armed = False
        with contextlib.suppress(BlockingIOError):  # full: the thread is woken already
            os.write(self._wake_w, b"x")

    def _run(self) -> None:
        self.native_id = threading.get_native_id()
        wake_r, tick_ns = self._wake_r, self.tick_ns
        now = time.monotonic_ns()
        ready: list[int] = []
        idle_since: int | None = None
        while True:
            self._armed = True
            due: int | None = None
            fds = [wake_r]
            with self._lock:
                if self._jobs:
                    idle_since = None
                elif idle_since is None:
                    idle_since = now
                if idle_since is not None:
                    if now - idle_since >= self.linger_ns:
                        self._thread = None
                        return
                    due = idle_since + self.linger_ns  # (an `add` wakes it before)
                for job in list(self._jobs):
                    if job not in self._jobs:  # removed by one run before it
                        continue
                    try:
                        d = job.tick(now, ready)
                        fds.extend(job.wait_fds())
                    except Exception:  # a job keeps its own errors; this is a bug in one
                        log.exception("a capture job failed; it is not run again")
                        self._jobs.remove(job)
                        continue
                    if d is not None and (due is None or d < due):
                        due = d
            if due is None:
                timeout = None
            else:
                due = self.grid(due)
                if due <= now + tick_ns:
                    self._armed = False  # a tick comes soon: it sees new records anyway
                timeout = max(0, due - time.monotonic_ns()) / 1e9
            try:
                ready, _, _ = select.select(fds, [], [], timeout)
            except OSError:  # a job's descriptor closed after it was removed: look again
                ready = []
            now = time.monotonic_ns()
            if wake_r in ready:
                os.read(wake_r, 4096)
            elif not ready and due is not None and now < due:
                now = due  # timed out a hair early (a float timeout): the tick it slept for
