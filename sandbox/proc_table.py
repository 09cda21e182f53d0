"""Which host process belongs to which sandbox, and the command each one runs.

`ProcessTable` is the state machine behind command capture: fed fork / exec / exit
events (from the connector, `sandbox.proc_events`), it tells each watched container's
`CommandStarted` / `CommandFinished` / `ContainerEmpty` records apart from the rest of
the host. Pure given a `ProcReader`, so it is tested with a fake /proc.

A process belongs to a container when its parent does (fork events, tracked from the
container's first process on), or when `/proc/<pid>/cgroup` names the container at
exec time (a `docker exec`, whose parent is the engine's shim). A process already gone
when its exec is handled is placed by its tracked ancestors; argv is read from
`/proc/<pid>/cmdline`, or a zombie's `comm` name.

The records the readers write (`pack_record`, header `RECORD`) come back as record
objects (`unpack_records`); the capture's columnar path reads them as ledger rows
(`sandbox.event_rows`).
"""

from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass
from enum import StrEnum
from typing import Final, NamedTuple, Protocol

__all__ = [
    "EV_EXEC",
    "EV_EXIT",
    "EV_FORK",
    "RECORD",
    "REC_ACK",
    "REC_EMPTY",
    "REC_END",
    "REC_LOST",
    "REC_START",
    "CaptureMode",
    "CommandFinished",
    "CommandStarted",
    "ContainerEmpty",
    "ProcEvent",
    "ProcReader",
    "ProcessTable",
    "Record",
    "SysProcReader",
    "cid_text",
    "container_id_of",
    "decode_exit",
    "pack_control",
    "pack_record",
    "unpack_records",
]

EV_FORK: Final = 0x00000001
EV_EXEC: Final = 0x00000002
EV_EXIT: Final = 0x80000000

_CHUNK: Final = 65536
_CONTAINER_ID = re.compile(r"(?:^|/)(?:docker-)?([0-9a-f]{64})(?:\.scope)?(?:/|$)")


class CaptureMode(StrEnum):
    """How commands were captured: every exec (netlink), or what a poll happened to see."""

    NETLINK = "netlink"
    POLL = "poll"


@dataclass(frozen=True, slots=True)
class ProcEvent:
    """One connector event. `pid`/`tgid` are the process the event is about."""

    what: int
    timestamp_ns: int
    pid: int
    tgid: int
    parent_tgid: int = 0  # fork: the parent's tgid
    exit_status: int = 0  # exit: the raw wait status (see decode_exit)


def decode_exit(status: int) -> int:
    """A raw wait status as an exit code: the code, or minus the signal that killed it."""
    sig = status & 0x7F
    return -sig if sig else (status >> 8) & 0xFF


def container_id_of(cgroup_text: str) -> str | None:
    """The Docker container id named in a `/proc/<pid>/cgroup` file, or None (host)."""
    for line in cgroup_text.splitlines():
        m = _CONTAINER_ID.search(line.rpartition(":")[2])
        if m:
            return m.group(1)
    return None


# -- what subscribers receive ---------------------------------------------------------
# Immutable named tuples, not frozen dataclasses: one is made per exec and per exit, and
# a tuple is made several times faster (a frozen dataclass sets each field by a call).


class CommandStarted(NamedTuple):
    """A process inside the sandbox executed a program."""

    pid: int
    ppid: int
    argv: tuple[str, ...]
    mono_ns: int
    mode: CaptureMode
    argv_truncated: bool = False  # the eBPF reader keeps the first 4 KiB of a longer argv


class CommandFinished(NamedTuple):
    """A command ended: it exited (`exit` set) or executed another program (`exit` None)."""

    pid: int
    ppid: int
    argv: tuple[str, ...]
    start_mono_ns: int
    mono_ns: int
    exit: int | None
    mode: CaptureMode
    argv_truncated: bool = False

    @property
    def duration_ms(self) -> int:
        return max(0, self.mono_ns - self.start_mono_ns) // 1_000_000


class ContainerEmpty(NamedTuple):
    """The last known process of the container exited (a good moment for a last sample)."""

    mono_ns: int


Record = CommandStarted | CommandFinished | ContainerEmpty


# -- reading /proc ------------------------------------------------------------------------


class ProcReader(Protocol):
    """The few /proc reads the tracker needs; None when the process is gone."""

    def cmdline(self, pid: int) -> tuple[str, ...] | None: ...

    def cgroup(self, pid: int) -> str | None: ...

    def ppid(self, pid: int) -> int | None: ...


