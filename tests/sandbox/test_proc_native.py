"""The native command readers (eBPF, and the connector's in C): built from their
sources, each replaced by the next (eBPF -> native -> Python) when it cannot be built or
started, and, on a real kernel and engine, telling a sandbox's commands (even one that
lives a millisecond) from the host's and another sandbox's, exactly as the Python reader
does."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import hardened_containers, missing_engine

from accounting.errors import SandboxError
from sandbox import native
from sandbox.proc_hub import NetlinkProcHub
from sandbox.proc_table import CommandFinished, CommandStarted, ContainerEmpty, Record

SCRIPT = """/bin/echo short-lived
sh -c 'exit 7' || true
(cd / && /bin/true)
sleep 0.2
exit 3
"""
NOISE = "i=0; while [ $i -lt 200 ]; do /bin/echo noise-$i >/dev/null; i=$((i+1)); done"


# -- building -------------------------------------------------------------------------


def test_the_reader_is_built_once_per_source_and_reused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if shutil.which("cc") is None:
        missing_engine("no C compiler (apt-get install gcc)")
    monkeypatch.setenv("SANDFLEET_NATIVE_DIR", str(tmp_path / "build"))
    first = native.build_procmon()
    assert first.parent == tmp_path / "build" and first.stat().st_mode & 0o100
    built_at = first.stat().st_mtime_ns
    assert native.build_procmon() == first and first.stat().st_mtime_ns == built_at
    edited = tmp_path / "procmon.c"
    text = native.SOURCE.read_text().replace('"reader_common.h"', f'"{native.READER_HEADER}"')
    edited.write_text(text + "\n/* edited */\n")
    assert native.build_procmon(edited) != first  # a changed source is never run stale


def test_the_records_decoder_is_built_once_as_a_shared_library(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if shutil.which("cc") is None:
        missing_engine("no C compiler (apt-get install gcc)")
    monkeypatch.setenv("SANDFLEET_NATIVE_DIR", str(tmp_path / "build"))
    first = native.build_records()
    assert first.parent == tmp_path / "build" and first.suffix == ".so"
    built_at = first.stat().st_mtime_ns
    assert native.build_records() == first and first.stat().st_mtime_ns == built_at


@pytest.mark.parametrize("reader", ["native", "ebpf"])
def test_an_edited_shared_header_rebuilds_the_reader(
    reader: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if shutil.which("cc") is None:
        missing_engine("no C compiler (apt-get install gcc)")
    if reader == "ebpf":
        require_ebpf_toolchain()
    monkeypatch.setenv("SANDFLEET_NATIVE_DIR", str(tmp_path / "build"))
    src = tmp_path / "src"
    shutil.copytree(native.SOURCE.parent, src)
    header = src / native.READER_HEADER.name
    monkeypatch.setattr(native, "READER_HEADER", header)
    monkeypatch.setattr(native, "EBPF_HEADER", src / native.EBPF_HEADER.name)

    def build() -> str:
        if reader == "native":
            return str(native.build_procmon(src / native.SOURCE.name))
        program, loader = src / native.EBPF_PROGRAM.name, src / native.EBPF_LOADER.name
        return native.build_ebpfmon(program, loader)[0]

    first = build()
    assert build() == first
    header.write_text(header.read_text() + "\n/* edited */\n")
    assert build() != first  # an edited header is never run stale either


def test_a_source_that_does_not_compile_names_the_compiler_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if shutil.which("cc") is None:
        missing_engine("no C compiler (apt-get install gcc)")
    monkeypatch.setenv("SANDFLEET_NATIVE_DIR", str(tmp_path / "build"))
    broken = tmp_path / "procmon.c"
    broken.write_text("int main(void) { return nope; }\n")
    with pytest.raises(SandboxError, match="nope"):
        native.build_procmon(broken)
    assert list((tmp_path / "build").iterdir()) == []  # no half-written binary is left


def require_ebpf_toolchain() -> None:
    if shutil.which("clang") is None or not Path("/usr/include/bpf/libbpf.h").exists():
        missing_engine("no eBPF toolchain (`make setup`: apt-get install clang libbpf-dev)")


def test_the_ebpf_reader_is_built_once_per_source_and_reused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    require_ebpf_toolchain()
    monkeypatch.setenv("SANDFLEET_NATIVE_DIR", str(tmp_path / "build"))
    loader, program = native.build_ebpfmon()
    assert {Path(loader).parent, Path(program).parent} == {tmp_path / "build"}
    built_at = Path(program).stat().st_mtime_ns
    assert native.build_ebpfmon() == [loader, program]
    assert Path(program).stat().st_mtime_ns == built_at
    edited = tmp_path / "ebpfmon.bpf.c"
    text = native.EBPF_PROGRAM.read_text().replace('"ebpfmon.h"', f'"{native.EBPF_HEADER}"')
    edited.write_text(text + "\n/* edited */\n")
    assert native.build_ebpfmon(edited)[1] != program  # a changed source is never run stale


def test_an_ebpf_program_that_does_not_compile_names_the_compiler_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    require_ebpf_toolchain()
    monkeypatch.setenv("SANDFLEET_NATIVE_DIR", str(tmp_path / "build"))
    broken = tmp_path / "ebpfmon.bpf.c"
    broken.write_text("int prog(void) { return nope; }\n")
    with pytest.raises(SandboxError, match=r"(?s)nope.*make setup"):
        native.build_ebpfmon(broken)
    assert list((tmp_path / "build").iterdir()) == []  # no half-written object is left


def test_without_a_compiler_the_python_reader_is_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SANDFLEET_NATIVE_DIR", str(tmp_path / "empty"))
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.delenv("BPF_CLANG", raising=False)
    assert native.ebpfmon_argv() is None and native.procmon_path() is None
    hub = NetlinkProcHub(reader="auto")
    assert hub._readers() == [("python", [sys.executable, "-m", "sandbox.proc_events"])]
    assert set(hub.passed_over) == {"ebpf", "native"}
    with pytest.raises(SandboxError, match="C compiler"):
        NetlinkProcHub(reader="native")._readers()
    with pytest.raises(SandboxError, match="make setup"):
        NetlinkProcHub(reader="ebpf")._readers()


def test_without_the_ebpf_toolchain_the_native_reader_comes_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if native.procmon_path() is None:
        missing_engine("the native reader cannot be built (no C compiler?)")
    monkeypatch.setattr(native, "ebpfmon_argv", lambda: None)
    assert [kind for kind, _ in NetlinkProcHub(reader="auto")._readers()] == ["native", "python"]


@pytest.mark.parametrize("binary", ["missing", "/bin/false"])
def test_a_native_reader_that_is_missing_or_fails_is_replaced_by_the_python_one(
    binary: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if os.geteuid() != 0:
        missing_engine("the process-events connector needs root")
    path = tmp_path / "procmon-gone" if binary == "missing" else Path(binary)
    monkeypatch.setattr(native, "ebpfmon_argv", lambda: None)
    monkeypatch.setattr(native, "procmon_path", lambda: path)
    hub = NetlinkProcHub(reader="auto")
    hub.subscribe("c" * 64, [], Collected())
    try:
        assert hub.reader == "python"
    finally:
        hub.unsubscribe("c" * 64)


@pytest.mark.parametrize("how", ["missing", "exits", "refused-program"])
def test_an_ebpf_reader_that_is_missing_or_refused_is_replaced_by_the_native_one(
    how: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if os.geteuid() != 0:
        missing_engine("the process-events connector needs root")
    if native.procmon_path() is None:
        missing_engine("the native reader cannot be built (no C compiler?)")
    if how == "missing":
        argv = [str(tmp_path / "ebpfmon-gone"), str(tmp_path / "gone.o")]
    elif how == "exits":
        argv = ["/bin/false"]
    else:  # the real loader, given an object the kernel cannot load
        require_ebpf_toolchain()
        (tmp_path / "bad.o").write_bytes(b"not an ELF object")
        argv = [native.build_ebpfmon()[0], str(tmp_path / "bad.o")]
    monkeypatch.setattr(native, "ebpfmon_argv", lambda: argv)
    hub = NetlinkProcHub(reader="auto")
    hub.subscribe("c" * 64, [], Collected())
    try:
        assert hub.reader == "native" and "ebpf" in hub.passed_over
    finally:
        hub.unsubscribe("c" * 64)
    if how == "refused-program":
        assert "bad.o" in hub.passed_over["ebpf"]  # the reason is kept (and logged)
        with pytest.raises(SandboxError, match="eBPF command reader did not start"):
            NetlinkProcHub(reader="ebpf").subscribe("c" * 64, [], Collected())


def test_an_unknown_reader_in_the_environment_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SANDFLEET_PROC_READER", "bpf")
    with pytest.raises(SandboxError, match="SANDFLEET_PROC_READER"):
        NetlinkProcHub()


# -- on the real kernel ------------------------------------------------------------------


class Collected:
    """Records delivered for one container, and a way to wait for one."""

    def __init__(self) -> None:
        self.records: list[Record] = []
        self.cond = threading.Condition()

    def __call__(self, rec: Record) -> None:
        with self.cond:
            self.records.append(rec)
            self.cond.notify_all()

    def wait_for(self, what: str, pred: Callable[[list[Record]], bool]) -> None:
        with self.cond:
            if not self.cond.wait_for(lambda: pred(self.records), 60):
                pytest.fail(f"{what}: not delivered within 60 s")

    def finished(self) -> dict[tuple[str, ...], CommandFinished]:
        return {r.argv: r for r in self.records if isinstance(r, CommandFinished)}


@pytest.fixture
def containers(docker_client: Any) -> Iterator[Callable[[list[str]], Any]]:
    """Creates hardened containers (not started); removes them all afterwards."""
    with hardened_containers(docker_client, "proc-native") as create:
        yield create


def reader_hub(reader: str) -> NetlinkProcHub:
    """A hub that runs `reader`; skips (fails under CI) when it cannot be built."""
    if reader == "native" and native.procmon_path() is None:
        missing_engine("the native reader cannot be built (no C compiler?)")
    if reader == "ebpf" and native.ebpfmon_argv() is None:
        missing_engine("the eBPF reader cannot be built (`make setup` installs clang, libbpf)")
    return NetlinkProcHub(reader=reader)  # type: ignore[arg-type]


READERS = ["ebpf", "native", "python"]


@pytest.mark.docker
@pytest.mark.parametrize("reader", READERS)
def test_each_command_of_the_sandbox_and_nothing_else_is_captured(
    reader: str, containers: Callable[[list[str]], Any]
) -> None:
    hub = reader_hub(reader)
    watched, other = containers(["sh", "-c", SCRIPT]), containers(["sh", "-c", NOISE])
    got, others = Collected(), Collected()
    hub.subscribe(watched.id, [], got)
    try:
        assert hub.reader == reader
        other.start()
        watched.start()
        for i in range(20):  # the host runs commands too
            subprocess.run(["/bin/echo", f"host-{i}"], check=True, capture_output=True)
        assert watched.wait(timeout=60)["StatusCode"] == 3
        got.wait_for("the script's end", lambda rs: ("sh", "-c", SCRIPT) in {
            r.argv for r in rs if isinstance(r, CommandFinished)})  # fmt: skip
        other.wait(timeout=60)
    finally:
        hub.unsubscribe(watched.id)
    done = got.finished()
    shell = done[("sh", "-c", SCRIPT)]
    assert shell.exit == 3
    short = done[("/bin/echo", "short-lived")]
    assert short.exit == 0 and short.ppid == shell.pid and short.duration_ms < 1000
    assert done[("sh", "-c", "exit 7")].exit == 7
    assert done[("/bin/true",)].exit == 0  # in a subshell: its parent is a fork of the shell
    assert done[("sleep", "0.2")].exit == 0 and done[("sleep", "0.2")].ppid == shell.pid
    started = {(r.argv, r.pid) for r in got.records if isinstance(r, CommandStarted)}
    assert started == {(argv, r.pid) for argv, r in done.items()}
    assert all(r.mode == "netlink" for r in done.values())
    argvs = " ".join(" ".join(argv) for argv in done)
    assert "noise-" not in argvs and "host-" not in argvs  # nothing leaks in
    assert others.records == []


@pytest.mark.docker
@pytest.mark.parametrize("reader", READERS)
def test_a_docker_exec_is_placed_by_its_cgroup(
    reader: str, containers: Callable[[list[str]], Any]
) -> None:
    hub = reader_hub(reader)
    c = containers(["sleep", "60"])
    got = Collected()
    hub.subscribe(c.id, [], got)
    try:
        assert hub.reader == reader
        c.start()
        assert c.exec_run(["sh", "-c", "/bin/echo via-exec; exit 5"]).exit_code == 5
        got.wait_for("the exec", lambda rs: ("sh", "-c", "/bin/echo via-exec; exit 5") in {
            r.argv for r in rs if isinstance(r, CommandFinished)})  # fmt: skip
        c.kill()
        c.wait(timeout=60)
        got.wait_for("the container's end", lambda rs: any(
            isinstance(r, ContainerEmpty) for r in rs))  # fmt: skip
    finally:
        hub.unsubscribe(c.id)
    done = got.finished()
    assert done[("sh", "-c", "/bin/echo via-exec; exit 5")].exit == 5
    assert done[("/bin/echo", "via-exec")].exit == 0
    assert done[("sleep", "60")].exit == -9  # killed


@pytest.mark.docker
@pytest.mark.parametrize("reader", READERS)
def test_a_running_container_watched_by_its_pids_has_its_commands_and_execs_captured(
    reader: str, containers: Callable[[list[str]], Any]
) -> None:
    hub = reader_hub(reader)
    c = containers(["sleep", "60"])
    c.start()
    c.reload()
    got = Collected()
    hub.subscribe(c.id, [c.attrs["State"]["Pid"]], got)  # its namespace is known up front
    try:
        assert hub.reader == reader
        long_arg = "x" * 5000
        assert c.exec_run(["sh", "-c", f"/bin/echo {long_arg} >/dev/null; exit 4"]).exit_code == 4
        got.wait_for("the exec", lambda rs: any(
            isinstance(r, CommandFinished) and r.argv[:2] == ("sh", "-c") for r in rs))  # fmt: skip
        got.wait_for("the echo", lambda rs: any(
            isinstance(r, CommandFinished) and r.argv[0] == "/bin/echo" for r in rs))  # fmt: skip
        c.kill()
        c.wait(timeout=60)
        got.wait_for("the container's end", lambda rs: any(
            isinstance(r, ContainerEmpty) for r in rs))  # fmt: skip
    finally:
        hub.unsubscribe(c.id)
    ends = [r for r in got.records if isinstance(r, CommandFinished)]
    shell = next(r for r in ends if r.argv[:2] == ("sh", "-c"))
    echo = next(r for r in ends if r.argv[0] == "/bin/echo")
    assert shell.exit == 4 and echo.exit == 0 and echo.ppid == shell.pid
    if reader == "ebpf":  # the kernel keeps the first 4 KiB of argv, and says so
        assert shell.argv_truncated and echo.argv_truncated
        assert echo.argv[1].startswith("xxxx") and len("\0".join(echo.argv)) == 4096
    else:
        assert echo.argv == ("/bin/echo", long_arg) and not echo.argv_truncated


@pytest.mark.docker
@pytest.mark.parametrize("reader", ["ebpf", "native"])
def test_sandboxes_that_end_at_once_are_placed_and_captured_whole(
    reader: str, containers: Callable[[list[str]], Any]
) -> None:
    # Watched before they start, their namespace is placed by a live process's cgroup:
    # the reader must look while the sandbox lives, not at its next timed drain. And a
    # dead sandbox's pid-namespace inode soon names the next one's: no command may land
    # in the sandbox whose namespace had that inode before.
    hub = reader_hub(reader)
    boxes = [containers(["sh", "-c", f"/bin/echo quick-{i}"]) for i in range(6)]
    got = {c.id: Collected() for c in boxes}
    for c in boxes:
        hub.subscribe(c.id, [], got[c.id])
    try:
        for c in boxes:
            c.start()
        for c in boxes:
            assert c.wait(timeout=60)["StatusCode"] == 0
        for i, c in enumerate(boxes):
            got[c.id].wait_for(f"sandbox {i}'s echo", lambda rs, i=i: any(
                isinstance(r, CommandFinished) and r.argv == ("/bin/echo", f"quick-{i}")
                for r in rs))  # fmt: skip
    finally:
        for c in boxes:
            hub.unsubscribe(c.id)
    for i, c in enumerate(boxes):
        argvs = {" ".join(r.argv) for r in got[c.id].records if isinstance(r, CommandStarted)}
        assert {a.rsplit("-", 1)[-1] for a in argvs} == {str(i)}, argvs  # its own, only
