"""Linux inotify, the primitives: its constants, libc's calls (`Inotify`), the records
one read returns (`parse_events`, `read_queued`) and the thread a watcher may run on
(`WatchThread`: `sandbox.file_watch`'s, outside the capture loop). Used by
`sandbox.file_watch` (workspace changes) and `sandbox.sensitive_watch` (reads of
credential files), both serviced on the node's capture loop.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

from accounting.errors import SandboxError

__all__ = ["Inotify", "InotifyRecord", "WatchThread", "parse_events", "read_queued"]

IN_ACCESS: Final = 0x1
IN_MODIFY: Final = 0x2
IN_OPEN: Final = 0x20
IN_MOVED_FROM: Final = 0x40
IN_MOVED_TO: Final = 0x80
IN_CREATE: Final = 0x100
IN_DELETE: Final = 0x200
IN_DELETE_SELF: Final = 0x400
IN_Q_OVERFLOW: Final = 0x4000
IN_IGNORED: Final = 0x8000
IN_ONLYDIR: Final = 0x01000000
IN_DONT_FOLLOW: Final = 0x02000000
IN_EXCL_UNLINK: Final = 0x04000000
IN_ISDIR: Final = 0x40000000
_IN_NONBLOCK: Final = os.O_NONBLOCK
_IN_CLOEXEC: Final = os.O_CLOEXEC
_EVENT = struct.Struct("=iIII")  # wd, mask, cookie, len


@dataclass(frozen=True, slots=True)
class InotifyRecord:
    wd: int
    mask: int
    cookie: int
    name: str


def parse_events(data: bytes) -> list[InotifyRecord]:
    """The `struct inotify_event` records in one read of an inotify descriptor."""
    out = []
    off = 0
    while off + _EVENT.size <= len(data):
        wd, mask, cookie, length = _EVENT.unpack_from(data, off)
        raw = data[off + _EVENT.size : off + _EVENT.size + length]
        name = raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        out.append(InotifyRecord(wd, mask, cookie, name))
        off += _EVENT.size + length
    return out


def read_queued(fd: int) -> Iterator[tuple[int, InotifyRecord]]:
    """Each record the kernel has queued on the (non-blocking) inotify descriptor `fd`,
    with the monotonic ns of the read that got it; ends when the queue is empty."""
    while True:
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return
        now = time.monotonic_ns()
        for rec in parse_events(data):
            yield now, rec


class Inotify:
    """libc's inotify calls (through ctypes); a failure is a `SandboxError` saying what
    to do."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self._init1 = libc.inotify_init1
        self._add = libc.inotify_add_watch
        self._add.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        self.rm = libc.inotify_rm_watch

    def init(self) -> int:
        """A new inotify descriptor (non-blocking, close-on-exec)."""
        fd = self._init1(_IN_NONBLOCK | _IN_CLOEXEC)
        if fd < 0:
            raise SandboxError(f"inotify_init1 failed: {os.strerror(ctypes.get_errno())}")
        return fd

    def add(self, fd: int, target: bytes, mask: int, what: str) -> int:
        """Watch `target` on descriptor `fd`; its watch descriptor. `what` names it in
        an error."""
        wd: int = self._add(fd, target, mask)
        if wd < 0:
            err = ctypes.get_errno()
            if err == errno.ENOSPC:
                raise SandboxError(
                    "inotify watch limit reached; fix: raise it, e.g. "
                    "`sysctl fs.inotify.max_user_watches=1048576`"
                )
            raise SandboxError(f"cannot watch {what}: {os.strerror(err)}")
        return wd


class WatchThread:
    """The thread of a watcher that wakes on its inotify fd and on a pipe: `start`, and
    `stop` (wake it, join it, close, raise what stopped it). Subclasses set `_thread`,
    `_stopping`, `_wake_w` and `error` in `__init__`, and define `_run` and `close`."""

    THREAD_NAME = "sandfleet-watch"
    WHAT = "watching"
    _thread: threading.Thread | None
    _stopping: threading.Event
    _wake_w: int
    error: BaseException | None

    def _run(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self.THREAD_NAME, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Report everything still pending, then stop. Raises what stopped the thread."""
        if self._thread is not None:
            self._stopping.set()
            os.write(self._wake_w, b"x")
            self._thread.join()
            self._thread = None
        self.close()
        if self.error is not None:
            raise SandboxError(f"{self.WHAT} failed: {self.error}") from self.error