class SysProcReader:
    """`ProcReader` on the real /proc."""

    def __init__(self, proc: str = "/proc") -> None:
        self.proc = proc

    def _read(self, pid: int, name: str) -> bytes | None:
        try:  # os-level calls: open, read, close and nothing else (this runs per exec)
            fd = os.open(f"{self.proc}/{pid}/{name}", os.O_RDONLY | os.O_CLOEXEC)
        except (FileNotFoundError, ProcessLookupError):
            return None
        try:
            chunks = [os.read(fd, _CHUNK)]
            while len(chunks[-1]) == _CHUNK:
                chunks.append(os.read(fd, _CHUNK))
            return b"".join(chunks)
        except ProcessLookupError:  # exited between open and read
            return None
        finally:
            os.close(fd)

    def cmdline(self, pid: int) -> tuple[str, ...] | None:
        raw = self._read(pid, "cmdline")
        if raw:
            return tuple(a.decode("utf-8", "replace") for a in raw.rstrip(b"\0").split(b"\0"))
        comm = self._read(pid, "comm")  # a zombie keeps its comm, not its cmdline
        return (comm.decode("utf-8", "replace").rstrip("\n"),) if comm else None

    def cgroup(self, pid: int) -> str | None:
        raw = self._read(pid, "cgroup")
        return raw.decode("utf-8", "replace") if raw is not None else None

    def ppid(self, pid: int) -> int | None:
        raw = self._read(pid, "stat")
        if not raw:
            return None
        fields = raw[raw.rfind(b")") + 2 :].split()
        return int(fields[1]) if len(fields) > 1 else None


# -- the state machine (pure, given a reader) -----------------------------------------


@dataclass(slots=True)
class _Running:
    argv: tuple[str, ...]
    ppid: int
    start_ns: int


class ProcessTable:
    """Which host process belongs to which watched container, and its running command.

    `feed(event)` returns `(container_id, record)` pairs. Not thread-safe: one reader
    thread feeds it; `watch` / `unwatch` are called under the hub's lock.
    """

    _MAX_CHAIN = 16

    def __init__(self, reader: ProcReader, mode: CaptureMode = CaptureMode.NETLINK) -> None:
        self.reader = reader
        self.mode = mode
        self.parent: dict[int, int] = {}  # every forked host process -> parent tgid
        self.owner: dict[int, str] = {}  # member process -> container id
        self.running: dict[int, _Running] = {}
        self.members: dict[str, set[int]] = {}  # container id -> its live processes

    def watch(self, container_id: str, pids: list[int] | None = None) -> None:
        """Start watching a container; `pids` are its processes that already exist."""
        self.members.setdefault(container_id, set())
        for pid in pids or ():
            self._join(pid, container_id)

    def unwatch(self, container_id: str) -> None:
        for pid in self.members.pop(container_id, set()):
            self.owner.pop(pid, None)
            self.running.pop(pid, None)

    def _join(self, pid: int, cid: str) -> None:
        self.owner[pid] = cid
        self.members[cid].add(pid)

    def feed(self, ev: ProcEvent) -> list[tuple[str, Record]]:
        if ev.what == EV_FORK:
            if ev.pid == ev.tgid:  # a new process, not a thread
                self.parent[ev.tgid] = ev.parent_tgid
                cid = self.owner.get(ev.parent_tgid)
                if cid is not None:
                    self._join(ev.tgid, cid)
            return []
        if ev.what == EV_EXEC:
            return self._exec(ev)
        if ev.what == EV_EXIT and ev.pid == ev.tgid:
            return self._exit(ev)
        return []

    def _exec(self, ev: ProcEvent) -> list[tuple[str, Record]]:
        pid = ev.tgid
        cid = self.owner.get(pid)
        argv: tuple[str, ...] | None = None
        if cid is None:
            if not self.members:
                return []
            text = self.reader.cgroup(pid)
            cid = container_id_of(text) if text is not None else self._by_chain(pid)
            if cid not in self.members:
                return []
            argv = self.reader.cmdline(pid)
            self._join(pid, cid)
        else:
            argv = self.reader.cmdline(pid)
        ppid = self.parent.get(pid)
        if ppid is None:
            ppid = self.reader.ppid(pid) or 0
        out: list[tuple[str, Record]] = []
        prev = self.running.pop(pid, None)
        if prev is not None:
            out.append((cid, self._finished(pid, prev, ev.timestamp_ns, None)))
        self.running[pid] = _Running(argv or (), ppid, ev.timestamp_ns)
        out.append((cid, CommandStarted(pid, ppid, argv or (), ev.timestamp_ns, self.mode)))
        return out

    def _by_chain(self, pid: int) -> str | None:
        """A process gone before its cgroup was read: the container of its ancestors."""
        for _ in range(self._MAX_CHAIN):
            pid = self.parent.get(pid, 0)
            if pid <= 1:
                return None
            if pid in self.owner:
                return self.owner[pid]
        return None

    def _exit(self, ev: ProcEvent) -> list[tuple[str, Record]]:
        pid = ev.tgid
        self.parent.pop(pid, None)
        cid = self.owner.pop(pid, None)
        if cid is None:
            return []
        out: list[tuple[str, Record]] = []
        run = self.running.pop(pid, None)
        if run is not None:
            out.append(
                (cid, self._finished(pid, run, ev.timestamp_ns, decode_exit(ev.exit_status)))
            )
        members = self.members.get(cid)
        if members is not None:
            members.discard(pid)
            if not members:
                out.append((cid, ContainerEmpty(ev.timestamp_ns)))
        return out

    def _finished(self, pid: int, run: _Running, end_ns: int, code: int | None) -> CommandFinished:
        return CommandFinished(pid, run.ppid, run.argv, run.start_ns, end_ns, code, self.mode)


