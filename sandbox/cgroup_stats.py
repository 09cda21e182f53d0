"""A sandbox's resource use, read from its cgroup: samples, limits and totals.

`CgroupReader(container_id).sample()` reads CPU, memory, pids and block I/O with their
limits from the container's cgroup (v1: one directory per controller under
`/sys/fs/cgroup/<controller>/docker/<id>`; v2: one directory), or returns None while
the cgroup does not exist (before start, after exit). `UsageIntegrator` turns the
samples into the measured totals that become compute charges: CPU core-seconds (the
cgroup's own counter), memory GiB-seconds (the working set integrated over time) and
peak memory.

Conventions (those of the `resource_sample` payload in accounting/README.md):
- `memory_bytes` is the working set: usage minus inactive file cache, as `docker stats`
  and the kubelet count it; `memory_peak_bytes` is the kernel's high-water mark of
  usage (page cache included), read when the kernel keeps one.
- A limit of 0 means "no limit".
- cgroup v1 attributes only direct and read I/O to a container; buffered writes flushed
  later by the kernel are not counted in `io_write_bytes`.

Parsers are pure functions of file contents, tested without a kernel.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Final

__all__ = [
    "CgroupPaths",
    "CgroupReader",
    "CgroupSample",
    "ResourceTotals",
    "UsageIntegrator",
    "locate_cgroup",
    "parse_blkio_v1",
    "parse_cpu_max",
    "parse_flat_keyed",
    "parse_io_stat",
    "parse_limit",
]

CGROUP_ROOT: Final = "/sys/fs/cgroup"
_UNLIMITED: Final = 1 << 62  # v1 writes "no limit" as a page-rounded LLONG_MAX
_GIB: Final = 1 << 30
_NS: Final = 1_000_000_000
_CONTROLLERS: Final = ("cpuacct", "cpu", "memory", "pids", "blkio")


# -- parsers (pure) -----------------------------------------------------------------------


def parse_limit(text: str) -> int:
    """A limit file (`memory.limit_in_bytes`, `pids.max`, `memory.max`); 0 = no limit."""
    value = text.strip()
    if value in ("max", "", "-1"):
        return 0
    n = int(value)
    return 0 if n < 0 or n >= _UNLIMITED else n


def parse_flat_keyed(text: str) -> dict[str, int]:
    """`key value` lines (`memory.stat`, `cpu.stat`)."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if value.strip().lstrip("-").isdigit():
            out[key] = int(value)
    return out


def parse_blkio_v1(text: str) -> tuple[int, int]:
    """(read, write) bytes summed over devices from `blkio.throttle.io_service_bytes`."""
    read = write = 0
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[2].isdigit():
            if parts[1] == "Read":
                read += int(parts[2])
            elif parts[1] == "Write":
                write += int(parts[2])
    return read, write


def parse_io_stat(text: str) -> tuple[int, int]:
    """(read, write) bytes summed over devices from cgroup v2 `io.stat`."""
    read = write = 0
    for line in text.splitlines():
        for field in line.split()[1:]:
            key, _, value = field.partition("=")
            if key == "rbytes":
                read += int(value)
            elif key == "wbytes":
                write += int(value)
    return read, write


def parse_cpu_max(text: str) -> int:
    """Millicores from cgroup v2 `cpu.max` (`<quota> <period>` or `max <period>`); 0 = none."""
    quota, _, period = text.strip().partition(" ")
    if quota == "max" or not period:
        return 0
    return int(quota) * 1000 // int(period)


def cpu_quota_millicores(quota_us: int, period_us: int) -> int:
    """Millicores from cgroup v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`; 0 = none."""
    return 0 if quota_us <= 0 or period_us <= 0 else quota_us * 1000 // period_us


# -- finding the cgroup -----------------------------------------------------------------


@dataclass(frozen=True)
class CgroupPaths:
    """Where a container's cgroup lives: one directory per v1 controller, or one (v2)."""

    version: int
    dirs: Mapping[str, str]  # controller -> directory; v2 maps every controller to one

    def file(self, controller: str, name: str) -> str:
        return os.path.join(self.dirs[controller], name)


def _relative_dirs(container_id: str) -> tuple[str, ...]:
    return (f"docker/{container_id}", f"system.slice/docker-{container_id}.scope")


def locate_cgroup(container_id: str, root: str = CGROUP_ROOT) -> CgroupPaths | None:
    """The container's cgroup directories (cgroupfs or systemd driver), or None (not yet)."""
    rels = _relative_dirs(container_id)
    if os.path.exists(os.path.join(root, "cgroup.controllers")):  # unified (v2) host
        for rel in rels:
            d = os.path.join(root, rel)
            if os.path.isdir(d):
                return CgroupPaths(2, dict.fromkeys(_CONTROLLERS, d))
        return None
    dirs: dict[str, str] = {}
    try:
        mounts = sorted(os.listdir(root))
    except FileNotFoundError:
        return None
    for mount in mounts:
        for ctrl in mount.split(","):
            if ctrl in _CONTROLLERS and ctrl not in dirs:
                for rel in rels:
                    d = os.path.join(root, mount, rel)
                    if os.path.isdir(d):
                        dirs[ctrl] = d
                        break
    return CgroupPaths(1, dirs) if "cpuacct" in dirs and "memory" in dirs else None


