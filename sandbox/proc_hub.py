"""The parent side of command capture: one reader process, shared by every sandbox.

`NetlinkProcHub.shared()` starts a reader on the first `subscribe`, and stops it
`linger_s` (30 s) after the last `unsubscribe`, so back-to-back attempts share it.
Readers, in order of preference (each built by `sandbox.native`):
- `ebpf` (`sandbox/native/ebpfmon.bpf.c` + its loader `ebpfmon.c`): the kernel reads
  argv at exec time and keeps only the watched containers' pid namespaces; the reader
  drains a ring buffer on a timer, so a busy sandbox costs no wake-up per exec;
- `native` (`sandbox/native/procmon.c`): the process-events connector, argv from /proc;
- `python` (`python -m sandbox.proc_events`): the same, for far more CPU.
One that cannot be built, or does not start (no root, an old kernel, the verifier's
refusal), is passed over with a warning saying why (`passed_over` keeps it); `reader`
says which ran (`SANDFLEET_PROC_READER=ebpf|native|python` forces one). All speak one
protocol (`sandbox/native/procmon.c` describes it).
`subscribe(container_id, pids, callback)` returns once the reader watches the
container; callbacks receive `CommandStarted` / `CommandFinished` / `ContainerEmpty`
records (`sandbox.proc_table`) on the hub's dispatch thread — keep them short. With
`batch=True` the callback receives a list instead: the container's records from one
read of the reader's output (in order), one call per read, not per record. Given
`rows` (`EventRows`: the container's ledger identity and clock offset) the list holds,
in order, `CommandRows` (a run of the container's command records as ledger `events`
rows in one Arrow batch, made in C: `sandbox.event_rows.EventDecoder`) and
`ContainerEmpty` records: no Python object per command. A read shorter than
`columns_from` bytes (some thirty records, whose objects cost less than a batch's
fixed cost) comes as record objects all the same, so such a callback takes both. Either
way, what came before an ack is delivered before it. When
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
from typing import Any, Final, Literal, cast

from accounting.errors import SandboxError
from sandbox.event_rows import CommandRows, EventDecoder, EventRows
from sandbox.proc_table import (
    REC_ACK,
    REC_LOST,
    ContainerEmpty,
    Record,
    unpack_records,
)

__all__ = ["NetlinkProcHub"]

log = logging.getLogger(__name__)

Callback = Callable[[Record], None]
BatchCallback = Callable[[list[Record]], None]
RowsCallback = Callable[[list[Record | CommandRows]], None]
ReaderKind = Literal["auto", "ebpf", "native", "python"]
_KINDS: Final = ("auto", "ebpf", "native", "python")
_START_TIMEOUT_S: Final = 30.0
_LINGER_S: Final = 30.0
_COLUMNS_FROM: Final = 4096  # bytes of a read (~35 records) from which rows in C pay off
_PYTHON_READER: Final = [sys.executable, "-m", "sandbox.proc_events"]


class NetlinkProcHub:
    """The reader process and the thread that dispatches its records, shared per process."""

    _shared: NetlinkProcHub | None = None
    _shared_lock = threading.Lock()

    def __init__(
        self, argv: list[str] | None = None, reader: ReaderKind | None = None,
        linger_s: float = _LINGER_S, columns_from: int = _COLUMNS_FROM,
    ) -> None:  # fmt: skip
        self.argv = argv  # None: the reader `reader` asks for
        # the reader outlives its last subscriber this long: the node's next attempt
        # starts capturing at once instead of spawning (and loading) a reader again
        self.linger_s = linger_s
        self._idle_timer: threading.Timer | None = None
        self.columns_from = columns_from  # reads shorter than this come as record objects
        self.want: ReaderKind = reader or _reader_from_env()
        self._lock = threading.Lock()
        self._callbacks: dict[str, BatchCallback] = {}
        self._columnar: frozenset[str] = frozenset()  # subscribers that take CommandRows
        self._decoder = EventDecoder()
        self._acks: dict[str, threading.Event] = {}
        self._failed: dict[str, BaseException] = {}
        self._proc: subprocess.Popen[bytes] | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._start_error = ""
        self._refused: dict[str, str] = {}  # reader -> why it did not start (no retry)
        self.passed_over: dict[str, str] = {}  # readers not run this time, and why
        self.lost = 0  # datagrams the kernel dropped because the reader fell behind
        self.realtime = False
        self.reader = ""  # which reader ran: "ebpf", "native" or "python" (its ready line)
        self.pid: int | None = None  # the reader process (its CPU is capture overhead)
        self.native_id: int | None = None  # the dispatch thread's tid

    @classmethod
    def shared(cls) -> NetlinkProcHub:
        with cls._shared_lock:
            if cls._shared is None:
                cls._shared = cls()
            return cls._shared

    def subscribe(
        self,
        container_id: str,
        pids: list[int],
        callback: Callback | BatchCallback | RowsCallback,
        *,
        batch: bool = False,
        rows: EventRows | None = None,
    ) -> None:
        """Deliver the records of `container_id` (whose live processes are `pids`), one
        by one, or with `batch` a list per read of the reader's output, or with `rows` a
        list per read of `CommandRows` (made with `rows`) and records (see the module doc).

        Returns once the reader watches the container. Raises `SandboxError` when the
        connector is refused (then use `sandbox.proc_poll`).
        """
        deliver = (
            cast(BatchCallback, callback)
            if batch or rows is not None
            else _each(cast(Callback, callback))
        )
        with self._lock:
            if self._idle_timer is not None:
                self._idle_timer.cancel()
                self._idle_timer = None
            if self._proc is not None and self._proc.poll() is not None:
                self._reap(self._proc, self._thread)  # it died; its failure is recorded
                self._proc = self._thread = None
            if self._proc is None:
                self._spawn()
            self._callbacks[container_id] = deliver
            self._decoder.set(container_id, rows)
            if rows is not None:
                self._columnar = self._columnar | {container_id}
            else:
                self._columnar = self._columnar - {container_id}
            acked = self._acks[container_id] = threading.Event()
            self._send(f"watch {container_id} {','.join(map(str, pids))}")
        if not acked.wait(_START_TIMEOUT_S):
            self.unsubscribe(container_id)
            raise SandboxError("the process-events reader did not answer; see its stderr")

    def unsubscribe(self, container_id: str) -> None:
        """Stop delivering, once every record the reader had for the container is delivered.

        The reader process ends `linger_s` after the last subscriber left, unless one
        came back.
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
        with self._lock:
            self._callbacks.pop(container_id, None)
            self._columnar = self._columnar - {container_id}
            self._decoder.set(container_id, None)
            self._acks.pop(container_id, None)
            idle = not self._callbacks and self._proc is not None
            if idle and self.linger_s > 0:
                self._idle_timer = threading.Timer(self.linger_s, self._stop_if_idle)
                self._idle_timer.daemon = True
                self._idle_timer.start()
        if idle and self.linger_s <= 0:
            self._stop_if_idle()

    def _stop_if_idle(self) -> None:
        """End the reader when nothing subscribed since it went idle."""
        proc = thread = None
        with self._lock:
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
        """Start the first reader that can be had and starts (only the wanted one when
        `SANDFLEET_PROC_READER` or `argv` names it)."""
        forced = self.argv is not None or self.want != "auto"
        why = ""
        for kind, argv in self._readers():
            why = self._refused.get(kind, "")
            if not why:  # (the kernel's or the verifier's answer does not change)
                try:
                    self._start(kind, argv)
                    return
                except (OSError, SandboxError) as e:
                    why = str(e)
                    if not isinstance(e, OSError):
                        self._refused[kind] = why
            if forced:
                raise SandboxError(why)
            self.passed_over[kind] = why
            log.warning("the %s command reader cannot run (%s); trying the next one", kind, why)
        raise SandboxError(why)

    def _start(self, kind: str, argv: list[str]) -> None:
        root = str(Path(__file__).resolve().parent.parent)  # importable from any cwd
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
        }
        proc = subprocess.Popen(
            argv,
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
            if kind == "ebpf":
                raise SandboxError(
                    f"the eBPF command reader did not start ({self._start_error or 'no answer'})"
                    "; it needs root, a kernel with BTF (5.8 or later) and the BPF verifier's "
                    "consent"
                )
            raise SandboxError(
                "the kernel refused the process-events connector "
                f"({self._start_error or 'no answer'}); it needs root in the host's user and pid "
                "namespaces and CONFIG_PROC_EVENTS; command capture falls back to polling"
            )
        self._proc, self._thread, self.pid = proc, thread, proc.pid

    def _readers(self) -> list[tuple[str, list[str]]]:
        """The readers to try, in order, as (kind, argv); building them if need be."""
        if self.argv is not None:
            return [("given", self.argv)]
        from sandbox import native

        out: list[tuple[str, list[str]]] = []
        if self.want in ("auto", "ebpf"):
            ebpf = native.ebpfmon_argv()
            if ebpf is not None:
                out.append(("ebpf", ebpf))
            elif self.want == "ebpf":
                raise SandboxError(
                    "the eBPF command reader cannot be built (see the log); fix: `make setup` "
                    "(apt-get install clang libbpf-dev gcc) or unset SANDFLEET_PROC_READER"
                )
            else:
                self.passed_over["ebpf"] = "cannot be built (see the log)"
        if self.want in ("auto", "native"):
            path = native.procmon_path()
            if path is not None:
                out.append(("native", [str(path)]))
            elif self.want == "native":
                raise SandboxError(
                    "the native process-events reader cannot be built (see the log); fix: "
                    "install a C compiler (`apt-get install gcc`) or unset SANDFLEET_PROC_READER"
                )
            else:
                self.passed_over["native"] = "cannot be built (see the log)"
        if self.want in ("auto", "python"):
            out.append(("python", list(_PYTHON_READER)))
        return out

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
        started = False
        try:
            started = self._hello(proc.stdout.readline())
            if started:
                self._records(proc.stdout)
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
            if code != 0 and started:  # (a start failure is _spawn's to raise, lock held)
                err = SandboxError(f"the process-events reader exited with status {code}")
                with self._lock:
                    self._failed.update(dict.fromkeys(self._callbacks, err))

    def _hello(self, line: bytes) -> bool:
        """The reader's first line (JSON): ready, or why the kernel refused it."""
        try:
            obj = json.loads(line) if line.strip() else {"t": "error", "msg": "it exited"}
        except ValueError:
            obj = {"t": "error", "msg": f"it answered {line[:200]!r}"}
        if not isinstance(obj, dict) or obj.get("t") != "ready":
            self._start_error = str(obj.get("msg", obj) if isinstance(obj, dict) else obj)
            self._ready.set()
            return False
        self.realtime = bool(obj["realtime"])
        self.reader = str(obj.get("reader", "python"))
        self._ready.set()
        return True

    def _records(self, stream: Any) -> None:
        """Binary records until the reader ends: each read's records to their containers'
        callbacks, one call per container and read (before any ack that follows them)."""
        pending = b""
        while chunk := stream.read1(1 << 16):
            data = pending + chunk if pending else chunk
            columns = self._columnar and len(data) >= self.columns_from
            used = self._columns(data) if columns else self._objects(data)
            pending = data[used:]

    def _objects(self, data: bytes) -> int:
        """One read's records as record objects (for every subscriber)."""
        records, used = unpack_records(data)
        batches: dict[str, list[Any]] = {}
        for kind, cid, rec in records:
            if rec is not None:
                got = batches.get(cid)
                if got is None:
                    batches[cid] = [rec]
                else:
                    got.append(rec)
                continue
            self._control(kind, cid, batches)
        self._deliver(batches)
        return used

    def _columns(self, data: bytes) -> int:
        """One read's records for subscribers that take `CommandRows` (and, from the
        same bytes, as objects for any that do not): runs of commands are decoded in C."""
        decode = self._decoder.decode
        columnar = self._columnar
        batches: dict[str, list[Any]] = {}
        off = 0
        while True:
            runs, end = decode(data, off)
            if end > off:
                for cid, rows in runs:
                    if cid in columnar:
                        batches.setdefault(cid, []).append(rows)
                if len(columnar) < len(self._callbacks):  # some subscriber wants objects
                    for _, cid, rec in unpack_records(data[off:end])[0]:
                        if cid not in columnar:
                            batches.setdefault(cid, []).append(rec)
                off = end
            # then one record of another kind (a run ends only there, or at the end)
            one, off = unpack_records(data, start=off, count=1)
            if not one:
                break
            kind, cid, rec = one[0]
            if isinstance(rec, ContainerEmpty):
                batches.setdefault(cid, []).append(rec)
                continue
            self._control(kind, cid, batches)
        self._deliver(batches)
        return off

    def _control(self, kind: int, cid: str, before: dict[str, list[Any]]) -> None:
        """An ack or a loss, once the records that came before it are delivered (then
        `before` is emptied)."""
        self._deliver(before)
        before.clear()
        if kind == REC_ACK:
            with self._lock:
                acked = self._acks.get(cid)
            if acked is not None:
                acked.set()
        elif kind == REC_LOST:
            self.lost += 1
            log.warning("process-events connector overran; some commands were lost")

    def _deliver(self, batches: dict[str, list[Any]]) -> None:
        callbacks = self._callbacks  # read without the lock: a dict get is atomic
        for cid, recs in batches.items():
            cb = callbacks.get(cid)
            if cb is not None:
                cb(recs)


def _each(callback: Callback) -> BatchCallback:
    def deliver(records: list[Record]) -> None:
        for rec in records:
            callback(rec)

    return deliver


def _reader_from_env() -> ReaderKind:
    want = os.environ.get("SANDFLEET_PROC_READER", "auto")
    if want not in _KINDS:
        raise SandboxError(
            f"SANDFLEET_PROC_READER={want!r} is not a reader; fix: use {', '.join(_KINDS)}"
        )
    return want  # type: ignore[return-value]
