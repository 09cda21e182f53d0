"""Every command a sandbox runs, from the kernel's process-events connector.

The connector (netlink `NETLINK_CONNECTOR`, group `CN_IDX_PROC`, root only) reports
every fork, exec and exit on the host, even of a process that lives a millisecond.
A command's argv must be read from `/proc/<pid>/cmdline` within that millisecond, so
the socket is read by this module run as a small dedicated process
(`python -m sandbox.proc_events`): it never waits for another thread's GIL, and runs
at the lowest real-time priority while it stays cheap (`_RealtimeGuard`). It tracks
which process belongs to which watched container (`sandbox.proc_table.ProcessTable`)
and writes one JSON line (ready or error), then binary records
(`sandbox.proc_table.pack_record`) to its stdout; `sandbox.proc_hub.NetlinkProcHub` is
the parent side. The native reader (`sandbox/native/procmon.c`, see `sandbox.native`)
does the same for a fraction of the CPU; this one is its fallback and its reference.
(The eBPF reader, `sandbox/native/ebpfmon.c`, preferred to both, needs no connector:
the kernel hands it argv, so it has no race with a short command to win.)

Pids are host pids; times are CLOCK_MONOTONIC nanoseconds (the connector's clock).
The wire format is pure and tested without a kernel.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import selectors
import socket
import struct
import sys
import time
from typing import IO, Final

from sandbox.proc_table import (
    EV_EXEC,
    EV_EXIT,
    EV_FORK,
    REC_ACK,
    REC_LOST,
    ProcessTable,
    ProcEvent,
    SysProcReader,
    pack_control,
    pack_record,
)

__all__ = [
    "listen_message",
    "parse_datagram",
]

log = logging.getLogger(__name__)

NETLINK_CONNECTOR: Final = 11
CN_IDX_PROC: Final = 1
CN_VAL_PROC: Final = 1
NLMSG_DONE: Final = 3
PROC_CN_MCAST_LISTEN: Final = 1
PROC_CN_MCAST_IGNORE: Final = 2

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_CN_MSG = struct.Struct("=IIIIHH")  # idx, val, seq, ack, len, flags
_EV_HEAD = struct.Struct("=IIQ")  # what, cpu, timestamp_ns
_FORK = struct.Struct("=IIII")  # parent_pid, parent_tgid, child_pid, child_tgid
_EXEC = struct.Struct("=II")  # process_pid, process_tgid
_EXIT = struct.Struct("=IIII")  # process_pid, process_tgid, exit_code, exit_signal
_HEADER = _NLMSGHDR.size + _CN_MSG.size
_SO_RCVBUFFORCE: Final = 33
_RCVBUF: Final = 8 << 20
_FLUSH_NS: Final = 100_000_000  # the reader writes batches: fewer wake-ups downstream
_LAZY_NS: Final = 250_000_000  # how often forks and exits are read when no exec comes

# -- the wire format (pure) ---------------------------------------------------------


def listen_message(listen: bool = True, event_mask: int | None = None) -> bytes:
    """The datagram that subscribes (or unsubscribes) a connector socket.

    With `event_mask` (kernels >= 6.6 read a `proc_input`), the kernel drops every other
    event kind before it is queued; older kernels need the 4-byte form (no mask).
    """
    op = PROC_CN_MCAST_LISTEN if listen else PROC_CN_MCAST_IGNORE
    body = struct.pack("=I", op) if event_mask is None else struct.pack("=II", op, event_mask)
    cn = _CN_MSG.pack(CN_IDX_PROC, CN_VAL_PROC, 0, 0, len(body), 0) + body
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(cn), NLMSG_DONE, 0, 0, 0) + cn


def parse_datagram(data: bytes | memoryview) -> list[ProcEvent]:
    """Every fork / exec / exit event in one netlink datagram (other kinds are skipped)."""
    out: list[ProcEvent] = []
    off = 0
    while off + _HEADER + _EV_HEAD.size <= len(data):
        length = _NLMSGHDR.unpack_from(data, off)[0]
        if length < _HEADER or off + length > len(data):
            break
        ev = off + _HEADER
        what, _cpu, ts = _EV_HEAD.unpack_from(data, ev)
        body = ev + _EV_HEAD.size
        end = off + length
        if what == EV_FORK and body + _FORK.size <= end:
            _pp, ptgid, cpid, ctgid = _FORK.unpack_from(data, body)
            out.append(ProcEvent(what, ts, cpid, ctgid, parent_tgid=ptgid))
        elif what == EV_EXEC and body + _EXEC.size <= end:
            pid, tgid = _EXEC.unpack_from(data, body)
            out.append(ProcEvent(what, ts, pid, tgid))
        elif what == EV_EXIT and body + _EXIT.size <= end:
            pid, tgid, status, _sig = _EXIT.unpack_from(data, body)
            out.append(ProcEvent(what, ts, pid, tgid, exit_status=status))
        off += (length + 3) & ~3  # NLMSG_ALIGN
    return out


def _kernel_filters_events(release: str) -> bool:
    """Kernels >= 6.6 accept an event mask with the listen op (`proc_input`)."""
    m = re.match(r"(\d+)\.(\d+)", release)
    return m is not None and (int(m.group(1)), int(m.group(2))) >= (6, 6)


# -- the reader process -----------------------------------------------------------------


class _RealtimeGuard:
    """Runs the reader at the lowest real-time priority, while it stays cheap.

    On a busy node an ordinary process often waits longer than a short command lives
    for a CPU; SCHED_FIFO 1 lets the reader run first. If it ever uses more than
    `max_share` of a core over a window (an exec storm on the host), it goes back to
    SCHED_OTHER for good.
    """

    def __init__(self, max_share: float = 0.25, window_s: float = 1.0) -> None:
        self.max_share = max_share
        self.window_ns = int(window_s * 1e9)
        self.active = False
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
            self.active = True
        except OSError as e:
            log.info("process-events reader stays at normal priority (%s)", e)
        self._mark = (time.monotonic_ns(), time.process_time_ns())

    def check(self) -> None:
        if not self.active:
            return
        now = time.monotonic_ns()
        wall = now - self._mark[0]
        if wall < self.window_ns:
            return
        cpu = time.process_time_ns() - self._mark[1]
        self._mark = (now, time.process_time_ns())
        if cpu > self.max_share * wall:
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
            self.active = False
            log.warning("process-events reader used %.0f%% of a core; normal priority now",
                        100 * cpu / wall)  # fmt: skip


def _open_connector(mask: int | None) -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_CONNECTOR)
    try:
        try:
            sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, _RCVBUF)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _RCVBUF)
        sock.bind((0, CN_IDX_PROC))
        sock.send(listen_message(True, mask))
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class _Reader:
    """The reader process's loop (see `serve`).

    On kernels that filter by event kind it holds two sockets: execs, read the moment
    they arrive (argv cannot wait), and forks and exits, never waited on but read in
    batches — with each exec, and every `_LAZY_NS` — which saves most wake-ups. Each
    batch is put back in kernel time order before the process table sees it.
    """

    def __init__(self, inp: IO[bytes], out: IO[bytes]) -> None:
        self.inp, self.out = inp, out
        if _kernel_filters_events(os.uname().release):
            self.fast = _open_connector(EV_EXEC)
            try:
                self.slow: socket.socket | None = _open_connector(EV_FORK | EV_EXIT)
            except OSError:
                self.fast.close()
                raise
        else:
            self.fast, self.slow = _open_connector(None), None
        self.table = ProcessTable(SysProcReader())
        self.buf = bytearray(65536)
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.fast, selectors.EVENT_READ)
        self.sel.register(inp.fileno(), selectors.EVENT_READ)
        self.slow_at: int | None = None  # when the forks / exits are read next
        self.flush_at: int | None = None  # when the records written so far must go out
        self.pending = b""

    def close(self) -> None:
        self.sel.close()
        self.fast.close()
        if self.slow is not None:
            self.slow.close()

    def emit(self, record: bytes) -> None:
        self.out.write(record)
        if self.flush_at is None:
            self.flush_at = time.monotonic_ns() + _FLUSH_NS

    def _recv_all(self, sock: socket.socket, into: list[ProcEvent]) -> None:
        while True:
            try:
                n = sock.recv_into(self.buf)
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno != errno.ENOBUFS:
                    raise
                self.emit(pack_control(REC_LOST))
                continue
            into.extend(parse_datagram(memoryview(self.buf)[:n]))

    def drain(self) -> None:
        """Every event queued so far, in kernel order (forks and exits read first)."""
        events: list[ProcEvent] = []
        if self.slow is not None:
            self._recv_all(self.slow, events)
            self.slow_at = time.monotonic_ns() + _LAZY_NS
        self._recv_all(self.fast, events)
        if self.slow is not None:
            events.sort(key=lambda ev: ev.timestamp_ns)
        for ev in events:
            for cid, rec in self.table.feed(ev):
                self.emit(pack_record(cid, rec))

    def commands(self, data: bytes) -> None:
        *lines, self.pending = (self.pending + data).split(b"\n")
        for line in lines:
            cmd, _, rest = line.decode().partition(" ")
            cid, _, pids = rest.partition(" ")
            if cmd == "watch":
                self.table.watch(cid, [int(p) for p in pids.split(",") if p])
            elif cmd == "unwatch":
                self.table.unwatch(cid)
            self.emit(pack_control(REC_ACK, cid))
        self.out.flush()  # a subscriber waits for its ack
        self.flush_at = None

    def run(self, guard: _RealtimeGuard) -> int:
        while True:
            deadlines = [d for d in (self.slow_at, self.flush_at) if d is not None]
            now = time.monotonic_ns()
            timeout = max(0, min(deadlines) - now) / 1e9 if deadlines else None
            ready = {key.fileobj for key, _ in self.sel.select(timeout)}
            if ready or (self.slow_at is not None and time.monotonic_ns() >= self.slow_at):
                self.drain()  # also before commands: an unwatch must not overtake exits
            if self.inp.fileno() in ready:
                data = os.read(self.inp.fileno(), 65536)
                if not data:
                    return 0
                self.commands(data)
            if self.flush_at is not None and time.monotonic_ns() >= self.flush_at:
                self.out.flush()
                self.flush_at = None
            guard.check()


def serve(inp: IO[bytes], out: IO[bytes]) -> int:
    """The reader process: commands on `inp` (`watch <cid> [pid,...]`, `unwatch <cid>`),
    records on `out` (a JSON line, then binary records). Ends when `inp` closes (the
    parent is gone)."""
    try:
        reader = _Reader(inp, out)
    except OSError as e:
        out.write(json.dumps({"t": "error", "msg": str(e)}).encode() + b"\n")
        out.flush()
        return 1
    try:
        guard = _RealtimeGuard()
        hello = {"t": "ready", "realtime": guard.active, "reader": "python"}
        out.write(json.dumps(hello).encode() + b"\n")
        out.flush()
        return reader.run(guard)
    finally:
        reader.close()


def main() -> int:
    logging.basicConfig(level=logging.WARNING, format="proc_events: %(message)s")
    # buffered whatever PYTHONUNBUFFERED says: records go out in batches (_FLUSH_NS)
    with os.fdopen(sys.stdout.fileno(), "wb", buffering=1 << 16, closefd=False) as out:
        return serve(sys.stdin.buffer, out)


if __name__ == "__main__":
    sys.exit(main())