# -- one sample -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CgroupSample:
    """One reading of a container's cgroup. Limits of 0 mean "no limit"."""

    mono_ns: int
    cpu_usage_ns: int  # cumulative since the cgroup was made
    cpu_limit_millicores: int
    memory_bytes: int  # working set
    memory_usage_bytes: int  # with page cache
    memory_peak_bytes: int  # the kernel's high-water mark of usage; 0 when it keeps none
    memory_limit_bytes: int
    pids: int
    pids_limit: int
    io_read_bytes: int
    io_write_bytes: int

    def payload(self) -> dict[str, Any]:
        """The `resource_sample` event payload (accounting/README.md)."""
        return {
            "cpu_usage_us": self.cpu_usage_ns // 1000,
            "cpu_limit_millicores": self.cpu_limit_millicores,
            "memory_bytes": self.memory_bytes,
            "memory_limit_bytes": self.memory_limit_bytes,
            "pids": self.pids,
            "pids_limit": self.pids_limit,
            "io_read_bytes": self.io_read_bytes,
            "io_write_bytes": self.io_write_bytes,
        }


def _read(path: str) -> str:
    # os-level open / read / close: a sample reads about ten small files every second
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        data = os.read(fd, 65536)
        if len(data) == 65536:
            chunks = [data]
            while chunk := os.read(fd, 65536):
                chunks.append(chunk)
            data = b"".join(chunks)
    finally:
        os.close(fd)
    return data.decode("utf-8", "replace")


Reader = Callable[[str], str]


def _read_opt(read: Reader, path: str, default: str = "") -> str:
    try:
        return read(path)
    except FileNotFoundError:
        return default


def _sample_v1(p: CgroupPaths, now: int, read: Reader) -> CgroupSample:
    cpu_dir = "cpu" if "cpu" in p.dirs else "cpuacct"
    quota = int(_read_opt(read, p.file(cpu_dir, "cpu.cfs_quota_us"), "-1"))
    period = int(_read_opt(read, p.file(cpu_dir, "cpu.cfs_period_us"), "0"))
    usage = int(read(p.file("memory", "memory.usage_in_bytes")))
    stat = parse_flat_keyed(read(p.file("memory", "memory.stat")))
    inactive = stat.get("total_inactive_file", stat.get("inactive_file", 0))
    has_pids = "pids" in p.dirs
    io = (0, 0)
    if "blkio" in p.dirs:
        io = parse_blkio_v1(_read_opt(read, p.file("blkio", "blkio.throttle.io_service_bytes")))
    return CgroupSample(
        mono_ns=now,
        cpu_usage_ns=int(read(p.file("cpuacct", "cpuacct.usage"))),
        cpu_limit_millicores=cpu_quota_millicores(quota, period),
        memory_bytes=max(0, usage - inactive),
        memory_usage_bytes=usage,
        memory_peak_bytes=int(read(p.file("memory", "memory.max_usage_in_bytes"))),
        memory_limit_bytes=parse_limit(read(p.file("memory", "memory.limit_in_bytes"))),
        pids=int(read(p.file("pids", "pids.current"))) if has_pids else 0,
        pids_limit=parse_limit(read(p.file("pids", "pids.max"))) if has_pids else 0,
        io_read_bytes=io[0],
        io_write_bytes=io[1],
    )


def _sample_v2(p: CgroupPaths, now: int, read: Reader) -> CgroupSample:
    cpu = parse_flat_keyed(read(p.file("cpu", "cpu.stat")))
    usage = int(read(p.file("memory", "memory.current")))
    stat = parse_flat_keyed(read(p.file("memory", "memory.stat")))
    io = parse_io_stat(_read_opt(read, p.file("blkio", "io.stat")))
    return CgroupSample(
        mono_ns=now,
        cpu_usage_ns=cpu.get("usage_usec", 0) * 1000,
        cpu_limit_millicores=parse_cpu_max(_read_opt(read, p.file("cpu", "cpu.max"), "max")),
        memory_bytes=max(0, usage - stat.get("inactive_file", 0)),
        memory_usage_bytes=usage,
        memory_peak_bytes=int(_read_opt(read, p.file("memory", "memory.peak"), "0") or 0),
        memory_limit_bytes=parse_limit(_read_opt(read, p.file("memory", "memory.max"), "max")),
        pids=int(_read_opt(read, p.file("pids", "pids.current"), "0")),
        pids_limit=parse_limit(_read_opt(read, p.file("pids", "pids.max"), "max")),
        io_read_bytes=io[0],
        io_write_bytes=io[1],
    )