# -- records between the reader process and its parent (binary, after one JSON line) --
#
# Every reader (`sandbox.proc_events`, the native `sandbox/native/procmon.c`, the eBPF
# `sandbox/native/ebpfmon.c`) writes one JSON line (`ready` or `error`), then records: a
# fixed head, then the argv bytes (NUL-separated, no trailing NUL). Binary, so the hot
# path neither escapes nor parses.

REC_START: Final = 1
REC_END: Final = 2
REC_EMPTY: Final = 3
REC_ACK: Final = 4  # a watch / unwatch command was done
REC_LOST: Final = 5  # the kernel dropped events: the reader fell behind
# size, kind, has_exit, flags, pid, ppid, exit, start, ns, cid
RECORD = struct.Struct("=IBBBxiiiqq64s")
_TRUNCATED: Final = 1  # flags: argv was cut
_NO_CID: Final = b"\0" * 64


def pack_record(container_id: str, rec: Record) -> bytes:
    """One record as a reader writes it (the inverse of `unpack_records`)."""
    cid = container_id.encode()
    if isinstance(rec, CommandStarted):
        argv = "\0".join(rec.argv).encode("utf-8", "surrogateescape")
        head = RECORD.pack(RECORD.size + len(argv), REC_START, 0, _flags(rec), rec.pid,
                         rec.ppid, 0, rec.mono_ns, rec.mono_ns, cid)  # fmt: skip
        return head + argv
    if isinstance(rec, CommandFinished):
        argv = "\0".join(rec.argv).encode("utf-8", "surrogateescape")
        code = rec.exit if rec.exit is not None else 0
        head = RECORD.pack(RECORD.size + len(argv), REC_END, rec.exit is not None, _flags(rec),
                         rec.pid, rec.ppid, code, rec.start_mono_ns, rec.mono_ns,
                         cid)  # fmt: skip
        return head + argv
    return RECORD.pack(RECORD.size, REC_EMPTY, 0, 0, 0, 0, 0, 0, rec.mono_ns, cid)


def _flags(rec: CommandStarted | CommandFinished) -> int:
    return _TRUNCATED if rec.argv_truncated else 0


def pack_control(kind: int, container_id: str = "") -> bytes:
    """An `REC_ACK` (for `container_id`) or `REC_LOST` record."""
    return RECORD.pack(RECORD.size, kind, 0, 0, 0, 0, 0, 0, 0, container_id.encode() or _NO_CID)


def unpack_records(
    data: bytes, mode: CaptureMode = CaptureMode.NETLINK, *, start: int = 0, count: int = -1
) -> tuple[list[tuple[int, str, Record | None]], int]:
    """The whole records of `data` from `start` (at most `count` of them, unless -1), as
    `(kind, container_id, record)` (`record` None for an ack or a loss), and the offset
    where they end."""
    out: list[tuple[int, str, Record | None]] = []
    append, cids = out.append, _cid_names
    unpack, head, n, off = RECORD.unpack_from, RECORD.size, len(data), start
    started, finished = CommandStarted, CommandFinished
    while off + head <= n and count != len(out):
        size, kind, has_exit, flags, pid, ppid, code, start_ns, ns, raw_cid = unpack(data, off)
        end = off + size
        if size < head or end > n:
            break
        cid = cids.get(raw_cid) or cid_text(raw_cid)
        rec: Record | None = None
        if kind in (REC_START, REC_END):
            argv = (
                tuple(data[off + head : end].decode("utf-8", "replace").split("\0"))
                if end > off + head
                else ()
            )
            if kind == REC_START:
                rec = started(pid, ppid, argv, ns, mode, flags & _TRUNCATED != 0)
            else:
                rec = finished(pid, ppid, argv, start_ns, ns, code if has_exit else None,
                               mode, flags & _TRUNCATED != 0)  # fmt: skip
        elif kind == REC_EMPTY:
            rec = ContainerEmpty(ns)
        append((kind, cid, rec))
        off = end
    return out, off


_CID_CACHE: Final = 4096  # container ids seen (64 bytes each), decoded once
_cid_names: dict[bytes, str] = {}


def cid_text(raw: bytes) -> str:
    """A record's 64-byte container id as text (each id decoded once, up to `_CID_CACHE`)."""
    cid = _cid_names.get(raw)
    if cid is None:
        cid = raw.decode("ascii", "replace")
        if len(_cid_names) < _CID_CACHE:
            _cid_names[raw] = cid
    return cid
