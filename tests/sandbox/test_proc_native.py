"""The native process-events reader: built from its source, replaced by the Python
reader when it cannot be built, and, on a real kernel and engine, telling a sandbox's
commands (even one that lives a millisecond) from the host's and another sandbox's,
exactly as the Python reader does."""

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
from helpers import missing_engine, require_image

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
    edited.write_text(native.SOURCE.read_text() + "\n/* edited */\n")
    assert native.build_procmon(edited) != first  # a changed source is never run stale


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


def test_without_a_compiler_the_python_reader_is_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SANDFLEET_NATIVE_DIR", str(tmp_path / "empty"))
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))
    monkeypatch.delenv("CC", raising=False)
    assert native.procmon_path() is None
    assert NetlinkProcHub(reader="auto")._reader_argv() == [sys.executable, "-m",
                                                             "sandbox.proc_events"]  # fmt: skip
    with pytest.raises(SandboxError, match="C compiler"):
        NetlinkProcHub(reader="native")._reader_argv()


@pytest.mark.parametrize("binary", ["missing", "/bin/false"])
def test_a_native_reader_that_is_missing_or_fails_is_replaced_by_the_python_one(
    binary: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if os.geteuid() != 0:
        missing_engine("the process-events connector needs root")
    path = tmp_path / "procmon-gone" if binary == "missing" else Path(binary)
    monkeypatch.setattr(native, "procmon_path", lambda: path)
    hub = NetlinkProcHub(reader="auto")
    hub.subscribe("c" * 64, [], Collected())
    try:
        assert hub.reader == "python"
    finally:
        hub.unsubscribe("c" * 64)


def test_an_unknown_reader_in_the_environment_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SANDFLEET_PROC_READER", "ebpf")
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
    ref = require_image(docker_client, "base")
    made: list[Any] = []

    def create(command: list[str]) -> Any:
        c = docker_client.containers.create(
            ref, command, user="10001:10001", network_mode="none", read_only=True,
            cap_drop=["ALL"], security_opt=["no-new-privileges:true"], init=True,
            nano_cpus=10**9, pids_limit=128, labels={"sandfleet.test": "proc-native"},
        )  # fmt: skip
        made.append(c)
        return c

    try:
        yield create
    finally:
        for c in made:
            c.remove(force=True)


@pytest.mark.docker
@pytest.mark.parametrize("reader", ["native", "python"])
def test_each_command_of_the_sandbox_and_nothing_else_is_captured(
    reader: str, containers: Callable[[list[str]], Any]
) -> None:
    if reader == "native" and native.procmon_path() is None:
        missing_engine("the native reader cannot be built (no C compiler?)")
    hub = NetlinkProcHub(reader=reader)  # type: ignore[arg-type]
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
@pytest.mark.parametrize("reader", ["native", "python"])
def test_a_docker_exec_is_placed_by_its_cgroup(
    reader: str, containers: Callable[[list[str]], Any]
) -> None:
    if reader == "native" and native.procmon_path() is None:
        missing_engine("the native reader cannot be built (no C compiler?)")
    hub = NetlinkProcHub(reader=reader)  # type: ignore[arg-type]
    c = containers(["sleep", "60"])
    got = Collected()
    hub.subscribe(c.id, [], got)
    try:
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
