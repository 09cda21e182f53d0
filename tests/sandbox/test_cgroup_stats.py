"""Resource samples from a container's cgroup (v1 and v2 layouts), and the totals
that become compute charges. Real kernels are exercised by test_activity.py."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

from sandbox.cgroup_stats import (
    CgroupReader,
    CgroupSample,
    UsageIntegrator,
    cpu_quota_millicores,
    locate_cgroup,
    parse_blkio_v1,
    parse_cpu_max,
    parse_flat_keyed,
    parse_io_stat,
    parse_limit,
)

CID = "c" * 64
MiB = 1 << 20
GiB = 1 << 30

BLKIO = """8:0 Read 4096
8:0 Write 512
8:0 Sync 4608
8:16 Read 100
8:16 Write 0
Total 4708
"""


def write(base: Path, files: dict[str, str]) -> None:
    base.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (base / name).write_text(text)


def v1_tree(root: Path, cpu_dir: str = "cpu,cpuacct") -> None:
    write(root / cpu_dir / "docker" / CID, {
        "cpuacct.usage": "2500000000\n", "cpu.cfs_quota_us": "150000\n",
        "cpu.cfs_period_us": "100000\n",
    })  # fmt: skip
    write(root / "memory" / "docker" / CID, {
        "memory.usage_in_bytes": str(300 * MiB), "memory.max_usage_in_bytes": str(400 * MiB),
        "memory.limit_in_bytes": str(512 * MiB),
        "memory.stat": f"cache 1\ninactive_file 5\ntotal_inactive_file {100 * MiB}\n",
    })  # fmt: skip
    write(root / "pids" / "docker" / CID, {"pids.current": "7\n", "pids.max": "max\n"})
    write(root / "blkio" / "docker" / CID, {"blkio.throttle.io_service_bytes": BLKIO})
    (root / "devices" / "docker").mkdir(parents=True)


def sample(ns: int, cpu_ns: int, mem: int, peak: int = 0) -> CgroupSample:
    return CgroupSample(ns, cpu_ns, 1000, mem, mem, peak, 512 * MiB, 1, 128, 0, 0)


def test_limits_of_max_and_of_v1s_huge_number_mean_no_limit() -> None:
    assert parse_limit("max\n") == 0
    assert parse_limit("9223372036854771712\n") == 0
    assert parse_limit("-1") == 0
    assert parse_limit("536870912\n") == 512 * MiB


def test_stat_files_and_io_counters_are_parsed() -> None:
    assert parse_flat_keyed("usage_usec 12\nnr_periods 0\nbad line\n") == {
        "usage_usec": 12, "nr_periods": 0,
    }  # fmt: skip
    assert parse_blkio_v1(BLKIO) == (4196, 512)
    assert parse_io_stat("8:0 rbytes=10 wbytes=20 rios=1\n8:16 rbytes=5 wbytes=0\n") == (15, 20)


def test_cpu_limits_become_millicores() -> None:
    assert parse_cpu_max("150000 100000\n") == 1500
    assert parse_cpu_max("max 100000\n") == 0
    assert cpu_quota_millicores(50000, 100000) == 500
    assert cpu_quota_millicores(-1, 100000) == 0


def test_a_v1_cgroup_with_comounted_controllers_is_found(tmp_path: Path) -> None:
    v1_tree(tmp_path)
    paths = locate_cgroup(CID, str(tmp_path))
    assert paths is not None and paths.version == 1
    assert paths.dirs["cpuacct"] == str(tmp_path / "cpu,cpuacct" / "docker" / CID)
    assert paths.dirs["cpu"] == paths.dirs["cpuacct"]
    assert locate_cgroup("d" * 64, str(tmp_path)) is None


def test_a_v1_sample_reads_usage_working_set_and_limits(tmp_path: Path) -> None:
    v1_tree(tmp_path)
    s = CgroupReader(CID, str(tmp_path)).sample()
    assert s is not None
    assert s.memory_bytes == 200 * MiB  # usage minus inactive file cache
    assert s.memory_peak_bytes == 400 * MiB
    assert s.payload() == {
        "cpu_usage_us": 2_500_000,
        "cpu_limit_millicores": 1500,
        "memory_bytes": 200 * MiB,
        "memory_limit_bytes": 512 * MiB,
        "pids": 7,
        "pids_limit": 0,
        "io_read_bytes": 4196,
        "io_write_bytes": 512,
    }


def test_a_v2_cgroup_is_found_and_sampled(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("cpu memory pids io\n")
    write(tmp_path / "system.slice" / f"docker-{CID}.scope", {
        "cpu.stat": "usage_usec 1500\nuser_usec 1000\n", "cpu.max": "200000 100000\n",
        "memory.current": str(50 * MiB), "memory.peak": str(60 * MiB), "memory.max": "max\n",
        "memory.stat": f"anon 1\ninactive_file {10 * MiB}\n",
        "pids.current": "3\n", "pids.max": "64\n", "io.stat": "8:0 rbytes=7 wbytes=9\n",
    })  # fmt: skip
    reader = CgroupReader(CID, str(tmp_path))
    s = reader.sample()
    assert reader.paths is not None and reader.paths.version == 2
    assert s is not None
    assert (s.cpu_usage_ns, s.cpu_limit_millicores) == (1_500_000, 2000)
    assert (s.memory_bytes, s.memory_peak_bytes, s.memory_limit_bytes) == (40 * MiB, 60 * MiB, 0)
    assert (s.pids, s.pids_limit, s.io_read_bytes, s.io_write_bytes) == (3, 64, 7, 9)


def test_no_cgroup_yet_or_any_more_gives_no_sample(tmp_path: Path) -> None:
    reader = CgroupReader(CID, str(tmp_path))
    assert reader.sample() is None and reader.procs() == []
    v1_tree(tmp_path)
    (tmp_path / "pids" / "docker" / CID / "cgroup.procs").write_text("11\n12\n")
    assert reader.sample() is not None
    assert reader.procs() == [11, 12]
    (tmp_path / "cpu,cpuacct" / "docker" / CID / "cpuacct.usage").unlink()  # removed
    assert reader.sample() is None


def test_totals_integrate_memory_exactly_and_count_cpu_from_container_start() -> None:
    integ = UsageIntegrator(cpu_baseline_ns=0)
    integ.add(sample(1_000_000_000, 200_000_000, 1 * GiB))
    integ.add(sample(3_000_000_000, 1_200_000_000, 3 * GiB, peak=4 * GiB))
    t = integ.totals()
    assert t.cpu_core_seconds == Decimal("1.2")
    assert t.memory_gib_seconds == Decimal(4)  # (1 + 3) / 2 GiB x 2 s
    assert t.memory_peak_bytes == 4 * GiB and t.memory_peak_sampled_bytes == 3 * GiB
    assert (t.samples, t.seconds) == (2, 2.0)


def test_a_capture_attached_late_counts_cpu_from_its_first_sample() -> None:
    integ = UsageIntegrator(cpu_baseline_ns=None)
    integ.add(sample(0, 5_000_000_000, 0))
    integ.add(sample(1_000_000_000, 5_500_000_000, 0))
    assert integ.totals().cpu_core_seconds == Decimal("0.5")


def test_a_repeated_or_older_sample_is_ignored() -> None:
    integ = UsageIntegrator()
    integ.add(sample(10, 100, MiB))
    integ.add(sample(10, 900, MiB))
    integ.add(sample(5, 900, MiB))
    assert integ.totals().samples == 1
    assert integ.totals().cpu_core_seconds == Decimal("1E-7")
