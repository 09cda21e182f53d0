"""File changes under a sandbox's workspace, from inotify: debounced, with sizes.

`FileWatcher` watches one or more roots recursively (each new directory is watched as
it appears, and what was written into it before the watch is found by a scan) and
reports `FileChange`s: `create`, `modify`, `delete`, `rename` (inotify's MOVED_FROM /
MOVED_TO paired by cookie; a move out of the roots is a delete, a move in a create).
Paths are as the sandbox sees them (a root's `prefix`, e.g. `/workspace`); directories
end with `/`. Sizes are read when a change is reported; a delete carries the last size
seen.

Debouncing (`Debouncer`, pure): a burst of writes to one path is one change, reported
once the path has been quiet for `quiet_s` (or `max_delay_s` after the burst began); a
create followed by writes is one `create`. Deletes and renames are reported at once,
after any change still pending for their paths, so the order of a path's changes holds.

Roots are opened as directory file descriptors, so a root inside a container
(`/proc/<pid>/root/tmp`) stays reachable after that pid exits; paths under a root are
opened one component at a time without following symlinks, so a sandbox that swaps a
directory for a link cannot make the watcher look at the host.
"""

from __future__ import annotations

import errno
import logging
import os
import queue
import select
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from sandbox.debounce import Debouncer, RawChange
from sandbox.inotify import (
    IN_CREATE,
    IN_DELETE,
    IN_DELETE_SELF,
    IN_EXCL_UNLINK,
    IN_IGNORED,
    IN_ISDIR,
    IN_MODIFY,
    IN_MOVED_FROM,
    IN_MOVED_TO,
    IN_ONLYDIR,
    IN_Q_OVERFLOW,
    Inotify,
    InotifyRecord,
    WatchThread,
    read_queued,
)

__all__ = ["FileChange", "FileWatcher", "WatchRoot"]

log = logging.getLogger(__name__)

_WATCH_MASK: Final = (
    IN_MODIFY | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE | IN_DELETE_SELF
    | IN_ONLYDIR | IN_EXCL_UNLINK
)  # fmt: skip  # watched through /proc/self/fd/<fd> of a directory opened without links
_DIR_NOFOLLOW: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_MOVE_WAIT_NS: Final = 50_000_000  # a MOVED_FROM without its MOVED_TO by then moved out
_ONLY_MODIFY: Final = 2  # read_once: nothing but modifications of files


@dataclass(frozen=True, slots=True)
class WatchRoot:
    """A host directory to watch, and the path the sandbox knows it by."""

    host_dir: str
    prefix: str  # e.g. "/workspace"
    fresh: bool = False  # it started empty: what is in it when watching begins is new
    known: frozenset[str] = frozenset()  # relative paths sandfleet put there: never "new"


@dataclass(frozen=True, slots=True)
class FileChange:
    """One debounced change: what became of `path` (and where it came `src` from)."""

    mono_ns: int
    op: str  # create, modify, delete, rename
    path: str
    bytes: int
    src: str | None = None


@dataclass(frozen=True, slots=True)
class _MovedFrom:
    mono_ns: int
    path: str
    is_dir: bool
    idx: int
    rel: str