class CgroupReader:
    """Samples one container's cgroup; finds it once the container has started."""

    def __init__(
        self, container_id: str, root: str = CGROUP_ROOT, *, keep_open: bool = False
    ) -> None:
        self.container_id = container_id
        self.root = root
        self.paths: CgroupPaths | None = None
        # keep_open: the files stay open between samples and are read again from offset 0
        # (a cgroup file is made anew by each read from the start): no path lookups each
        # second. Call close() when done.
        self._fds: dict[str, int] | None = {} if keep_open else None

    def _read(self, path: str) -> str:
        fds = self._fds
        if fds is None:
            return _read(path)
        fd = fds.get(path)
        if fd is None:
            fd = fds[path] = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        data = os.pread(fd, 65536, 0)
        if len(data) == 65536:  # (no cgroup file of these is this long)
            return _read(path)
        return data.decode("utf-8", "replace")

    def close(self) -> None:
        """Close the files kept open (they are opened again if it samples later)."""
        if self._fds:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def sample(self) -> CgroupSample | None:
        """A reading now, or None while the cgroup does not exist (not started, or gone)."""
        if self.paths is None:
            self.paths = locate_cgroup(self.container_id, self.root)
            if self.paths is None:
                return None
        now = time.monotonic_ns()
        try:
            if self.paths.version == 1:
                return _sample_v1(self.paths, now, self._read)
            return _sample_v2(self.paths, now, self._read)
        except (FileNotFoundError, ProcessLookupError):
            self.close()
            return None  # removed with the container; a v1 rmdir can race the reads
        except OSError as e:
            if e.errno == errno.ENODEV:  # the cgroup was removed while a file was open
                self.close()
                return None
            raise

    def procs(self) -> list[int]:
        """The container's processes now (empty before start and after exit)."""
        if self.paths is None:
            self.paths = locate_cgroup(self.container_id, self.root)
            if self.paths is None:
                return []
        ctrl = "pids" if "pids" in self.paths.dirs else "memory"
        try:
            text = _read(self.paths.file(ctrl, "cgroup.procs"))
        except (FileNotFoundError, ProcessLookupError):
            return []
        return [int(x) for x in text.split()]


# -- totals ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResourceTotals:
    """What a sandbox used over the samples, exact (`Decimal`) where it is charged."""

    cpu_core_seconds: Decimal
    memory_gib_seconds: Decimal
    memory_peak_bytes: int  # the kernel's high-water mark (page cache included)
    memory_peak_sampled_bytes: int  # the largest working set among the samples
    samples: int
    first_mono_ns: int
    last_mono_ns: int

    @property
    def seconds(self) -> float:
        return (self.last_mono_ns - self.first_mono_ns) / _NS


class UsageIntegrator:
    """Accumulates samples into `ResourceTotals`.

    CPU is the counter's increase from `cpu_baseline_ns` (0 when sampling began before
    the container started, so all of its CPU counts; None: from the first sample).
    Memory GiB-seconds is the working set integrated with the trapezoid rule between
    consecutive samples, in exact integers (byte-nanoseconds).
    """

    def __init__(self, cpu_baseline_ns: int | None = 0) -> None:
        self._baseline = cpu_baseline_ns
        self._cpu_ns = 0
        self._byte_ns = 0
        self._last: CgroupSample | None = None
        self._first_ns = 0
        self._peak = 0
        self._peak_sampled = 0
        self.samples = 0

    def add(self, s: CgroupSample) -> None:
        last = self._last
        if last is None:
            self._first_ns = s.mono_ns
            base = s.cpu_usage_ns if self._baseline is None else self._baseline
            self._cpu_ns = max(0, s.cpu_usage_ns - base)
        else:
            if s.mono_ns <= last.mono_ns:
                return
            step = s.cpu_usage_ns - last.cpu_usage_ns
            self._cpu_ns += step if step >= 0 else s.cpu_usage_ns  # a new cgroup restarts at 0
            self._byte_ns += (s.memory_bytes + last.memory_bytes) * (s.mono_ns - last.mono_ns) // 2
        self._peak = max(self._peak, s.memory_peak_bytes, s.memory_bytes)
        self._peak_sampled = max(self._peak_sampled, s.memory_bytes)
        self._last = s
        self.samples += 1

    def totals(self) -> ResourceTotals:
        last_ns = self._last.mono_ns if self._last is not None else 0
        return ResourceTotals(
            cpu_core_seconds=Decimal(self._cpu_ns) / _NS,
            memory_gib_seconds=Decimal(self._byte_ns) / (_GIB * _NS),
            memory_peak_bytes=self._peak,
            memory_peak_sampled_bytes=self._peak_sampled,
            samples=self.samples,
            first_mono_ns=self._first_ns,
            last_mono_ns=last_ns,
        )
