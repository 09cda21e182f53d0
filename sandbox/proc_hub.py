"""The parent side of command capture: one reader process, shared by every sandbox.

`NetlinkProcHub.shared()` starts `python -m sandbox.proc_events` (the connector's
reader) on the first `subscribe`, and stops it with the last `unsubscribe`.
`subscribe(container_id, pids, callback)` returns once the reader watches the
container; callbacks receive `CommandStarted` / `CommandFinished` / `ContainerEmpty`
records (`sandbox.proc_table`) on the hub's dispatch thread — keep them short. When
the kernel refuses the connector, `subscribe` raises `SandboxError` and the caller
falls back to `sandbox.proc_poll`.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Final

from accounting.errors import SandboxError
from sandbox.proc_table import Record, record_from_json

__all__ = ["NetlinkProcHub"]

log = logging.getLogger(__name__)

Callback = Callable[[Record], None]
_START_TIMEOUT_S: Final = 30.0


class NetlinkProcHub:
    """The reader process and the thread that dispatches its records, shared per process."""

    _shared: NetlinkProcHub | None = None
    _shared_lock = threading.Lock()

    def __init__(self, argv: list[str] | None = None) -> None:
        self.argv = argv or [sys.executable, "-m", "sandbox.proc_events"]
        self._lock = threading.Lock()
        self._callbacks: dict[str, Callback] = {}
        self._acks: dict[str, threading.Event] = {}
        self._failed: dict[str, BaseException] = {}
        self._proc: subprocess.Popen[bytes] | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._start_error = ""
        self._refused = ""
        self.lost = 0  # datagrams the kernel dropped because the reader fell behind
        self.realtime = False
        self.pid: int | None = None  # the reader process (its CPU is capture overhead)
        self.native_id: int | None = None  # the dispatch thread's tid

    @classmethod
    def shared(cls) -> NetlinkProcHub:
        with cls._shared_lock:
            if cls._shared is None:
                cls._shared = cls()
            return cls._shared

    def subscribe(self, container_id: str, pids: list[int], callback: Callback) -> None:
        """Deliver the records of `container_id` (whose live processes are `pids`).

        Returns once the reader watches the container. Raises `SandboxError` when the
        connector is refused (then use `sandbox.proc_poll`).
        """
        with self._lock:
            if self._proc is not None and self._proc.poll() is not None:
                self._reap(self._proc, self._thread)  # it died; its failure is recorded
                self._proc = self._thread = None
            if self._proc is None:
                self._spawn()
            self._callbacks[container_id] = callback
            acked = self._acks[container_id] = threading.Event()
            self._send(f"watch {container_id} {','.join(map(str, pids))}")
        if not acked.wait(_START_TIMEOUT_S):
            self.unsubscribe(container_id)
            raise SandboxError("the process-events reader did not answer; see its stderr")

    def unsubscribe(self, container_id: str) -> None:
        """Stop delivering, once every record the reader had for the container is delivered.

        The reader process ends with the last subscriber.
        """
        acked = threading.Event()
        with self._lock:
            if container_id not in self._callbacks:
                return
            self._acks[container_id] = acked
            alive = self._proc is not None and self._proc.poll() is None
            if alive:
                try:
                    self._send(f"unwatch {container_id}")
                except BrokenPipeError:
                    alive = False  # it died; its failure is recorded for check()
        if alive and not acked.wait(_START_TIMEOUT_S):
            log.warning("the process-events reader did not confirm unwatch %s", container_id[:12])
        proc = thread = None
        with self._lock:
            self._callbacks.pop(container_id, None)
            self._acks.pop(container_id, None)
            if not self._callbacks and self._proc is not None:
                proc, thread = self._proc, self._thread
                self._proc = self._thread = None
        if proc is not None:
            self._reap(proc, thread)

    def check(self, container_id: str) -> None:
        """Raise the error that stopped the reader while `container_id` was subscribed."""
        with self._lock:
            error = self._failed.pop(container_id, None)
        if error is not None:
            raise SandboxError(
                f"the process-events reader failed; later commands were not captured: {error}"
            ) from error

    def _send(self, line: str) -> None:
        assert self._proc is not None and self._proc.stdin is not None
        self._proc.stdin.write(line.encode() + b"\n")
        self._proc.stdin.flush()

    def _spawn(self) -> None:
        if self._refused:  # the kernel's answer does not change; do not ask again
            raise SandboxError(self._refused)
        root = str(Path(__file__).resolve().parent.parent)  # importable from any cwd
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
        }
        proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            start_new_session=True,  # a terminal's Ctrl-C is for the parent, which closes stdin
        )
        self._ready.clear()
        self._start_error = ""
        thread = threading.Thread(
            target=self._dispatch, args=(proc,), name="sandfleet-proc-events", daemon=True
        )
        thread.start()
        if not self._ready.wait(_START_TIMEOUT_S) or self._start_error:
            self._reap(proc, thread)
            why = (
                "the kernel refused the process-events connector "
                f"({self._start_error or 'no answer'}); it needs root in the host's user and pid "
                "namespaces and CONFIG_PROC_EVENTS; command capture falls back to polling"
            )
            if self._start_error:
                self._refused = why
            raise SandboxError(why)
        self._proc, self._thread, self.pid = proc, thread, proc.pid

    def _reap(self, proc: subprocess.Popen[bytes], thread: threading.Thread | None) -> None:
        try:
            if proc.stdin is not None:
                proc.stdin.close()
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        finally:
            if thread is not None and thread is not threading.current_thread():
                thread.join()
            if proc.stdout is not None:
                proc.stdout.close()

    def _dispatch(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        self.native_id = threading.get_native_id()
        try:
            for line in proc.stdout:
                obj = json.loads(line)
                kind = obj["t"]
                if kind == "ready":
                    self.realtime = bool(obj["realtime"])
                    self._ready.set()
                elif kind == "error":
                    self._start_error = obj["msg"]
                    self._ready.set()
                elif kind == "lost":
                    self.lost += 1
                    log.warning("process-events connector overran; some commands were lost")
                elif kind == "ack":
                    with self._lock:
                        acked = self._acks.get(obj["cid"])
                    if acked is not None:
                        acked.set()
                else:
                    cid, rec = record_from_json(obj)
                    with self._lock:
                        cb = self._callbacks.get(cid)
                    if cb is not None:
                        cb(rec)
        except Exception as e:  # each subscriber's check() raises it
            log.exception("the process-events dispatcher stopped")
            with self._lock:
                self._failed.update(dict.fromkeys(self._callbacks, e))
        finally:
            self._ready.set()
            code: int | None
            try:
                code = proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                code = None
            if code != 0:
                err = SandboxError(f"the process-events reader exited with status {code}")
                with self._lock:
                    self._failed.update(dict.fromkeys(self._callbacks, err))
