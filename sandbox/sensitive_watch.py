"""Reads of credential files by a sandbox, from inotify `IN_OPEN` / `IN_ACCESS`.

Inotify on the workspace sees changes, not reads. `SensitiveWatch` watches, for opens
and reads, (a) the attempt's canary files (`sandbox.canaries`) on the host — the same
inodes the sandbox sees through its read-only bind mounts, watched before it starts —
and (b) the real files in the sandbox's root that match the credential patterns
(`configs/policies.yaml` `sensitive_files.credential_patterns`) and that uid 10001 could
read, found once the first process is inside the container (`watch_root(pid)`, through
`/proc/<pid>/root`, as `ActivityCapture` watches `/tmp`). Only `/root`, `/home`, `/etc`,
`/opt`, `/srv` and `/usr/local/etc` are searched, a few levels deep, without following
links.

Each access becomes a `FileChange` (op `read` when data was read, `open` when the file
was only opened; path as the sandbox sees it; bytes the file's size), handed to
`callback` — `ActivityCapture` turns it into a `file_changed` event like any other, and
the sensitive_files rule (streaming and SQL) fires on it. Debouncing (`AccessDebouncer`,
pure): the first access of a path is reported after `gather_s` (time for its read to
follow its open); later accesses of that path are absorbed for `repeat_s`.

Stat, `ls` of the directory and the sandbox's own start (runc mounting the files) open
nothing and report nothing; host processes that open the canary files would (nothing
of sandfleet's does).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import re
import stat
import threading
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Final

from accounting.errors import SandboxError
from sandbox.canaries import CanarySet, load_canaries
from sandbox.capture_loop import CaptureLoop
from sandbox.file_watch import FileChange
from sandbox.inotify import (
    IN_ACCESS,
    IN_DONT_FOLLOW,
    IN_IGNORED,
    IN_OPEN,
    IN_Q_OVERFLOW,
    Inotify,
    read_queued,
)

__all__ = ["ROOT_SEARCH", "AccessDebouncer", "SensitiveWatch", "readable_by"]

log = logging.getLogger(__name__)

_MASK: Final = IN_OPEN | IN_ACCESS | IN_DONT_FOLLOW
ROOT_SEARCH: Final = ("/root", "/home", "/etc", "/opt", "/srv", "/usr/local/etc")
_MAX_DEPTH: Final = 4
_MAX_ENTRIES: Final = 20_000
_AGENT: Final = 10001  # uid and gid of the sandbox's agent (sandbox.container_spec)
# (image layers, patterns, dirs) -> the paths the patterns matched in a whole search
_FOUND: dict[tuple[str, str, tuple[str, ...]], tuple[str, ...]] = {}
_FOUND_MAX: Final = 64
_FOUND_LOCK = threading.Lock()
_DIR: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


def _image_key(proc: int, root: int, search: Sequence[str], pattern: re.Pattern[str]) -> str | None:
    """The image layers under a container's root (`proc`: its process's /proc directory,
    `root`: its root, both open): what decides what a search of that root finds. None
    when that cannot be told, and the root is then searched whole: not a read-only
    overlay root of the engine's layout, or something mounted on a searched directory,
    over one, or under one unless it is a single file the patterns do not name (the
    forwarder, /etc/hosts, /etc/hostname).

    The root's first lower layer is the container's own (`<id>-init`: the engine's
    placeholders for its mount points); the rest are the image's, the same for every
    container of it, and a read-only root holds them only until it ends."""
    try:
        with open(os.open("mountinfo", os.O_RDONLY | os.O_CLOEXEC, dir_fd=proc)) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    key = None
    try:
        for line in lines:
            fields = line.split(" ")
            point, rest = fields[4], fields[fields.index("-") + 1 :]
            if point == "/":
                if rest[0] != "overlay" or "ro" not in fields[5].split(","):
                    return None
                lower = [o for o in rest[2].split(",") if o.startswith("lowerdir=")]
                layers = lower[0].removeprefix("lowerdir=").split(":") if lower else []
                if len(layers) < 2 or not os.readlink(layers[0]).endswith("-init/diff"):
                    return None
                key = ":".join(layers[1:])
                continue
            if any(d.startswith(point.rstrip("/") + "/") for d in search):
                return None  # over a searched directory
            if not any(point == d or point.startswith(d.rstrip("/") + "/") for d in search):
                continue
            st = os.stat(point.lstrip("/"), dir_fd=root, follow_symlinks=False)
            if not stat.S_ISREG(st.st_mode) or pattern.search(point):
                return None
    except (OSError, ValueError, IndexError):  # gone, or a line not as the kernel writes
        return None
    return key


def readable_by(st: os.stat_result, uid: int = _AGENT, gid: int = _AGENT) -> bool:
    """Whether `uid`:`gid` (no other groups) may read a file with these permissions."""
    if st.st_uid == uid:
        return bool(st.st_mode & stat.S_IRUSR)
    if st.st_gid == gid:
        return bool(st.st_mode & stat.S_IRGRP)
    return bool(st.st_mode & stat.S_IROTH)


@dataclass(slots=True)
class _Path:
    first_ns: int = 0
    read: bool = False
    due_ns: int | None = None  # when the pending access is reported; None: none pending
    quiet_until_ns: int = 0  # accesses before this are absorbed (it was just reported)


class AccessDebouncer:
    """Per path: the first access after a quiet spell is reported `gather_ns` later (as
    `read` if a read came meanwhile, else `open`); accesses in the `repeat_ns` after a
    report are absorbed. Pure: the caller gives the clock."""

    def __init__(self, gather_ns: int, repeat_ns: int) -> None:
        self.gather_ns, self.repeat_ns = gather_ns, repeat_ns
        self._paths: dict[str, _Path] = {}
        self.absorbed = 0

    def add(self, now_ns: int, path: str, read: bool) -> None:
        p = self._paths.setdefault(path, _Path())
        if p.due_ns is not None:
            p.read |= read
        elif now_ns < p.quiet_until_ns:
            self.absorbed += 1
        else:
            p.first_ns, p.read, p.due_ns = now_ns, read, now_ns + self.gather_ns

    def next_due_ns(self) -> int | None:
        return min((p.due_ns for p in self._paths.values() if p.due_ns is not None), default=None)

    def due(self, now_ns: int) -> list[tuple[int, str, str]]:
        """(first_ns, op, path) of each access whose gather time is over, oldest first."""
        out = []
        for path, p in self._paths.items():
            if p.due_ns is not None and p.due_ns <= now_ns:
                out.append((p.first_ns, "read" if p.read else "open", path))
                p.due_ns, p.quiet_until_ns = None, p.first_ns + self.repeat_ns
        return sorted(out)

    def drain(self) -> list[tuple[int, str, str]]:
        return self.due(1 << 62)


_patterns: dict[str, tuple[tuple[int, int], tuple[str, ...]]] = {}


def credential_patterns() -> tuple[str, ...]:
    """`configs/policies.yaml`'s credential patterns, parsed again only when the file
    changed (every attempt asks; parsing the YAML took longer than the rest of its
    capture's start)."""
    from accounting.config import configs_dir
    from accounting.policies import load_policies

    path = configs_dir() / "policies.yaml"
    try:
        st = os.stat(path)
    except OSError:  # load_policies says what is wrong with it
        st = None
    key = (st.st_mtime_ns, st.st_size) if st is not None else (0, 0)
    known = _patterns.get(str(path))
    if st is None or known is None or known[0] != key:
        found = tuple(load_policies(path).anomalies.sensitive_files.credential_patterns)
        _patterns[str(path)] = known = (key, found)
    return known[1]


class SensitiveWatch:
    """Watches canary files and the sandbox's readable credential files (module doc).

    A job of the node's shared capture loop (`sandbox.capture_loop`), not a thread of
    its own: `start` adds it, `stop` removes it and reports what is still pending."""

    WHAT = "watching credential reads"

    def __init__(
        self,
        callback: Callable[[FileChange], None],
        canaries: CanarySet | None = None,
        patterns: Sequence[str] = (),
        *,
        gather_s: float = 0.05,
        repeat_s: float = 10.0,
        search: Sequence[str] = ROOT_SEARCH,
        loop: CaptureLoop | None = None,
    ) -> None:
        self.callback = callback
        self.canaries = canaries
        self.pattern = re.compile("|".join(f"(?:{p})" for p in patterns)) if patterns else None
        self.search = tuple(search)
        self.debouncer = AccessDebouncer(int(gather_s * 1e9), int(repeat_s * 1e9))
        self._loop = loop if loop is not None else CaptureLoop.shared()
        self._inotify = Inotify()
        self._fd = self._inotify.init()
        self._wds: dict[int, tuple[str, int]] = {}  # wd -> (path in the sandbox, size)
        self._pids: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._running = False
        self.watched: list[str] = []  # sandbox paths, canaries first
        self.overflows = 0
        self.error: BaseException | None = None
        try:
            for host, path in canaries.files if canaries is not None else ():
                self._watch(host.encode(), path, os.stat(host).st_size)
        except BaseException:
            self.close()
            raise

    @classmethod
    def beside(cls, workspace: str, callback: Callable[[FileChange], None]) -> SensitiveWatch:
        """The watch for the attempt whose checkout is `workspace`: its canaries (if any
        were planted) and the credential patterns of `configs/policies.yaml`."""
        return cls(callback, load_canaries(workspace), credential_patterns())

    def known_under(self, prefix: str) -> frozenset[str]:
        """What the canaries put under sandbox dir `prefix` (see `CanarySet.known_under`)."""
        return self.canaries.known_under(prefix) if self.canaries is not None else frozenset()

    # -- watches ------------------------------------------------------------------------

    def _watch(self, target: bytes, path: str, size: int) -> None:
        wd = self._inotify.add(self._fd, target, _MASK, f"{path} for reads")
        if wd not in self._wds:
            self.watched.append(path)
        self._wds[wd] = (path, size)

    def watch_root(self, pid: int) -> None:
        """Search the root of the container `pid` is in for readable credential files and
        watch them (on the loop's thread; thread-safe)."""
        if self.pattern is None or not self.search:
            return
        self._pids.put(pid)
        self._loop.poke()

    def _search_root(self, pid: int) -> None:
        with contextlib.ExitStack() as opened:
            try:  # one /proc directory for both: a reused pid cannot pair two containers
                proc = os.open(f"/proc/{pid}", _DIR)
                opened.callback(os.close, proc)
                root = os.open("root", _DIR, dir_fd=proc)
                opened.callback(os.close, root)
            except OSError as e:  # it exited already: nothing of it to watch
                log.info("not searching the root of pid %d: %s", pid, e)
                return
            assert self.pattern is not None
            layers = _image_key(proc, root, self.search, self.pattern)
            key = None if layers is None else (layers, self.pattern.pattern, self.search)
            with _FOUND_LOCK:
                found = _FOUND.get(key) if key is not None else None
            if found is not None:  # the same image, searched before: only its matches
                self._watch_found(root, found)
                return
            matched: list[str] = []
            if self._walk(root, matched) and key is not None:
                with _FOUND_LOCK:
                    if len(_FOUND) >= _FOUND_MAX:
                        _FOUND.pop(next(iter(_FOUND)))
                    _FOUND[key] = tuple(matched)

    def _watch_found(self, root: int, paths: Sequence[str]) -> None:
        """Consider again the paths an earlier search of the same image matched."""
        for path in paths:
            parent, _, name = path.rpartition("/")
            try:
                dfd = os.open(parent.lstrip("/") or ".", _DIR | os.O_NOFOLLOW, dir_fd=root)
            except OSError:
                continue
            try:
                self._consider(path, name, dfd)
            finally:
                os.close(dfd)

    def _walk(self, root: int, matched: list[str]) -> bool:
        """Search the root (`root`, a directory fd) whole; False when it was cut short."""
        seen = 0
        for top in self.search:
            try:
                for parent, dirs, files, dfd in os.fwalk(top.lstrip("/"), dir_fd=root):
                    if parent.count("/") >= _MAX_DEPTH - 1:
                        dirs.clear()
                    seen += len(dirs) + len(files)
                    if seen > _MAX_ENTRIES:
                        log.warning("stopped searching the sandbox root at %d entries", seen)
                        return False
                    for name in files:
                        if self._consider(f"/{parent}/{name}", name, dfd):
                            matched.append(f"/{parent}/{name}")
            except (FileNotFoundError, NotADirectoryError, PermissionError):
                continue  # not in this image
        return True

    def _consider(self, path: str, name: str, dfd: int) -> bool:
        """Watch `path` (`name` in directory `dfd`) if it is a credential file the agent
        may read; returns whether the patterns matched it."""
        assert self.pattern is not None
        if not self.pattern.search(path):
            return False
        try:
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except OSError:
            return True
        if stat.S_ISREG(st.st_mode) and readable_by(st):
            self._watch(f"/proc/self/fd/{dfd}/{name}".encode(), path, st.st_size)
        return True

    # -- on the capture loop ------------------------------------------------------------

    def start(self) -> None:
        self._running = True
        self._loop.add(self)

    def stop(self) -> None:
        """Report everything still pending, then stop. Raises what stopped the watch."""
        if self._running:
            self._loop.remove(self)  # from here on this thread is the only one
            self._running = False
            if self.error is None:
                try:
                    self._search_pending()
                    self.read_once()
                    self._report(self.debouncer.drain())
                except Exception as e:  # raised below, after the descriptor is closed
                    self.error = e
        self.close()
        if self.error is not None:
            raise SandboxError(f"{self.WHAT} failed: {self.error}") from self.error

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def wait_fds(self) -> tuple[int, ...]:
        return (self._fd,) if self.error is None and self._fd >= 0 else ()

    def tick(self, now_ns: int, ready: Collection[int] = ()) -> int | None:
        """Run by the loop: search the roots asked for, read what inotify queued, report
        the accesses whose gather time is over; returns when the next one falls due."""
        if self.error is not None:
            return None
        try:
            self._search_pending()
            if self._fd in ready:
                self.read_once()
            self._report(self.debouncer.due(now_ns))
        except Exception as e:  # stop() raises it
            log.exception("watching credential reads stopped")
            self.error = e
            return None
        return self.debouncer.next_due_ns()

    def _search_pending(self) -> None:
        while True:
            try:
                pid = self._pids.get_nowait()
            except queue.Empty:
                return
            self._search_root(pid)

    def read_once(self) -> None:
        """Feed whatever the kernel has queued to the debouncer (non-blocking)."""
        for now, rec in read_queued(self._fd):
            if rec.mask & IN_Q_OVERFLOW:
                self.overflows += 1
                continue
            where = self._wds.get(rec.wd)
            if where is None or rec.mask & IN_IGNORED:
                continue
            self.debouncer.add(now, where[0], bool(rec.mask & IN_ACCESS))

    def _report(self, accesses: list[tuple[int, str, str]]) -> None:
        if not accesses:  # most wake-ups: nothing fell due
            return
        sizes = dict(self._wds.values())
        for mono_ns, op, path in accesses:
            self.callback(FileChange(mono_ns, op, path, sizes.get(path, 0)))