class FileWatcher(WatchThread):
    """Watches roots on a thread; hands each debounced `FileChange` to `callback`."""

    THREAD_NAME = "sandfleet-file-watch"
    WHAT = "file watching"

    def __init__(
        self,
        roots: list[WatchRoot],
        callback: Callable[[FileChange], None],
        quiet_s: float = 0.25,
        max_delay_s: float = 2.0,
        coalesce_s: float = 0.05,
    ) -> None:
        self.callback = callback
        self.coalesce_s = min(coalesce_s, quiet_s)
        self.max_gather_s = max(self.coalesce_s, quiet_s / 2)
        self.debouncer = Debouncer(int(quiet_s * 1e9), int(max_delay_s * 1e9))
        self._libc = Inotify()
        self._fd = self._libc.init()
        self._roots: list[tuple[int, str]] = []  # (dir fd, prefix)
        self._wds: dict[int, tuple[int, str]] = {}  # wd -> (root index, relative dir)
        self._sizes: dict[str, int] = {}
        self._moves: dict[int, _MovedFrom] = {}  # by cookie, until its MOVED_TO
        self._wake_r, self._wake_w = os.pipe()
        self._stopping = threading.Event()
        self._new_roots: queue.SimpleQueue[WatchRoot] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self.overflows = 0  # times the kernel's queue overflowed (changes were lost)
        self.error: BaseException | None = None
        self.native_id: int | None = None
        try:
            for root in roots:
                self.add_root(root)
        except BaseException:
            self.close()
            raise

    # -- roots and watches --------------------------------------------------------------

    def add_root(self, root: WatchRoot) -> None:
        """Watch another root; its present content is reported only when it is `fresh`."""
        dfd = os.open(root.host_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._roots.append((dfd, root.prefix.rstrip("/")))
        self._watch_tree(len(self._roots) - 1, "", report=root.fresh, known=root.known)

    def _open_dir(self, idx: int, rel: str) -> int | None:
        """A descriptor of `rel` under root `idx`, never through a symlink (the sandbox
        may swap a directory for a link to a host path); None when it is not there."""
        fd = os.dup(self._roots[idx][0])
        try:
            for part in rel.split("/") if rel else ():
                nxt = os.open(part, _DIR_NOFOLLOW, dir_fd=fd)
                os.close(fd)
                fd = nxt
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                return None
            raise
        return fd

    def _path(self, idx: int, rel: str, is_dir: bool = False) -> str:
        path = f"{self._roots[idx][1]}/{rel}" if rel else self._roots[idx][1]
        return path + "/" if is_dir else path

    def _watch_tree(
        self, idx: int, top: str, report: bool, known: frozenset[str] = frozenset()
    ) -> None:
        """Watch `top` and every directory under it; with `report`, what is in them is new
        (but for the `known` paths)."""
        stack = [top]
        while stack:
            rel = stack.pop()
            fd = self._open_dir(idx, rel)
            if fd is None:
                continue  # gone (or replaced) before we got to it: its delete is reported
            try:
                self._watch_one(idx, rel, fd, report, stack, known)
            finally:
                os.close(fd)

    def _watch_one(
        self, idx: int, rel: str, fd: int, report: bool, stack: list[str], known: frozenset[str]
    ) -> None:
        target = f"/proc/self/fd/{fd}".encode()
        wd = self._libc.add(self._fd, target, _WATCH_MASK, self._path(idx, rel))
        self._wds[wd] = (idx, rel)
        now = time.monotonic_ns()
        with os.scandir(fd) as entries:
            for entry in entries:
                child = f"{rel}/{entry.name}" if rel else entry.name
                is_dir = entry.is_dir(follow_symlinks=False)
                if is_dir:
                    stack.append(child)
                else:
                    try:
                        size = entry.stat(follow_symlinks=False).st_size
                    except FileNotFoundError:
                        continue
                    self._sizes[self._path(idx, child)] = size
                if report and child not in known:
                    self._feed(RawChange(now, "create", self._path(idx, child, is_dir)))

    def _forget_tree(self, idx: int, rel: str) -> None:
        """Stop watching `rel` and what is under it (it left the roots)."""
        for wd, (i, r) in list(self._wds.items()):
            if i == idx and (r == rel or r.startswith(rel + "/")):
                self._libc.rm(self._fd, wd)  # EINVAL when the kernel already dropped it
                del self._wds[wd]

    def _watched(self, idx: int, rel: str) -> bool:
        return (idx, rel) in self._wds.values()

    def _move_tree(self, idx: int, old: str, new: str) -> None:
        for wd, (i, r) in list(self._wds.items()):
            if i == idx and (r == old or r.startswith(old + "/")):
                self._wds[wd] = (i, new + r[len(old) :])

    # -- the thread ---------------------------------------------------------------------

    def add_root_later(self, root: WatchRoot) -> None:
        """Ask the watching thread (or the next `service`) to add `root` (thread-safe;
        skipped if it is gone)."""
        self._new_roots.put(root)
        if self._thread is not None:
            os.write(self._wake_w, b"r")

    # -- run by a shared loop (`sandbox.capture_loop`) instead of a thread of its own --

    def service(self, now_ns: int) -> int | None:
        """Handle what the kernel queued and what fell due by `now_ns`; returns the next
        deadline (None: nothing pending, wait on `wait_fds`). For a caller's loop; do not
        `start()` the watcher then."""
        self._add_new_roots()
        self.read_once()  # one non-blocking read; a storm of modifies is one event each
        self._expire_moves(now_ns)
        for change in self.debouncer.due(now_ns):
            self._report(change)
        return self.deadline()

    def deadline(self) -> int | None:
        """When something pending falls due (monotonic ns), or None."""
        deadlines = [d for d in (self.debouncer.next_due_ns(), self._next_move_ns()) if d]
        return min(deadlines) if deadlines else None

    def fileno(self) -> int:
        """The inotify descriptor (readable when changes are queued)."""
        return self._fd

    def wait_fds(self) -> tuple[int, ...]:
        """The descriptor to wait on while nothing is pending (while something is, the
        caller comes back by `deadline()` and reads then: fewer wake-ups)."""
        return (self._fd,) if self._fd >= 0 and self.deadline() is None else ()

    def finish(self) -> None:
        """`stop()` for a watcher run by `service`: report everything pending, close."""
        if self._fd < 0:
            return  # closed already
        try:
            self._add_new_roots()
            self.read_once()
            self._expire_moves(None)
            for change in self.debouncer.drain():
                self._report(change)
        finally:
            self.close()

    def _add_new_roots(self) -> None:
        while True:
            try:
                root = self._new_roots.get_nowait()
            except queue.Empty:
                return
            try:
                self.add_root(root)
            except (FileNotFoundError, NotADirectoryError, PermissionError) as e:
                log.info("not watching %s: %s", root.prefix, e)

    def close(self) -> None:
        for fd in (self._fd, self._wake_r, self._wake_w, *(d for d, _ in self._roots)):
            if fd >= 0:
                os.close(fd)
        self._fd = self._wake_r = self._wake_w = -1
        self._roots = [(-1, p) for _, p in self._roots]

    def _run(self) -> None:
        self.native_id = threading.get_native_id()
        gather = 0.0
        try:
            self._add_new_roots()
            while True:
                now = time.monotonic_ns()
                due = self.deadline()
                timeout = None if due is None else max(0.0, (due - now) / 1e9)
                if gather:  # the last read had changes: more are likely, let them gather
                    wait = gather if timeout is None else min(gather, timeout)
                    ready, _, _ = select.select([self._wake_r], [], [], wait)
                    ready.append(self._fd)
                else:
                    ready, _, _ = select.select([self._fd, self._wake_r], [], [], timeout)
                    if self._fd in ready:
                        # let a burst gather: the kernel merges repeats of an unread event
                        woke, _, _ = select.select([self._wake_r], [], [], self.coalesce_s)
                        ready += woke
                if self._fd in ready:
                    # one wake-up per read while writes go on, and longer gaps (up to
                    # half the quiet time the debouncer waits anyway) while they only
                    # modify files
                    read = self.read_once()
                    gather = 0.0 if not read else (
                        min(2 * (gather or self.coalesce_s), self.max_gather_s)
                        if read == _ONLY_MODIFY else self.coalesce_s
                    )  # fmt: skip
                self._expire_moves(time.monotonic_ns())
                for change in self.debouncer.due(time.monotonic_ns()):
                    self._report(change)
                if self._wake_r in ready:
                    os.read(self._wake_r, 4096)
                    self._add_new_roots()
                    if self._stopping.is_set():
                        break
            self.read_once()
            self._expire_moves(None)
            for change in self.debouncer.drain():
                self._report(change)
        except Exception as e:  # stop() raises it
            log.exception("file watching stopped")
            self.error = e

    def read_once(self) -> int:
        """Handle whatever the kernel has queued (non-blocking). 0: nothing was queued;
        `_ONLY_MODIFY`: only modifications (which the debouncer holds anyway); else 1."""
        seen = 0
        for now, rec in read_queued(self._fd):
            seen = _ONLY_MODIFY if rec.mask == IN_MODIFY and seen != 1 else 1
            self._handle(rec, now)
        return seen

    def _handle(self, rec: InotifyRecord, now: int) -> None:
        if rec.mask & IN_Q_OVERFLOW:
            self.overflows += 1
            log.warning("inotify queue overflowed; some file changes were lost")
            return
        if rec.mask & IN_IGNORED:
            self._wds.pop(rec.wd, None)
            return
        where = self._wds.get(rec.wd)
        if where is None or not rec.name:
            return
        idx, parent = where
        rel = f"{parent}/{rec.name}" if parent else rec.name
        is_dir = bool(rec.mask & IN_ISDIR)
        path = self._path(idx, rel, is_dir)
        if rec.mask & IN_CREATE:
            self._feed(RawChange(now, "create", path))
            if is_dir:
                self._watch_tree(idx, rel, report=True)
        elif rec.mask & IN_MODIFY:
            self._feed(RawChange(now, "modify", path))
        elif rec.mask & IN_DELETE:
            self._feed(RawChange(now, "delete", path))
        elif rec.mask & IN_MOVED_FROM:
            self._moves[rec.cookie] = _MovedFrom(now, path, is_dir, idx, rel)
        elif rec.mask & IN_MOVED_TO:
            src = self._moves.pop(rec.cookie, None)
            if src is None:
                self._feed(RawChange(now, "create", path))  # moved in from outside
                if is_dir:
                    self._watch_tree(idx, rel, report=True)
                return
            self._feed(RawChange(now, "rename", path, src=src.path))
            if is_dir and src.idx == idx and self._watched(idx, src.rel):
                self._move_tree(idx, src.rel, rel)
            elif is_dir:  # another root, or renamed before its watch was added
                self._forget_tree(src.idx, src.rel)
                self._watch_tree(idx, rel, report=True)

    def _next_move_ns(self) -> int | None:
        first = min((m.mono_ns for m in self._moves.values()), default=None)
        return None if first is None else first + _MOVE_WAIT_NS

    def _expire_moves(self, now: int | None) -> None:
        """MOVED_FROMs left unpaired: moved out of the roots, i.e. deleted from them."""
        for cookie, m in list(self._moves.items()):
            if now is None or now - m.mono_ns >= _MOVE_WAIT_NS:
                del self._moves[cookie]
                if m.is_dir:
                    self._forget_tree(m.idx, m.rel)
                self._feed(RawChange(m.mono_ns, "delete", m.path))

    def _feed(self, raw: RawChange) -> None:
        for change in self.debouncer.add(raw):
            self._report(change)

    def _report(self, raw: RawChange) -> None:
        size = 0
        if raw.op == "delete":
            size = self._sizes.pop(raw.path, 0)
        elif not raw.path.endswith("/"):
            size = self._size_of(raw.path)
            if raw.src is not None:
                self._sizes.pop(raw.src, None)
        self.callback(FileChange(raw.mono_ns, raw.op, raw.path, size, raw.src))

    def _size_of(self, path: str) -> int:
        for idx, (dfd, prefix) in enumerate(self._roots):
            if dfd >= 0 and path.startswith(prefix + "/"):
                parent, _, name = path[len(prefix) + 1 :].rpartition("/")
                fd = self._open_dir(idx, parent)
                if fd is None:
                    return self._sizes.get(path, 0)
                try:
                    size = os.stat(name, dir_fd=fd, follow_symlinks=False).st_size
                except (FileNotFoundError, NotADirectoryError):
                    return self._sizes.get(path, 0)
                finally:
                    os.close(fd)
                self._sizes[path] = size
                return size
        return 0
